"""What the sync and async clients share: request bodies, the exec
stream's decoding, paths. Neither does I/O here."""

from __future__ import annotations

import base64
import codecs
import json
import shlex
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union
from urllib.parse import quote

from .errors import CapsuleError, SandboxFailed, Timeout
from .models import CommandResult, Event

Command = Union[str, Sequence[str]]
OutputCallback = Callable[[str], Any]

#: A command's default time limit in seconds, as E2B's: it is killed in
#: the sandbox after this long. ``timeout=None`` means none.
DEFAULT_COMMAND_TIMEOUT = 60


def seg(text: str) -> str:
    """One path segment, escaped."""
    return quote(text, safe="")


def argv(cmd: Command) -> List[str]:
    """A string runs in ``sh -c``; a list is the program and its arguments."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    out = [str(a) for a in cmd]
    if not out:
        raise ValueError("cmd must name a program")
    return out


def describe(cmd: Command) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(argv(cmd))


def drop_none(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def create_body(template: Optional[str], rootfs: Optional[str], cpus: Optional[int],
                memory_mib: Optional[int], group: Optional[str],
                labels: Optional[Mapping[str, str]], timeout: Optional[float],
                envs: Optional[Mapping[str, str]], secrets: Optional[Sequence[str]],
                idle_suspend: Optional[float]) -> Dict[str, Any]:
    return drop_none({
        "template": template,
        "rootfs": rootfs,
        "cpus": cpus,
        "memory_mib": memory_mib,
        "group": group,
        "labels": dict(labels) if labels else None,
        # 0 is "never" in the API.
        "timeout_seconds": 0 if timeout is None else max(1, int(round(timeout))),
        "env": dict(envs) if envs else None,
        "secrets": list(secrets) if secrets else None,
        "idle_suspend_seconds": max(1, int(round(idle_suspend))) if idle_suspend else None,
    })


def exec_body(cmd: Command, envs: Optional[Mapping[str, str]], cwd: Optional[str],
              user: Optional[str], timeout: Optional[float], stdin: Union[str, bytes, None],
              keep_stdin_open: bool) -> Dict[str, Any]:
    if isinstance(stdin, bytes):
        stdin = stdin.decode()
    return drop_none({
        "cmd": argv(cmd),
        "env": dict(envs) if envs else None,
        "cwd": cwd,
        "user": user,
        "timeout_seconds": max(1, int(round(timeout))) if timeout else None,
        "stdin": stdin,
        "keep_stdin_open": True if keep_stdin_open else None,
    })


def list_path(labels: Optional[Mapping[str, str]], state: Union[str, Sequence[str], None],
              selector: Optional[str]) -> str:
    """GET /v1/sandboxes with its label selector and states."""
    if selector is None and labels:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
    params = drop_none({
        "label_selector": selector,
        "state": state if isinstance(state, str) or state is None else ",".join(state),
    })
    query = "&".join(f"{k}={seg(v)}" for k, v in params.items())
    return "/v1/sandboxes" + (f"?{query}" if query else "")


def template_body(name: str, cmd: Optional[Command], rootfs: Optional[str], cpus: Optional[int],
                  memory_mib: Optional[int], timeout: Optional[float]) -> Dict[str, Any]:
    return drop_none({
        "name": name, "cmd": argv(cmd) if cmd is not None else None,
        "rootfs": rootfs, "cpus": cpus, "memory_mib": memory_mib,
        "timeout_seconds": max(1, int(round(timeout))) if timeout else None,
    })


def quota_body(max_sandboxes: Optional[int], max_vcpus: Optional[int],
               max_memory_mib: Optional[int]) -> Dict[str, Any]:
    return drop_none({"max_sandboxes": max_sandboxes, "max_vcpus": max_vcpus,
                      "max_memory_mib": max_memory_mib})


def fork_body(count: int, labels: Optional[Mapping[str, str]], group: Optional[str],
              timeout: Optional[float], envs: Optional[Mapping[str, str]],
              secrets: Optional[Sequence[str]]) -> Dict[str, Any]:
    return drop_none({
        "count": count, "labels": dict(labels) if labels else None, "group": group,
        "timeout_seconds": 0 if timeout is None else max(1, int(round(timeout))),
        "env": dict(envs) if envs else None, "secrets": list(secrets) if secrets else None,
    })


def fork_results(name: str, count: int, forks: List[Dict[str, Any]]):
    """The forks' sandbox records, and the error for those that failed
    (``None`` if none did)."""
    made = [f["sandbox"] for f in forks if f.get("sandbox")]
    failed = [f["error"] for f in forks if f.get("error")]
    if not failed:
        return made, None
    return made, SandboxFailed(f"{len(failed)} of {count} forks of {name} failed: "
                               f"{failed[0].get('message')}",
                               code=str(failed[0].get("code", "sandbox_failed")))


def stdin_body(data: Union[str, bytes], eof: bool) -> Dict[str, Any]:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return {"data": base64.b64encode(raw).decode("ascii"), "eof": eof}


class ExecDecoder:
    """Turns the exec stream's lines into output (calling the callbacks as
    it comes) and, at the end, a :class:`CommandResult`."""

    def __init__(self, cmd: Command, on_stdout: Optional[OutputCallback],
                 on_stderr: Optional[OutputCallback]):
        self.cmd = cmd
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.pid: Optional[int] = None
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        # Output arrives in arbitrary chunks: a character may be split.
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }
        self.result: Optional[CommandResult] = None

    def feed(self, line: Dict[str, Any]) -> Optional[CommandResult]:
        """Takes one event; the result once the command has ended."""
        kind = line.get("type")
        if kind == "started":
            self.pid = line.get("pid")
        elif kind in ("stdout", "stderr"):
            text = self._decoders[kind].decode(base64.b64decode(line.get("data", "")))
            if text:
                self._emit(kind, text)
        elif kind == "exit":
            for name, decoder in self._decoders.items():
                tail = decoder.decode(b"", final=True)
                if tail:
                    self._emit(name, tail)
            self.result = CommandResult(
                exit_code=line.get("exit_code"), stdout="".join(self.stdout),
                stderr="".join(self.stderr), signal=line.get("signal"),
                timed_out=bool(line.get("timed_out")), pid=self.pid)
            return self.result
        elif kind == "error":
            raise SandboxFailed(
                f"the stream of {describe(self.cmd)!r} broke: {line.get('message')}",
                code=str(line.get("code", "lost")))
        return None

    def _emit(self, kind: str, text: str) -> None:
        (self.stdout if kind == "stdout" else self.stderr).append(text)
        callback = self.on_stdout if kind == "stdout" else self.on_stderr
        if callback is not None:
            callback(text)

    def finish(self) -> CommandResult:
        """The result, or the error for a stream that ended without one; a
        command its own timeout killed raises :class:`Timeout`."""
        if self.result is None:
            raise SandboxFailed(
                f"the stream of {describe(self.cmd)!r} ended without an exit status",
                code="lost")
        if self.result.timed_out:
            raise Timeout(f"{describe(self.cmd)!r} ran past its timeout and was killed",
                          code="command_timed_out", result=self.result)
        return self.result


def sse(kind: Optional[str], line: str):
    """One line of the event stream: the event kind it is under (``event:``
    comes before ``data:``) and the event, once its data has come."""
    if line.startswith("event:"):
        return line[6:].strip(), None
    if line.startswith("data:"):
        data = line[5:].strip()
        if kind == "error":
            raise CapsuleError(f"the event stream broke: {data}", code="events_lost")
        return kind, Event.from_api(json.loads(data))
    return kind, None
