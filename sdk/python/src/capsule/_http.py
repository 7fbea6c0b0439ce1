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

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
             params: Optional[Dict[str, Any]] = None, content: Any = None) -> Any:
        """One request; ``content`` (bytes or an iterator of them) is sent
        as an octet stream instead of a JSON ``body``."""
        try:
            response = self.client.request(method, path, json=body, params=params,
                                           content=content, headers=_content_headers(content))
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e
        if response.status_code >= 400:
            raise from_answer(response.status_code, _body(response))
        return _body(response)

    @contextlib.contextmanager
    def lines(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
              read_timeout: Optional[float] = None,
              params: Optional[Dict[str, Any]] = None) -> Iterator[Iterator[str]]:
        """A streamed answer's lines; refusals raise before the first."""
        try:
            with self.client.stream(method, path, json=body, params=params,
                                    timeout=_timeout(self.request_timeout, read_timeout)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise from_answer(r.status_code, _body(r))
                yield _guarded(r.iter_lines(), method, path, self.conn)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e

    @contextlib.contextmanager
    def chunks(self, path: str, params: Dict[str, Any]) -> Iterator["Chunks"]:
        """A streamed download: its ``X-File-Size`` and its bytes as they
        come; refusals raise before the first."""
        try:
            with self.client.stream("GET", path, params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    raise from_answer(r.status_code, _body(r))
                yield Chunks(_size(r), _guarded_bytes(r.iter_bytes(), path, self.conn))
        except httpx.TimeoutException as e:
            raise _timed_out(f"GET {path}", e) from e
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

    async def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                   params: Optional[Dict[str, Any]] = None, content: Any = None) -> Any:
        try:
            response = await self.client.request(method, path, json=body, params=params,
                                                 content=content,
                                                 headers=_content_headers(content))
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e
        if response.status_code >= 400:
            raise from_answer(response.status_code, _body(response))
        return _body(response)

    @contextlib.asynccontextmanager
    async def lines(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
                    read_timeout: Optional[float] = None,
                    params: Optional[Dict[str, Any]] = None
                    ) -> AsyncIterator[AsyncIterator[str]]:
        try:
            async with self.client.stream(
                    method, path, json=body, params=params,
                    timeout=_timeout(self.request_timeout, read_timeout)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise from_answer(r.status_code, _body(r))
                yield _aguarded(r.aiter_lines(), method, path, self.conn)
        except httpx.TimeoutException as e:
            raise _timed_out(f"{method} {path}", e) from e
        except httpx.TransportError as e:
            raise _unreachable(self.conn, e) from e

    @contextlib.asynccontextmanager
    async def chunks(self, path: str, params: Dict[str, Any]) -> AsyncIterator["AsyncChunks"]:
        try:
            async with self.client.stream("GET", path, params=params) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise from_answer(r.status_code, _body(r))
                yield AsyncChunks(_size(r), _aguarded_bytes(r.aiter_bytes(), path, self.conn))
        except httpx.TimeoutException as e:
            raise _timed_out(f"GET {path}", e) from e
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


def _content_headers(content: Any) -> Optional[Dict[str, str]]:
    return None if content is None else {"content-type": "application/octet-stream"}


def _size(r: httpx.Response) -> Optional[int]:
    try:
        return int(r.headers["x-file-size"])
    except (KeyError, ValueError):
        return None


class Chunks:
    """A download under way: ``size`` (when it began) and its bytes."""

    def __init__(self, size: Optional[int], chunks: Iterator[bytes]):
        self.size = size
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks


class AsyncChunks:
    """The async :class:`Chunks`."""

    def __init__(self, size: Optional[int], chunks: AsyncIterator[bytes]):
        self.size = size
        self.chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.chunks


def _guarded_bytes(chunks: Iterator[bytes], path: str, conn: Connection) -> Iterator[bytes]:
    try:
        yield from chunks
    except httpx.TimeoutException as e:
        raise _timed_out(f"GET {path}", e) from e
    except httpx.TransportError as e:
        raise _unreachable(conn, e) from e


async def _aguarded_bytes(chunks: AsyncIterator[bytes], path: str,
                          conn: Connection) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.TimeoutException as e:
        raise _timed_out(f"GET {path}", e) from e
    except httpx.TransportError as e:
        raise _unreachable(conn, e) from e


def parse_line(line: str) -> Dict[str, Any]:
    return json.loads(line)
