"""Detached processes: ``sb.commands.spawn(cmd)`` starts one that runs on
whatever happens to this client, and ``sb.commands.connect(pid)`` finds it
again, from this program or another::

    server = sb.commands.spawn("python3 -m http.server 8000")
    ...
    again = sb.commands.connect(server.pid)
    for chunk in again.logs(offset=0):
        print(chunk.stream, chunk.data)
    again.kill()

Its output is kept in the sandbox (the last 4 MiB of it) and can be read
from any offset, as often as wanted.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, AsyncIterator, Dict, Iterator, List, Optional

from ._http import parse_line
from ._wire import Command, ExecDecoder, OutputCallback, seg
from .models import CommandResult, LogChunk, ProcessInfo


def _logs_path(sandbox_id: str, pid: int, offset: int, follow: bool) -> str:
    flag = "true" if follow else "false"
    return (f"/v1/sandboxes/{seg(sandbox_id)}/processes/{pid}/logs"
            f"?offset={int(offset)}&follow={flag}")


def _chunk(line: Dict[str, Any]) -> Optional[LogChunk]:
    if line.get("type") in ("stdout", "stderr"):
        return LogChunk(line["type"], line["offset"], base64.b64decode(line["data"]))
    return None


def _decoded(decoder: ExecDecoder, line: Dict[str, Any]) -> None:
    if line.get("type") == "end":
        if not line.get("running"):
            decoder.feed({"type": "exit", "exit_code": line.get("exit_code"),
                          "signal": line.get("signal"), "timed_out": line.get("timed_out")})
    else:
        decoder.feed(line)


class ProcessHandle:
    """A detached process in a sandbox."""

    def __init__(self, sandbox: Any, pid: int, cmd: Optional[Command] = None):
        self._sandbox = sandbox
        self.pid = pid
        self._cmd = cmd if cmd is not None else f"process {pid}"

    def __repr__(self) -> str:
        return f"ProcessHandle(pid={self.pid})"

    def info(self) -> ProcessInfo:
        """Whether it runs, how it ended, how much it wrote."""
        return ProcessInfo.from_api(self._sandbox._call("GET", f"/processes/{self.pid}"))

    def logs(self, *, offset: int = 0, follow: bool = False) -> Iterator[LogChunk]:
        """Its output from ``offset`` (all that is kept by default); with
        ``follow``, as it comes until it exits. A first chunk that starts
        past ``offset`` means older output was dropped."""
        http = self._sandbox.capsule.http
        with http.lines("GET", _logs_path(self._sandbox.id, self.pid, offset, follow),
                        read_timeout=None) as lines:
            for line in lines:
                event = parse_line(line)
                if event.get("type") == "error":
                    _decoded(ExecDecoder(self._cmd, None, None), event)
                chunk = _chunk(event)
                if chunk is not None:
                    yield chunk

    def wait(self, *, on_stdout: Optional[OutputCallback] = None,
             on_stderr: Optional[OutputCallback] = None) -> CommandResult:
        """Follows it to its exit: its whole output (what is kept), to the
        callbacks as it comes, and how it ended."""
        decoder = ExecDecoder(self._cmd, on_stdout, on_stderr)
        http = self._sandbox.capsule.http
        with http.lines("GET", _logs_path(self._sandbox.id, self.pid, 0, True),
                        read_timeout=None) as lines:
            for line in lines:
                _decoded(decoder, parse_line(line))
        return decoder.finish()

    def signal(self, signal: int) -> None:
        self._sandbox._call("POST", f"/processes/{self.pid}/signal", {"signal": int(signal)})

    def kill(self) -> None:
        """SIGKILL to its process group."""
        self.signal(9)


class AsyncProcessHandle:
    """The async :class:`ProcessHandle`."""

    def __init__(self, sandbox: Any, pid: int, cmd: Optional[Command] = None):
        self._sandbox = sandbox
        self.pid = pid
        self._cmd = cmd if cmd is not None else f"process {pid}"

    async def info(self) -> ProcessInfo:
        return ProcessInfo.from_api(await self._sandbox._call("GET", f"/processes/{self.pid}"))

    async def logs(self, *, offset: int = 0, follow: bool = False) -> AsyncIterator[LogChunk]:
        http = self._sandbox.capsule.http
        async with http.lines("GET", _logs_path(self._sandbox.id, self.pid, offset, follow),
                              read_timeout=None) as lines:
            async for line in lines:
                event = parse_line(line)
                if event.get("type") == "error":
                    _decoded(ExecDecoder(self._cmd, None, None), event)
                chunk = _chunk(event)
                if chunk is not None:
                    yield chunk

    async def wait(self, *, on_stdout: Optional[OutputCallback] = None,
                   on_stderr: Optional[OutputCallback] = None) -> CommandResult:
        """Callbacks may be coroutine functions: each is awaited in order."""
        pending: List[Any] = []

        def deliver(callback: Optional[OutputCallback]) -> Optional[OutputCallback]:
            if callback is None:
                return None

            def call(text: str) -> None:
                out = callback(text)
                if asyncio.iscoroutine(out):
                    pending.append(out)
            return call
        decoder = ExecDecoder(self._cmd, deliver(on_stdout), deliver(on_stderr))
        http = self._sandbox.capsule.http
        async with http.lines("GET", _logs_path(self._sandbox.id, self.pid, 0, True),
                              read_timeout=None) as lines:
            async for line in lines:
                _decoded(decoder, parse_line(line))
                while pending:
                    await pending.pop(0)
        return decoder.finish()

    async def signal(self, signal: int) -> None:
        await self._sandbox._call("POST", f"/processes/{self.pid}/signal",
                                  {"signal": int(signal)})

    async def kill(self) -> None:
        await self.signal(9)
