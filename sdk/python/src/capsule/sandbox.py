"""Sandboxes, their commands, templates, pools, groups, secrets and events:
the synchronous API. :mod:`capsule.aio` has the same with ``async``."""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from . import _wire
from ._config import Connection
from ._http import DEFAULT_REQUEST_TIMEOUT, Http, parse_line
from ._wire import DEFAULT_COMMAND_TIMEOUT, Command, OutputCallback, seg
from .files import Files
from .processes import ProcessHandle
from .pty import Pty
from .errors import CapsuleError, Conflict, NotFound, SandboxFailed, Timeout, ended
from .models import (CommandInfo, CommandResult, Event, GroupInfo, PoolStatus, ProcessInfo,
                     SandboxInfo, SandboxStats, SecretInfo, TemplateInfo)

_UNSET: Any = object()


class Capsule:
    """A connection to the daemon, shared by everything made through it.

    With no arguments it finds the daemon as the CLI does: ``CAPSULE_URL``
    and ``CAPSULE_TOKEN`` for a TCP daemon, else the Unix socket
    ``CAPSULE_SOCKET`` or ``$CAPSULE_HOME/api.sock``. ``request_timeout``
    bounds each request (a create, a suspend), not a command's run, which
    has its own ``timeout``.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None,
                 socket: Optional[str] = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.connection = Connection.resolve(url, token, socket)
        self.http = Http(self.connection, request_timeout)
        self.templates = Templates(self)
        self.pools = Pools(self)
        self.groups = Groups(self)
        self.secrets = Secrets(self)
        self.events = Events(self)

    def create(self, template: Optional[str] = None, **kwargs: Any) -> "Sandbox":
        """See :meth:`Sandbox.create`."""
        return Sandbox.create(template, capsule=self, **kwargs)

    def connect(self, sandbox_id: str) -> "Sandbox":
        """See :meth:`Sandbox.connect`."""
        return Sandbox.connect(sandbox_id, capsule=self)

    def list(self, labels: Optional[Mapping[str, str]] = None,
             state: Union[str, Sequence[str], None] = None) -> List[SandboxInfo]:
        """See :meth:`Sandbox.list`."""
        return Sandbox.list(labels=labels, state=state, capsule=self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Capsule":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _capsule(capsule: Optional[Capsule], conn: Dict[str, Any]) -> Capsule:
    return capsule if capsule is not None else Capsule(**conn)


class Sandbox:
    """A running (or suspended) microVM.

    Make one with :meth:`Sandbox.create` and use it as a context manager
    to end it when done::

        with Sandbox.create(template="py", timeout=600) as sb:
            r = sb.commands.run("python3 -c 'print(6*7)'")
            assert r.stdout == "42\\n"
    """

    def __init__(self, sandbox_id: str, capsule: Capsule, info: Optional[SandboxInfo] = None):
        self.id = sandbox_id
        self.capsule = capsule
        self._info = info
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)

    @property
    def sandbox_id(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"

    # Making and finding sandboxes.

    @classmethod
    def create(cls, template: Optional[str] = None, *, rootfs: Optional[str] = None,
               cpus: Optional[int] = None, memory_mib: Optional[int] = None,
               group: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
               timeout: Optional[float] = 300, envs: Optional[Mapping[str, str]] = None,
               secrets: Optional[Sequence[str]] = None, idle_suspend: Optional[float] = None,
               capsule: Optional[Capsule] = None, **connection: Any) -> "Sandbox":
        """Creates a sandbox and waits until it takes commands.

        :param template: restore it from this template or snapshot (primed,
            in milliseconds from a warm pool); it sets the root filesystem,
            vCPUs and memory.
        :param rootfs: otherwise, boot from this ext4 image on the daemon's
            host (the sandbox gets its own copy).
        :param timeout: seconds until it expires and is destroyed; ``None``
            for never. :meth:`set_timeout` changes it.
        :param envs: environment for every command run in it.
        :param secrets: names of its group's secrets, given to every
            command as environment variables; their values are never shown.
        :param idle_suspend: suspend it after this many seconds without a
            command; the next command resumes it.
        :param connection: ``url``, ``token``, ``socket``,
            ``request_timeout`` for a :class:`Capsule` made for it.
        """
        capsule = _capsule(capsule, connection)
        body = _wire.create_body(template, rootfs, cpus, memory_mib, group, labels, timeout,
                                 envs, secrets, idle_suspend)
        info = SandboxInfo.from_api(capsule.http.call("POST", "/v1/sandboxes", body))
        return cls(info.id, capsule, info)

    @classmethod
    def connect(cls, sandbox_id: str, *, capsule: Optional[Capsule] = None,
                **connection: Any) -> "Sandbox":
        """A handle on an existing sandbox (:class:`NotFound` if there is none)."""
        capsule = _capsule(capsule, connection)
        info = SandboxInfo.from_api(capsule.http.call("GET", f"/v1/sandboxes/{seg(sandbox_id)}"))
        return cls(info.id, capsule, info)

    @classmethod
    def list(cls, labels: Optional[Mapping[str, str]] = None,
             state: Union[str, Sequence[str], None] = None, *, selector: Optional[str] = None,
             capsule: Optional[Capsule] = None, **connection: Any) -> List[SandboxInfo]:
        """Sandboxes whose labels match (all of ``labels``, or a Kubernetes
        ``selector`` such as ``"owner=alice,job!=7"``), in ``state``
        (default: all but ended)."""
        capsule = _capsule(capsule, connection)
        answer = capsule.http.call("GET", _wire.list_path(labels, state, selector))
        return [SandboxInfo.from_api(s) for s in answer]

    # This sandbox.

    def _path(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{seg(self.id)}{tail}"

    def _call(self, method: str, tail: str = "", body: Optional[Dict[str, Any]] = None) -> Any:
        try:
            return self.capsule.http.call(method, self._path(tail), body)
        except Conflict as e:
            raise self._why_refused(e) from e

    def _why_refused(self, e: Conflict) -> CapsuleError:
        # An ended sandbox says why it ended.
        try:
            info = self.get_info()
        except CapsuleError:
            return e
        return ended(_raw(info)) if info.state == "ended" else e

    def get_info(self) -> SandboxInfo:
        """Its record now: state, labels, when it ends, why it ended."""
        self._info = SandboxInfo.from_api(self.capsule.http.call("GET", self._path()))
        return self._info

    def is_running(self) -> bool:
        return self.get_info().state == "running"

    def set_timeout(self, timeout: Optional[float]) -> SandboxInfo:
        """It expires ``timeout`` seconds from now (``None``: never)."""
        seconds = 0 if timeout is None else max(1, int(round(timeout)))
        return SandboxInfo.from_api(self._call("POST", "/timeout", {"timeout_seconds": seconds}))

    def set_labels(self, labels: Mapping[str, str]) -> SandboxInfo:
        """Replaces its labels."""
        return SandboxInfo.from_api(self._call("PATCH", "", {"labels": dict(labels)}))

    def suspend(self) -> SandboxInfo:
        """Writes its memory and disks to disk and stops its VM; the same
        id resumes where it was."""
        return SandboxInfo.from_api(self._call("POST", "/suspend"))

    def resume(self) -> SandboxInfo:
        """Brings a suspended sandbox back, in place."""
        return SandboxInfo.from_api(self._call("POST", "/resume"))

    def get_host(self, port: int) -> str:
        """Exposes the sandbox's TCP ``port`` (on its loopback) on the
        host's and returns the ``host:port`` that reaches it, e.g. for
        ``f"http://{sb.get_host(8000)}/"``. It stays exposed across suspend
        and resume until :meth:`unexpose` or the sandbox ends."""
        return str(self._call("POST", "/ports", {"port": int(port)})["address"])

    def ports(self) -> Dict[int, str]:
        """The exposed ports: guest port to host address."""
        return {int(p["port"]): str(p["address"]) for p in self._call("GET", "/ports")}

    def unexpose(self, port: int) -> None:
        """Stops exposing ``port`` (:class:`NotFound` if it was not)."""
        self._call("DELETE", f"/ports/{int(port)}")

    def snapshot(self, name: str) -> "Template":
        """Snapshots it (it carries on) as a template named ``name``, to
        :meth:`Template.fork` or create sandboxes from."""
        info = TemplateInfo.from_api(self._call("POST", "/snapshot", {"name": name}))
        return Template(info.name, self.capsule, info)

    def stats(self) -> SandboxStats:
        """What it uses of the host now: CPU time, memory, disk, uptime."""
        return SandboxStats.from_api(self._call("GET", "/stats"))

    def kill(self) -> None:
        """Ends it now (its record stays, ended with reason ``deleted``).
        Ending one that has already ended does nothing."""
        try:
            self.capsule.http.call("DELETE", self._path())
        except (Conflict, NotFound):
            pass

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.kill()


def _raw(info: SandboxInfo) -> Dict[str, Any]:
    ending = info.ended
    return {"id": info.id, "ended": None if ending is None else
            {"reason": ending.reason, "detail": ending.detail, "at": ending.at}}


class Commands:
    """Running commands in a sandbox: ``sandbox.commands``."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def run(self, cmd: Command, *, background: bool = False,
            envs: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
            user: Optional[str] = None, timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
            stdin: Union[str, bytes, None] = None, on_stdout: Optional[OutputCallback] = None,
            on_stderr: Optional[OutputCallback] = None) -> Any:
        """Runs ``cmd`` (a string runs in ``sh -c``; a list is the program
        and its arguments) and returns its :class:`CommandResult` (a
        non-zero exit status is a result, not an error).

        :param on_stdout: called with each piece of output as the guest
            produces it (likewise ``on_stderr``).
        :param timeout: seconds before it is killed in the sandbox
            (:class:`Timeout`, with ``.result``); ``None`` for no limit.
        :param stdin: text for its stdin, then end of file.
        :param background: return a :class:`CommandHandle` at once instead;
            its stdin stays open for :meth:`CommandHandle.send_stdin`.
        """
        handle = CommandHandle(self._sandbox, cmd, envs, cwd, user, timeout, stdin,
                               on_stdout, on_stderr, keep_stdin_open=background)
        if background:
            return handle
        return handle.wait()

    def spawn(self, cmd: Command, *, envs: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None, user: Optional[str] = None,
              timeout: Optional[float] = None) -> ProcessHandle:
        """Starts ``cmd`` detached: it runs on whatever happens to this
        client (stdin is ``/dev/null``), its output kept in the sandbox to
        read from any offset (:meth:`ProcessHandle.logs`, ``wait``).
        ``timeout`` (seconds) kills it in the sandbox; none by default."""
        body = _wire.exec_body(cmd, envs, cwd, user, timeout, None, False)
        info = ProcessInfo.from_api(self._sandbox._call("POST", "/processes", body))
        return ProcessHandle(self._sandbox, info.pid, cmd)

    def connect(self, pid: int) -> ProcessHandle:
        """A detached process started earlier (by this program or another)."""
        handle = ProcessHandle(self._sandbox, pid)
        handle.info()
        return handle

    def processes(self) -> List[ProcessInfo]:
        """The detached processes: running, and the latest that ended."""
        return [ProcessInfo.from_api(p) for p in self._sandbox._call("GET", "/processes")]

    def list(self) -> List[CommandInfo]:
        """The commands running in it now."""
        return [CommandInfo.from_api(c) for c in self._sandbox._call("GET", "/commands")]

    def kill(self, pid: int) -> None:
        """Kills a running command (SIGKILL to its process group)."""
        self.signal(pid, 9)

    def signal(self, pid: int, signal: int) -> None:
        self._sandbox._call("POST", f"/commands/{pid}/signal", {"signal": int(signal)})

    def send_stdin(self, pid: int, data: Union[str, bytes], *, eof: bool = False) -> None:
        """Writes to a background command's stdin (``eof`` closes it after)."""
        self._sandbox._call("POST", f"/commands/{pid}/stdin", _wire.stdin_body(data, eof))


class CommandHandle:
    """A command running in the background (``commands.run(...,
    background=True)``): its output streams to the callbacks, and to
    :attr:`stdout` and :attr:`stderr`, while the caller goes on."""

    def __init__(self, sandbox: Sandbox, cmd: Command, envs: Optional[Mapping[str, str]],
                 cwd: Optional[str], user: Optional[str], timeout: Optional[float],
                 stdin: Union[str, bytes, None], on_stdout: Optional[OutputCallback],
                 on_stderr: Optional[OutputCallback], keep_stdin_open: bool):
        self._sandbox = sandbox
        self.cmd = cmd
        self._decoder = _wire.ExecDecoder(cmd, on_stdout, on_stderr)
        self._started = threading.Event()
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        body = _wire.exec_body(cmd, envs, cwd, user, timeout, stdin, keep_stdin_open)
        # A command with a limit is quiet at most that long; one without
        # may be quiet as long as it likes.
        read_timeout = None if not timeout else timeout + 60
        self._thread = threading.Thread(target=self._stream, args=(body, read_timeout),
                                        name=f"capsule-exec-{sandbox.id}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None and self._decoder.pid is None:
            raise self._error

    def _stream(self, body: Dict[str, Any], read_timeout: Optional[float]) -> None:
        try:
            with self._sandbox.capsule.http.lines("POST", self._sandbox._path("/exec"), body,
                                                  read_timeout) as lines:
                for line in lines:
                    event = parse_line(line)
                    self._decoder.feed(event)
                    if event.get("type") == "started":
                        self._started.set()
                    if self._decoder.result is not None:
                        break
        except Conflict as e:
            self._error = self._sandbox._why_refused(e)
        except BaseException as e:  # handed to whoever waits
            self._error = e
        finally:
            self._started.set()
            self._done.set()

    @property
    def pid(self) -> Optional[int]:
        """The command's process id in the guest."""
        return self._decoder.pid

    @property
    def stdout(self) -> str:
        """What it has printed so far."""
        return "".join(self._decoder.stdout)

    @property
    def stderr(self) -> str:
        return "".join(self._decoder.stderr)

    @property
    def exit_code(self) -> Optional[int]:
        """Its exit status once it has ended, else ``None``."""
        return self._decoder.result.exit_code if self._decoder.result else None

    def wait(self, timeout: Optional[float] = None) -> CommandResult:
        """Waits for it to end (at most ``timeout`` seconds: then
        :class:`Timeout`, the command still running) and returns its result."""
        if not self._done.wait(timeout):
            raise Timeout(f"{_wire.describe(self.cmd)!r} still running after {timeout} s",
                          code="wait_timeout")
        if self._error is not None:
            raise self._error
        return self._decoder.finish()

    def kill(self) -> None:
        """Kills it (and its process group); :meth:`wait` then returns its
        result, ended by signal 9."""
        self.signal(9)

    def signal(self, signal: int) -> None:
        if self.pid is None or self._done.is_set():
            return
        try:
            self._sandbox.commands.signal(self.pid, signal)
        except NotFound:
            pass  # it has just ended

    def send_stdin(self, data: Union[str, bytes]) -> None:
        """Writes to its stdin."""
        self._require_pid()
        self._sandbox.commands.send_stdin(self.pid, data)  # type: ignore[arg-type]

    def close_stdin(self) -> None:
        """Closes its stdin (it reads end of file)."""
        self._require_pid()
        self._sandbox.commands.send_stdin(self.pid, b"", eof=True)  # type: ignore[arg-type]

    def _require_pid(self) -> None:
        if self.pid is None:
            raise SandboxFailed("the command has not started", code="not_started")


class Template:
    """A primed snapshot sandboxes are made from: built by
    :meth:`Template.create` (boot, run a command, snapshot) or by
    :meth:`Sandbox.snapshot`."""

    def __init__(self, name: str, capsule: Capsule, info: Optional[TemplateInfo] = None):
        self.name = name
        self.capsule = capsule
        self.info = info

    def __repr__(self) -> str:
        return f"Template({self.name!r})"

    @classmethod
    def create(cls, name: str, cmd: Optional[Command] = None, *, rootfs: Optional[str] = None,
               cpus: Optional[int] = None, memory_mib: Optional[int] = None,
               timeout: Optional[float] = None, capsule: Optional[Capsule] = None,
               **connection: Any) -> "Template":
        """Boots a VM, runs ``cmd`` in it (it must exit 0) and snapshots it."""
        return _capsule(capsule, connection).templates.create(
            name, cmd, rootfs=rootfs, cpus=cpus, memory_mib=memory_mib, timeout=timeout)

    @classmethod
    def get(cls, name: str, *, capsule: Optional[Capsule] = None,
            **connection: Any) -> "Template":
        return _capsule(capsule, connection).templates.get(name)

    @classmethod
    def list(cls, *, capsule: Optional[Capsule] = None,
             **connection: Any) -> List[TemplateInfo]:
        return _capsule(capsule, connection).templates.list()

    def create_sandbox(self, **kwargs: Any) -> Sandbox:
        """A sandbox restored from it (see :meth:`Sandbox.create`)."""
        return Sandbox.create(self.name, capsule=self.capsule, **kwargs)

    def fork(self, count: int, *, labels: Optional[Mapping[str, str]] = None,
             group: Optional[str] = None, timeout: Optional[float] = 300,
             envs: Optional[Mapping[str, str]] = None,
             secrets: Optional[Sequence[str]] = None,
             allow_partial: bool = False) -> List[Sandbox]:
        """``count`` sandboxes restored from it at once, each with its own
        identity. If any fails, the others are ended and
        :class:`SandboxFailed` raised, unless ``allow_partial``."""
        body = _wire.fork_body(count, labels, group, timeout, envs, secrets)
        forks = self.capsule.http.call("POST", f"/v1/templates/{seg(self.name)}/fork", body)
        records, error = _wire.fork_results(self.name, count, forks)
        made = [Sandbox(s["id"], self.capsule, SandboxInfo.from_api(s)) for s in records]
        if error is not None and not allow_partial:
            for sb in made:
                sb.kill()
            raise error
        return made

    def set_pool(self, warm: int) -> PoolStatus:
        """Keeps ``warm`` restored sandboxes of it ready."""
        return self.capsule.pools.set(self.name, warm)

    def delete(self) -> None:
        """Deletes it; sandboxes made from it carry on."""
        self.capsule.http.call("DELETE", f"/v1/templates/{seg(self.name)}")


#: A snapshot of a sandbox is a template.
Snapshot = Template


class Templates:
    """``capsule.templates``."""

    def __init__(self, capsule: Capsule):
        self._capsule = capsule

    def create(self, name: str, cmd: Optional[Command] = None, *, rootfs: Optional[str] = None,
               cpus: Optional[int] = None, memory_mib: Optional[int] = None,
               timeout: Optional[float] = None) -> Template:
        body = _wire.template_body(name, cmd, rootfs, cpus, memory_mib, timeout)
        info = TemplateInfo.from_api(self._capsule.http.call("POST", "/v1/templates", body))
        return Template(info.name, self._capsule, info)

    def get(self, name: str) -> Template:
        info = TemplateInfo.from_api(self._capsule.http.call("GET", f"/v1/templates/{seg(name)}"))
        return Template(info.name, self._capsule, info)

    def list(self) -> List[TemplateInfo]:
        return [TemplateInfo.from_api(t) for t in self._capsule.http.call("GET", "/v1/templates")]

    def delete(self, name: str) -> None:
        self._capsule.http.call("DELETE", f"/v1/templates/{seg(name)}")


class Pools:
    """``capsule.pools``: restored sandboxes of a template kept ready."""

    def __init__(self, capsule: Capsule):
        self._capsule = capsule

    def set(self, template: str, warm: int) -> PoolStatus:
        return PoolStatus.from_api(self._capsule.http.call(
            "PUT", f"/v1/pools/{seg(template)}", {"warm": warm}))

    def list(self) -> List[PoolStatus]:
        return [PoolStatus.from_api(p) for p in self._capsule.http.call("GET", "/v1/pools")]

    def delete(self, template: str) -> None:
        self._capsule.http.call("DELETE", f"/v1/pools/{seg(template)}")


class Groups:
    """``capsule.groups``: quotas (``None`` is unlimited)."""

    def __init__(self, capsule: Capsule):
        self._capsule = capsule

    def create(self, name: str, *, max_sandboxes: Optional[int] = None,
               max_vcpus: Optional[int] = None, max_memory_mib: Optional[int] = None) -> GroupInfo:
        quota = _wire.quota_body(max_sandboxes, max_vcpus, max_memory_mib)
        return GroupInfo.from_api(self._capsule.http.call(
            "POST", "/v1/groups", {"name": name, "quota": quota}))

    def get(self, name: str) -> GroupInfo:
        return GroupInfo.from_api(self._capsule.http.call("GET", f"/v1/groups/{seg(name)}"))

    def list(self) -> List[GroupInfo]:
        return [GroupInfo.from_api(g) for g in self._capsule.http.call("GET", "/v1/groups")]

    def set_quota(self, name: str, *, max_sandboxes: Optional[int] = None,
                  max_vcpus: Optional[int] = None,
                  max_memory_mib: Optional[int] = None) -> GroupInfo:
        return GroupInfo.from_api(self._capsule.http.call(
            "PUT", f"/v1/groups/{seg(name)}/quota",
            _wire.quota_body(max_sandboxes, max_vcpus, max_memory_mib)))

    def delete(self, name: str) -> None:
        self._capsule.http.call("DELETE", f"/v1/groups/{seg(name)}")


class Secrets:
    """``capsule.secrets``: write-only values a group's sandboxes get as
    environment variables."""

    def __init__(self, capsule: Capsule):
        self._capsule = capsule

    def set(self, group: str, name: str, value: str) -> None:
        """Sets it; the value is never shown again."""
        self._capsule.http.call("PUT", f"/v1/groups/{seg(group)}/secrets/{seg(name)}",
                                {"value": value})

    def list(self, group: str) -> List[SecretInfo]:
        """Names and dates, never values."""
        return [SecretInfo.from_api(s) for s in
                self._capsule.http.call("GET", f"/v1/groups/{seg(group)}/secrets")]

    def delete(self, group: str, name: str) -> None:
        self._capsule.http.call("DELETE", f"/v1/groups/{seg(group)}/secrets/{seg(name)}")


class Events:
    """``capsule.events``: what happened to sandboxes, in order."""

    def __init__(self, capsule: Capsule):
        self._capsule = capsule

    def list(self, after: int = 0, limit: Optional[int] = None) -> List[Event]:
        query = f"?after={after}" + (f"&limit={limit}" if limit else "")
        return [Event.from_api(e) for e in self._capsule.http.call("GET", f"/v1/events{query}")]

    def follow(self, after: int = 0) -> Iterator[Event]:
        """Events as they happen (server-sent events), from after ``after``;
        iterate, and stop when you like."""
        with self._capsule.http.lines("GET", f"/v1/events/stream?after={after}") as lines:
            kind = None
            for line in lines:
                kind, event = _wire.sse(kind, line)
                if event is not None:
                    yield event
