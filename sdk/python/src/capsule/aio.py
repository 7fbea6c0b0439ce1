"""The asynchronous API: :class:`AsyncSandbox` and the rest, the same calls
as :mod:`capsule.sandbox` with ``await``::

    async with await AsyncSandbox.create(template="py") as sb:
        r = await sb.commands.run("echo hi", on_stdout=print)
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Dict, List, Mapping, Optional, Sequence, Union

from . import _wire
from ._config import Connection
from ._http import DEFAULT_REQUEST_TIMEOUT, AsyncHttp, parse_line
from ._wire import DEFAULT_COMMAND_TIMEOUT, Command, OutputCallback, seg
from .files import AsyncFiles
from .processes import AsyncProcessHandle
from .pty import AsyncPty
from .errors import CapsuleError, Conflict, NotFound, SandboxFailed, Timeout, ended
from .models import (CommandInfo, CommandResult, Event, GroupInfo, PoolStatus, ProcessInfo,
                     SandboxInfo, SandboxStats, SecretInfo, TemplateInfo)
from .sandbox import _raw


class AsyncCapsule:
    """A connection to the daemon (see :class:`capsule.Capsule`)."""

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None,
                 socket: Optional[str] = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.connection = Connection.resolve(url, token, socket)
        self.http = AsyncHttp(self.connection, request_timeout)
        self.templates = AsyncTemplates(self)
        self.pools = AsyncPools(self)
        self.groups = AsyncGroups(self)
        self.secrets = AsyncSecrets(self)
        self.events = AsyncEvents(self)

    async def create(self, template: Optional[str] = None, **kwargs: Any) -> "AsyncSandbox":
        return await AsyncSandbox.create(template, capsule=self, **kwargs)

    async def connect(self, sandbox_id: str) -> "AsyncSandbox":
        return await AsyncSandbox.connect(sandbox_id, capsule=self)

    async def list(self, labels: Optional[Mapping[str, str]] = None,
                   state: Union[str, Sequence[str], None] = None) -> List[SandboxInfo]:
        return await AsyncSandbox.list(labels=labels, state=state, capsule=self)

    async def close(self) -> None:
        await self.http.close()

    async def __aenter__(self) -> "AsyncCapsule":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _capsule(capsule: Optional[AsyncCapsule], conn: Dict[str, Any]) -> AsyncCapsule:
    return capsule if capsule is not None else AsyncCapsule(**conn)


class AsyncSandbox:
    """A sandbox, driven with ``await`` (see :class:`capsule.Sandbox`)."""

    def __init__(self, sandbox_id: str, capsule: AsyncCapsule,
                 info: Optional[SandboxInfo] = None):
        self.id = sandbox_id
        self.capsule = capsule
        self._info = info
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)

    @property
    def sandbox_id(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.id!r})"

    @classmethod
    async def create(cls, template: Optional[str] = None, *, rootfs: Optional[str] = None,
                     cpus: Optional[int] = None, memory_mib: Optional[int] = None,
                     group: Optional[str] = None, labels: Optional[Mapping[str, str]] = None,
                     timeout: Optional[float] = 300, envs: Optional[Mapping[str, str]] = None,
                     secrets: Optional[Sequence[str]] = None,
                     idle_suspend: Optional[float] = None,
                     capsule: Optional[AsyncCapsule] = None,
                     **connection: Any) -> "AsyncSandbox":
        """See :meth:`capsule.Sandbox.create`."""
        capsule = _capsule(capsule, connection)
        body = _wire.create_body(template, rootfs, cpus, memory_mib, group, labels, timeout,
                                 envs, secrets, idle_suspend)
        info = SandboxInfo.from_api(await capsule.http.call("POST", "/v1/sandboxes", body))
        return cls(info.id, capsule, info)

    @classmethod
    async def connect(cls, sandbox_id: str, *, capsule: Optional[AsyncCapsule] = None,
                      **connection: Any) -> "AsyncSandbox":
        capsule = _capsule(capsule, connection)
        info = SandboxInfo.from_api(
            await capsule.http.call("GET", f"/v1/sandboxes/{seg(sandbox_id)}"))
        return cls(info.id, capsule, info)

    @classmethod
    async def list(cls, labels: Optional[Mapping[str, str]] = None,
                   state: Union[str, Sequence[str], None] = None, *,
                   selector: Optional[str] = None, capsule: Optional[AsyncCapsule] = None,
                   **connection: Any) -> List[SandboxInfo]:
        capsule = _capsule(capsule, connection)
        answer = await capsule.http.call("GET", _wire.list_path(labels, state, selector))
        return [SandboxInfo.from_api(s) for s in answer]

    def _path(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{seg(self.id)}{tail}"

    async def _call(self, method: str, tail: str = "",
                    body: Optional[Dict[str, Any]] = None) -> Any:
        try:
            return await self.capsule.http.call(method, self._path(tail), body)
        except Conflict as e:
            raise await self._why_refused(e) from e

    async def _why_refused(self, e: Conflict) -> CapsuleError:
        try:
            info = await self.get_info()
        except CapsuleError:
            return e
        return ended(_raw(info)) if info.state == "ended" else e

    async def get_info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_api(await self.capsule.http.call("GET", self._path()))
        return self._info

    async def is_running(self) -> bool:
        return (await self.get_info()).state == "running"

    async def set_timeout(self, timeout: Optional[float]) -> SandboxInfo:
        seconds = 0 if timeout is None else max(1, int(round(timeout)))
        return SandboxInfo.from_api(
            await self._call("POST", "/timeout", {"timeout_seconds": seconds}))

    async def set_labels(self, labels: Mapping[str, str]) -> SandboxInfo:
        return SandboxInfo.from_api(await self._call("PATCH", "", {"labels": dict(labels)}))

    async def suspend(self) -> SandboxInfo:
        return SandboxInfo.from_api(await self._call("POST", "/suspend"))

    async def resume(self) -> SandboxInfo:
        return SandboxInfo.from_api(await self._call("POST", "/resume"))

    async def get_host(self, port: int) -> str:
        """See :meth:`capsule.Sandbox.get_host`."""
        return str((await self._call("POST", "/ports", {"port": int(port)}))["address"])

    async def ports(self) -> Dict[int, str]:
        return {int(p["port"]): str(p["address"]) for p in await self._call("GET", "/ports")}

    async def unexpose(self, port: int) -> None:
        await self._call("DELETE", f"/ports/{int(port)}")

    async def snapshot(self, name: str) -> "AsyncTemplate":
        info = TemplateInfo.from_api(await self._call("POST", "/snapshot", {"name": name}))
        return AsyncTemplate(info.name, self.capsule, info)

    async def stats(self) -> SandboxStats:
        return SandboxStats.from_api(await self._call("GET", "/stats"))

    async def kill(self) -> None:
        try:
            await self.capsule.http.call("DELETE", self._path())
        except (Conflict, NotFound):
            pass

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.kill()


class AsyncCommands:
    """``sandbox.commands`` (see :class:`capsule.sandbox.Commands`)."""

    def __init__(self, sandbox: AsyncSandbox):
        self._sandbox = sandbox

    async def run(self, cmd: Command, *, background: bool = False,
                  envs: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                  user: Optional[str] = None,
                  timeout: Optional[float] = DEFAULT_COMMAND_TIMEOUT,
                  stdin: Union[str, bytes, None] = None,
                  on_stdout: Optional[OutputCallback] = None,
                  on_stderr: Optional[OutputCallback] = None) -> Any:
        """See :meth:`capsule.sandbox.Commands.run`; callbacks may be
        coroutine functions."""
        handle = AsyncCommandHandle(self._sandbox, cmd, on_stdout, on_stderr)
        await handle._start(_wire.exec_body(cmd, envs, cwd, user, timeout, stdin, background),
                            None if not timeout else timeout + 60)
        if background:
            return handle
        return await handle.wait()

    async def spawn(self, cmd: Command, *, envs: Optional[Mapping[str, str]] = None,
                    cwd: Optional[str] = None, user: Optional[str] = None,
                    timeout: Optional[float] = None) -> AsyncProcessHandle:
        """See :meth:`capsule.sandbox.Commands.spawn`."""
        body = _wire.exec_body(cmd, envs, cwd, user, timeout, None, False)
        info = ProcessInfo.from_api(await self._sandbox._call("POST", "/processes", body))
        return AsyncProcessHandle(self._sandbox, info.pid, cmd)

    async def connect(self, pid: int) -> AsyncProcessHandle:
        handle = AsyncProcessHandle(self._sandbox, pid)
        await handle.info()
        return handle

    async def processes(self) -> List[ProcessInfo]:
        return [ProcessInfo.from_api(p) for p in await self._sandbox._call("GET", "/processes")]

    async def list(self) -> List[CommandInfo]:
        return [CommandInfo.from_api(c) for c in await self._sandbox._call("GET", "/commands")]

    async def kill(self, pid: int) -> None:
        await self.signal(pid, 9)

    async def signal(self, pid: int, signal: int) -> None:
        await self._sandbox._call("POST", f"/commands/{pid}/signal", {"signal": int(signal)})

    async def send_stdin(self, pid: int, data: Union[str, bytes], *, eof: bool = False) -> None:
        await self._sandbox._call("POST", f"/commands/{pid}/stdin", _wire.stdin_body(data, eof))


class AsyncCommandHandle:
    """A command running in the background (see
    :class:`capsule.sandbox.CommandHandle`)."""

    def __init__(self, sandbox: AsyncSandbox, cmd: Command,
                 on_stdout: Optional[OutputCallback], on_stderr: Optional[OutputCallback]):
        self._sandbox = sandbox
        self.cmd = cmd
        self._pending: List[Any] = []
        self._decoder = _wire.ExecDecoder(cmd, self._deliver(on_stdout),
                                          self._deliver(on_stderr))
        self._task: Optional["asyncio.Task[None]"] = None
        self._error: Optional[BaseException] = None

    def _deliver(self, callback: Optional[OutputCallback]) -> Optional[OutputCallback]:
        if callback is None:
            return None

        def deliver(text: str) -> None:
            out = callback(text)
            if asyncio.iscoroutine(out):
                self._pending.append(out)
        return deliver

    async def _start(self, body: Dict[str, Any], read_timeout: Optional[float]) -> None:
        started: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._stream(body, read_timeout, started))
        await started
        if self._error is not None and self._decoder.pid is None:
            raise self._error

    async def _stream(self, body: Dict[str, Any], read_timeout: Optional[float],
                      started: "asyncio.Future[None]") -> None:
        try:
            async with self._sandbox.capsule.http.lines(
                    "POST", self._sandbox._path("/exec"), body, read_timeout) as lines:
                async for line in lines:
                    event = parse_line(line)
                    self._decoder.feed(event)
                    while self._pending:
                        await self._pending.pop(0)
                    if event.get("type") == "started" and not started.done():
                        started.set_result(None)
                    if self._decoder.result is not None:
                        break
        except Conflict as e:
            self._error = await self._sandbox._why_refused(e)
        except BaseException as e:  # handed to whoever waits
            self._error = e
        finally:
            if not started.done():
                started.set_result(None)

    @property
    def pid(self) -> Optional[int]:
        return self._decoder.pid

    @property
    def stdout(self) -> str:
        return "".join(self._decoder.stdout)

    @property
    def stderr(self) -> str:
        return "".join(self._decoder.stderr)

    @property
    def exit_code(self) -> Optional[int]:
        return self._decoder.result.exit_code if self._decoder.result else None

    async def wait(self, timeout: Optional[float] = None) -> CommandResult:
        assert self._task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"{_wire.describe(self.cmd)!r} still running after {timeout} s",
                          code="wait_timeout") from None
        if self._error is not None:
            raise self._error
        return self._decoder.finish()

    async def kill(self) -> None:
        await self.signal(9)

    async def signal(self, signal: int) -> None:
        if self.pid is None or (self._task is not None and self._task.done()):
            return
        try:
            await self._sandbox.commands.signal(self.pid, signal)
        except NotFound:
            pass

    async def send_stdin(self, data: Union[str, bytes]) -> None:
        self._require_pid()
        await self._sandbox.commands.send_stdin(self.pid, data)  # type: ignore[arg-type]

    async def close_stdin(self) -> None:
        self._require_pid()
        await self._sandbox.commands.send_stdin(self.pid, b"", eof=True)  # type: ignore[arg-type]

    def _require_pid(self) -> None:
        if self.pid is None:
            raise SandboxFailed("the command has not started", code="not_started")


class AsyncTemplate:
    """A template (see :class:`capsule.Template`)."""

    def __init__(self, name: str, capsule: AsyncCapsule, info: Optional[TemplateInfo] = None):
        self.name = name
        self.capsule = capsule
        self.info = info

    def __repr__(self) -> str:
        return f"AsyncTemplate({self.name!r})"

    async def create_sandbox(self, **kwargs: Any) -> AsyncSandbox:
        return await AsyncSandbox.create(self.name, capsule=self.capsule, **kwargs)

    async def fork(self, count: int, *, labels: Optional[Mapping[str, str]] = None,
                   group: Optional[str] = None, timeout: Optional[float] = 300,
                   envs: Optional[Mapping[str, str]] = None,
                   secrets: Optional[Sequence[str]] = None,
                   allow_partial: bool = False) -> List[AsyncSandbox]:
        body = _wire.fork_body(count, labels, group, timeout, envs, secrets)
        forks = await self.capsule.http.call("POST", f"/v1/templates/{seg(self.name)}/fork",
                                             body)
        records, error = _wire.fork_results(self.name, count, forks)
        made = [AsyncSandbox(s["id"], self.capsule, SandboxInfo.from_api(s)) for s in records]
        if error is not None and not allow_partial:
            for sb in made:
                await sb.kill()
            raise error
        return made

    async def set_pool(self, warm: int) -> PoolStatus:
        return await self.capsule.pools.set(self.name, warm)

    async def delete(self) -> None:
        await self.capsule.http.call("DELETE", f"/v1/templates/{seg(self.name)}")


class AsyncTemplates:
    def __init__(self, capsule: AsyncCapsule):
        self._capsule = capsule

    async def create(self, name: str, cmd: Optional[Command] = None, *,
                     rootfs: Optional[str] = None, cpus: Optional[int] = None,
                     memory_mib: Optional[int] = None,
                     timeout: Optional[float] = None) -> AsyncTemplate:
        body = _wire.template_body(name, cmd, rootfs, cpus, memory_mib, timeout)
        info = TemplateInfo.from_api(await self._capsule.http.call("POST", "/v1/templates", body))
        return AsyncTemplate(info.name, self._capsule, info)

    async def get(self, name: str) -> AsyncTemplate:
        info = TemplateInfo.from_api(
            await self._capsule.http.call("GET", f"/v1/templates/{seg(name)}"))
        return AsyncTemplate(info.name, self._capsule, info)

    async def list(self) -> List[TemplateInfo]:
        return [TemplateInfo.from_api(t)
                for t in await self._capsule.http.call("GET", "/v1/templates")]

    async def delete(self, name: str) -> None:
        await self._capsule.http.call("DELETE", f"/v1/templates/{seg(name)}")


class AsyncPools:
    def __init__(self, capsule: AsyncCapsule):
        self._capsule = capsule

    async def set(self, template: str, warm: int) -> PoolStatus:
        return PoolStatus.from_api(await self._capsule.http.call(
            "PUT", f"/v1/pools/{seg(template)}", {"warm": warm}))

    async def list(self) -> List[PoolStatus]:
        return [PoolStatus.from_api(p) for p in await self._capsule.http.call("GET", "/v1/pools")]

    async def delete(self, template: str) -> None:
        await self._capsule.http.call("DELETE", f"/v1/pools/{seg(template)}")


class AsyncGroups:
    def __init__(self, capsule: AsyncCapsule):
        self._capsule = capsule

    async def create(self, name: str, *, max_sandboxes: Optional[int] = None,
                     max_vcpus: Optional[int] = None,
                     max_memory_mib: Optional[int] = None) -> GroupInfo:
        quota = _wire.quota_body(max_sandboxes, max_vcpus, max_memory_mib)
        return GroupInfo.from_api(await self._capsule.http.call(
            "POST", "/v1/groups", {"name": name, "quota": quota}))

    async def get(self, name: str) -> GroupInfo:
        return GroupInfo.from_api(
            await self._capsule.http.call("GET", f"/v1/groups/{seg(name)}"))

    async def list(self) -> List[GroupInfo]:
        return [GroupInfo.from_api(g) for g in await self._capsule.http.call("GET", "/v1/groups")]

    async def delete(self, name: str) -> None:
        await self._capsule.http.call("DELETE", f"/v1/groups/{seg(name)}")


class AsyncSecrets:
    def __init__(self, capsule: AsyncCapsule):
        self._capsule = capsule

    async def set(self, group: str, name: str, value: str) -> None:
        await self._capsule.http.call("PUT", f"/v1/groups/{seg(group)}/secrets/{seg(name)}",
                                      {"value": value})

    async def list(self, group: str) -> List[SecretInfo]:
        return [SecretInfo.from_api(s) for s in
                await self._capsule.http.call("GET", f"/v1/groups/{seg(group)}/secrets")]

    async def delete(self, group: str, name: str) -> None:
        await self._capsule.http.call("DELETE",
                                      f"/v1/groups/{seg(group)}/secrets/{seg(name)}")


class AsyncEvents:
    def __init__(self, capsule: AsyncCapsule):
        self._capsule = capsule

    async def list(self, after: int = 0, limit: Optional[int] = None) -> List[Event]:
        query = f"?after={after}" + (f"&limit={limit}" if limit else "")
        return [Event.from_api(e)
                for e in await self._capsule.http.call("GET", f"/v1/events{query}")]

    async def follow(self, after: int = 0) -> AsyncIterator[Event]:
        async with self._capsule.http.lines("GET", f"/v1/events/stream?after={after}") as lines:
            kind = None
            async for line in lines:
                kind, event = _wire.sse(kind, line)
                if event is not None:
                    yield event
