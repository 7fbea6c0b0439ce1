"""Requests to the daemon, sync and async: errors mapped in one place."""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Dict, Iterator, Optional

import httpx

from ._config import Connection
from .errors import DaemonUnavailable, Timeout, from_answer

#: How long a request may take by default: creates, suspends and template
#: builds wait for VM work, which is seconds (minutes on slow hosts).
DEFAULT_REQUEST_TIMEOUT = 600.0


def _body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def _unreachable(conn: Connection, e: Exception) -> DaemonUnavailable:
    return DaemonUnavailable(
        f"cannot reach the daemon at {conn.describe()} ({e}); start it with `capsule serve`",
        code="no_daemon")


def _timed_out(what: str, e: Exception) -> Timeout:
    return Timeout(f"{what}: the daemon did not answer in time ({e})", code="request_timeout")


def _timeout(request_timeout: float, read: Optional[float] = -1.0) -> httpx.Timeout:
    # A stream may be quiet as long as its command is: `read` sets that.
    return httpx.Timeout(request_timeout, connect=10.0,
                         read=request_timeout if read == -1.0 else read)


class Http:
    """The sync side."""

    def __init__(self, conn: Connection, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.conn = conn
        self.request_timeout = request_timeout
        self.client = httpx.Client(base_url=conn.base_url, transport=conn.sync_transport(),
                                   headers=conn.headers, timeout=_timeout(request_timeout))

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e
        if response.status_code >= 400:
            raise from_answer(response.status_code, _body(response))
        return _body(response)

    @contextlib.contextmanager
    def lines(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
              read_timeout: Optional[float] = None) -> Iterator[Iterator[str]]:
        """A streamed answer's lines; refusals raise before the first."""
        try:
            with self.client.stream(method, path, json=body,
                                    timeout=_timeout(self.request_timeout, read_timeout)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise from_answer(r.status_code, _body(r))
                yield _guarded(r.iter_lines(), method, path, self.conn)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e

    def close(self) -> None:
        self.client.close()


def _guarded(lines: Iterator[str], method: str, path: str, conn: Connection) -> Iterator[str]:
    try:
        for line in lines:
            if line:
                yield line
    except httpx.TimeoutException as e:
        raise _timed_out(f"{method} {path}", e) from e
    except httpx.TransportError as e:
        raise _unreachable(conn, e) from e


class AsyncHttp:
    """The async side, the same calls."""

    def __init__(self, conn: Connection, request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self.conn = conn
        self.request_timeout = request_timeout
        self.client = httpx.AsyncClient(base_url=conn.base_url,
                                        transport=conn.async_transport(),
                                        headers=conn.headers, timeout=_timeout(request_timeout))

    async def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        try:
            response = await self.client.request(method, path, json=body)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e
        if response.status_code >= 400:
            raise from_answer(response.status_code, _body(response))
        return _body(response)

    @contextlib.asynccontextmanager
    async def lines(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                    read_timeout: Optional[float] = None) -> AsyncIterator[AsyncIterator[str]]:
        try:
            async with self.client.stream(
                    method, path, json=body,
                    timeout=_timeout(self.request_timeout, read_timeout)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise from_answer(r.status_code, _body(r))
                yield _aguarded(r.aiter_lines(), method, path, self.conn)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e

    async def close(self) -> None:
        await self.client.aclose()


async def _aguarded(lines: AsyncIterator[str], method: str, path: str,
                    conn: Connection) -> AsyncIterator[str]:
    try:
        async for line in lines:
            if line:
                yield line
    except httpx.TimeoutException as e:
        raise _timed_out(f"{method} {path}", e) from e
    except httpx.TransportError as e:
        raise _unreachable(conn, e) from e


def parse_line(line: str) -> Dict[str, Any]:
    return json.loads(line)
