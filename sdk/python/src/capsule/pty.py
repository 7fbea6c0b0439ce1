"""Interactive terminals: ``sb.pty.create()`` runs a program (a login shell
by default) on a pseudo-terminal in the sandbox, over the daemon's
``/pty`` WebSocket::

    term = sb.pty.create(cols=80, rows=24, on_data=lambda b: print(b.decode(), end=""))
    term.send("ls -l\\n")
    term.resize(cols=120, rows=40)
    term.send(b"\\x03")            # Ctrl-C: SIGINT for the foreground job
    term.send("exit\\n")
    code = term.wait()             # the program's exit status

Output is the terminal's (stdout and stderr together, with its line
endings). Without ``on_data``, read it with :meth:`PtySession.read`; a
reader that falls behind holds the program back, never memory. Closing
the session (or leaving its ``with`` block) hangs the terminal up, as
closing a terminal window does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Union

from .errors import BadRequest, CapsuleError, SandboxFailed, Timeout, from_answer
from ._wire import seg

DataCallback = Callable[[bytes], Any]
AsyncDataCallback = Callable[[bytes], Union[Awaitable[Any], Any]]

#: Output chunks held for :meth:`PtySession.read` before the program waits.
_BUFFERED = 256


def _start(cmd: Union[str, List[str], None], cols: int, rows: int,
           envs: Optional[Mapping[str, str]], cwd: Optional[str], user: Optional[str],
           timeout: Optional[float]) -> Dict[str, Any]:
    start: Dict[str, Any] = {"cols": int(cols), "rows": int(rows)}
    if cmd is not None:
        start["cmd"] = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if envs:
        start["env"] = dict(envs)
    if cwd is not None:
        start["cwd"] = cwd
    if user is not None:
        start["user"] = user
    if timeout is not None:
        start["timeout_seconds"] = max(1, int(round(timeout)))
    return start


def _ws_target(conn: Any, path: str) -> Dict[str, Any]:
    """Where the WebSocket goes: the daemon's socket, or its TCP URL with
    the token."""
    if conn.socket:
        return {"unix": conn.socket, "uri": f"ws://capsule{path}", "headers": {}}
    base = conn.url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return {"unix": None, "uri": base + path, "headers": dict(conn.headers)}


def _refusal(e: Exception) -> CapsuleError:
    """A refused upgrade as the API's typed error."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if status is None:
        return SandboxFailed(f"the terminal session could not be opened: {e}", code="lost")
    try:
        body: Any = json.loads(bytes(response.body or b"").decode() or "null")
    except ValueError:
        body = bytes(response.body or b"").decode(errors="replace")
    return from_answer(status, body)


def _event(message: Union[str, bytes]) -> Optional[Dict[str, Any]]:
    if isinstance(message, bytes):
        return None
    try:
        return json.loads(message)
    except ValueError:
        return {"type": "error", "code": "lost", "message": f"the daemon sent {message!r}"}


def _failure(event: Dict[str, Any]) -> CapsuleError:
    """An error message on the socket: the request's fault, or the sandbox's."""
    message = str(event.get("message", "the terminal session failed"))
    code = str(event.get("code", "lost"))
    if code == "bad_request":
        return BadRequest(message, code=code)
    return SandboxFailed(message, code=code)


def _exit_status(exit: Optional[Dict[str, Any]], error: Optional[CapsuleError]) -> int:
    """A finished session's status (128 + the signal if one killed it), or
    why there is none."""
    if exit is None:
        raise error or SandboxFailed("the terminal session ended without an exit status",
                                     code="lost")
    code = exit.get("exit_code")
    if code is None:
        code = 128 + int(exit.get("signal") or 127)
    return int(code)


class PtySession:
    """A program on a terminal in a sandbox (see :mod:`capsule.pty`)."""

    def __init__(self, socket: Any, pid: int, on_data: Optional[DataCallback],
                 scope: contextlib.ExitStack):
        self._socket = socket
        self._scope = scope
        self.pid = pid
        self._on_data = on_data
        self._output: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=_BUFFERED)
        self._done = threading.Event()
        self._exit: Optional[Dict[str, Any]] = None
        self._error: Optional[CapsuleError] = None
        self._reader = threading.Thread(target=self._read_loop, name="capsule-pty", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"PtySession(pid={self.pid})"

    def _read_loop(self) -> None:
        try:
            for message in self._socket:
                event = _event(message)
                if event is None:
                    if self._on_data is not None:
                        self._on_data(message)
                    else:
                        self._output.put(message)
                elif event.get("type") == "exit":
                    self._exit = event
                elif event.get("type") == "error":
                    self._error = _failure(event)
        except Exception as e:  # the connection broke
            if self._exit is None and self._error is None:
                self._error = SandboxFailed(f"the terminal session broke: {e}", code="lost")
        finally:
            self._done.set()
            if self._on_data is None:
                self._output.put(None)

    def send(self, data: Union[str, bytes]) -> None:
        """Keystrokes (text is sent as UTF-8): ``"\\x03"`` is Ctrl-C,
        ``"\\x04"`` Ctrl-D."""
        self._socket.send(data.encode() if isinstance(data, str) else bytes(data))

    def resize(self, cols: int, rows: int) -> None:
        """The terminal's new size; the program gets SIGWINCH."""
        self._socket.send(json.dumps({"type": "resize", "cols": int(cols), "rows": int(rows)}))

    def signal(self, signal: int) -> None:
        """A signal for the program's process group."""
        self._socket.send(json.dumps({"type": "signal", "signal": int(signal)}))

    def kill(self) -> None:
        """SIGKILL for the program; :meth:`wait` then returns 137."""
        self.signal(9)

    def read(self, timeout: Optional[float] = None) -> bytes:
        """The next output (only without ``on_data``); ``b""`` once the
        session is over. :class:`Timeout` if nothing came in ``timeout``
        seconds."""
        try:
            chunk = self._output.get(timeout=timeout)
        except queue.Empty:
            raise Timeout(f"no terminal output within {timeout}s") from None
        if chunk is None:
            self._output.put(None)
            return b""
        return chunk

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for the program to end and returns its exit status (128 +
        the signal if one killed it)."""
        if not self._done.wait(timeout):
            raise Timeout(f"the terminal's program still runs after {timeout}s")
        return _exit_status(self._exit, self._error)

    def close(self) -> None:
        """Hangs the terminal up (SIGHUP to its program)."""
        self._scope.close()

    def __enter__(self) -> "PtySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Pty:
    """Terminals in a sandbox: ``sandbox.pty``."""

    def __init__(self, sandbox: Any):
        self._sandbox = sandbox

    def create(self, cols: int = 80, rows: int = 24, *, cmd: Union[str, List[str], None] = None,
               on_data: Optional[DataCallback] = None, envs: Optional[Mapping[str, str]] = None,
               cwd: Optional[str] = None, user: Optional[str] = None,
               timeout: Optional[float] = None) -> PtySession:
        """Starts ``cmd`` (default: a login shell, bash if the sandbox has
        it) on a new ``cols`` x ``rows`` terminal. ``on_data`` gets its
        output as it comes, on a thread of the session's."""
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect, unix_connect

        conn = self._sandbox.capsule.http.conn
        target = _ws_target(conn, f"/v1/sandboxes/{seg(self._sandbox.id)}/pty")
        # Entered as a context (websockets wants that), left by close().
        scope = contextlib.ExitStack()
        try:
            if target["unix"]:
                socket = scope.enter_context(
                    unix_connect(target["unix"], target["uri"], open_timeout=30))
            else:
                socket = scope.enter_context(
                    connect(target["uri"], additional_headers=target["headers"],
                            open_timeout=30))
        except InvalidStatus as e:
            raise _refusal(e) from e
        except OSError as e:
            raise SandboxFailed(f"cannot reach the daemon for a terminal: {e}",
                                code="lost") from e
        try:
            socket.send(json.dumps(_start(cmd, cols, rows, envs, cwd, user, timeout)))
            first = _event(socket.recv(timeout=60))
        except Exception as e:
            scope.close()
            raise SandboxFailed(f"the terminal session broke: {e}", code="lost") from e
        if not first or first.get("type") != "started":
            scope.close()
            raise _failure(first or {})
        return PtySession(socket, int(first["pid"]), on_data, scope)


class AsyncPtySession:
    """A program on a terminal, driven with ``await`` (see :class:`PtySession`)."""

    def __init__(self, socket: Any, pid: int, on_data: Optional[AsyncDataCallback]):
        self._socket = socket
        self.pid = pid
        self._on_data = on_data
        self._output: "asyncio.Queue[Optional[bytes]]" = asyncio.Queue(maxsize=_BUFFERED)
        self._exit: Optional[Dict[str, Any]] = None
        self._error: Optional[CapsuleError] = None
        self._reader = asyncio.ensure_future(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            async for message in self._socket:
                event = _event(message)
                if event is None:
                    if self._on_data is not None:
                        result = self._on_data(message)
                        if asyncio.iscoroutine(result):
                            await result
                    else:
                        await self._output.put(message)
                elif event.get("type") == "exit":
                    self._exit = event
                elif event.get("type") == "error":
                    self._error = _failure(event)
        except Exception as e:
            if self._exit is None and self._error is None:
                self._error = SandboxFailed(f"the terminal session broke: {e}", code="lost")
        finally:
            if self._on_data is None:
                await self._output.put(None)

    async def send(self, data: Union[str, bytes]) -> None:
        await self._socket.send(data.encode() if isinstance(data, str) else bytes(data))

    async def resize(self, cols: int, rows: int) -> None:
        await self._socket.send(json.dumps({"type": "resize", "cols": int(cols),
                                            "rows": int(rows)}))

    async def signal(self, signal: int) -> None:
        await self._socket.send(json.dumps({"type": "signal", "signal": int(signal)}))

    async def kill(self) -> None:
        await self.signal(9)

    async def read(self, timeout: Optional[float] = None) -> bytes:
        try:
            chunk = await asyncio.wait_for(self._output.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no terminal output within {timeout}s") from None
        if chunk is None:
            await self._output.put(None)
            return b""
        return chunk

    async def wait(self, timeout: Optional[float] = None) -> int:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"the terminal's program still runs after {timeout}s") from None
        return _exit_status(self._exit, self._error)

    async def close(self) -> None:
        await self._socket.close()

    async def __aenter__(self) -> "AsyncPtySession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncPty:
    """Terminals in a sandbox: ``sandbox.pty`` of an :class:`capsule.AsyncSandbox`."""

    def __init__(self, sandbox: Any):
        self._sandbox = sandbox

    async def create(self, cols: int = 80, rows: int = 24, *,
                     cmd: Union[str, List[str], None] = None,
                     on_data: Optional[AsyncDataCallback] = None,
                     envs: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                     user: Optional[str] = None,
                     timeout: Optional[float] = None) -> AsyncPtySession:
        """See :meth:`Pty.create`; ``on_data`` may be a coroutine function."""
        from websockets.asyncio.client import connect, unix_connect
        from websockets.exceptions import InvalidStatus

        conn = self._sandbox.capsule.http.conn
        target = _ws_target(conn, f"/v1/sandboxes/{seg(self._sandbox.id)}/pty")
        try:
            if target["unix"]:
                socket = await unix_connect(target["unix"], target["uri"], open_timeout=30)
            else:
                socket = await connect(target["uri"], additional_headers=target["headers"],
                                       open_timeout=30)
        except InvalidStatus as e:
            raise _refusal(e) from e
        except OSError as e:
            raise SandboxFailed(f"cannot reach the daemon for a terminal: {e}",
                                code="lost") from e
        try:
            await socket.send(json.dumps(_start(cmd, cols, rows, envs, cwd, user, timeout)))
            first = _event(await asyncio.wait_for(socket.recv(), 60))
        except Exception as e:
            await socket.close()
            raise SandboxFailed(f"the terminal session broke: {e}", code="lost") from e
        if not first or first.get("type") != "started":
            await socket.close()
            raise _failure(first or {})
        return AsyncPtySession(socket, int(first["pid"]), on_data)
