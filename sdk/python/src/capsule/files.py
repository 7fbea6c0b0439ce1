"""Files in a sandbox: ``sb.files`` (:class:`Files`) and, with ``await``,
``AsyncSandbox.files`` (:class:`AsyncFiles`).

    sb.files.write("/work/a.txt", "hello\\n")
    assert sb.files.read("/work/a.txt") == "hello\\n"
    sb.files.upload("big.tar", "/work/big.tar")        # streamed, any size
    for e in sb.files.list("/work"):
        print(e.type, e.name, e.size)

Paths are absolute paths in the sandbox, resolved there. A path given as
``bytes`` may be any Linux name, UTF-8 or not. Errors carry the path:
:class:`~capsule.NotFound` (``file_not_found``),
:class:`~capsule.PermissionDenied`, :class:`~capsule.Conflict` (a
directory where a file was meant, a directory not empty),
:class:`~capsule.NoSpace`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import tarfile
import threading
from typing import IO, Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Union

from ._wire import seg
from ._http import parse_line
from .errors import NotFound, from_answer
from .models import EntryInfo, FilesystemEvent

Path = Union[str, bytes]
Data = Union[str, bytes, IO[bytes]]

#: Bytes per chunk of an upload from a file object.
CHUNK = 256 << 10


def _path_param(path: Path) -> Dict[str, str]:
    if isinstance(path, bytes):
        try:
            return {"path": path.decode("utf-8")}
        except UnicodeDecodeError:
            return {"path_b64": base64.b64encode(path).decode()}
    return {"path": os.fspath(path)}


def _body_path(path: Path) -> Any:
    param = _path_param(path)
    return param["path"] if "path" in param else {"b64": param["path_b64"]}


def _write_params(path: Path, mode: Optional[int], parents: bool) -> Dict[str, Any]:
    params: Dict[str, Any] = _path_param(path)
    if mode is not None:
        params["mode"] = format(mode, "o")
    if parents:
        params["parents"] = "true"
    return params


def _read_params(path: Path, offset: int, length: Optional[int]) -> Dict[str, Any]:
    params: Dict[str, Any] = _path_param(path)
    if offset:
        params["offset"] = offset
    if length is not None:
        params["length"] = length
    return params


def _chunks_of(f: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return
        yield chunk


LocalPath = Union[str, "os.PathLike[str]"]


class _IterReader(io.RawIOBase):
    """An iterator of byte chunks as a file object, for tarfile's streams."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _pack(local_dir: LocalPath, out: IO[bytes]) -> None:
    # Symlinks stay symlinks; modes and times travel in the headers.
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(os.fspath(local_dir), arcname=".")


def _unpack(source: IO[bytes], local_dir: LocalPath) -> None:
    os.makedirs(local_dir, exist_ok=True)
    with tarfile.open(fileobj=source, mode="r|") as tar:
        # The "tar" filter refuses members that would land outside
        # local_dir and keeps modes (Python 3.11.4 and later have it).
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(local_dir, filter="tar")
        else:  # pragma: no cover
            tar.extractall(local_dir)


def _in_thread(work: Callable[[], None]) -> "tuple[threading.Thread, List[BaseException]]":
    errors: List[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as e:  # noqa: B902 - reported to the caller
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _watch_params(path: Path, recursive: bool) -> Dict[str, Any]:
    params: Dict[str, Any] = _path_param(path)
    if recursive:
        params["recursive"] = "true"
    return params


def _watch_event(line: str) -> FilesystemEvent:
    event = parse_line(line)
    if event.get("type") == "error":
        # The watch ended (its directory went): the API's code says why.
        status = 404 if event.get("code") == "file_not_found" else 502
        raise from_answer(status, event)
    return FilesystemEvent.from_api(event)


class WatchHandle:
    """A directory being watched (``sb.files.watch_dir``): iterate it for
    events as they happen; ``close()`` (or leaving its ``with``) ends it."""

    def __init__(self, lines: Any):
        self._stack = contextlib.ExitStack()
        self._lines = self._stack.enter_context(lines)

    def __iter__(self) -> Iterator[FilesystemEvent]:
        for line in self._lines:
            yield _watch_event(line)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncWatchHandle:
    """The async :class:`WatchHandle`: ``async for`` its events."""

    def __init__(self, stack: contextlib.AsyncExitStack, lines: AsyncIterator[str]):
        self._stack = stack
        self._lines = lines

    async def __aiter__(self) -> AsyncIterator[FilesystemEvent]:
        async for line in self._lines:
            yield _watch_event(line)

    async def close(self) -> None:
        await self._stack.aclose()

    async def __aenter__(self) -> "AsyncWatchHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Files:
    """Files in one sandbox (``sb.files``)."""

    def __init__(self, sandbox: Any):
        self._sandbox = sandbox

    @property
    def _http(self) -> Any:
        return self._sandbox.capsule.http

    def _url(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{seg(self._sandbox.id)}/files{tail}"

    def read(self, path: Path, *, encoding: str = "utf-8") -> str:
        """The whole file as text."""
        return self.read_bytes(path).decode(encoding)

    def read_bytes(self, path: Path, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        """The file's bytes, from ``offset``, at most ``length``."""
        return b"".join(self.iter_bytes(path, offset=offset, length=length))

    def iter_bytes(self, path: Path, *, offset: int = 0,
                   length: Optional[int] = None) -> Iterator[bytes]:
        """The file's bytes as they arrive, never all in memory. A transfer
        cut short raises instead of ending early."""
        with self._http.chunks(self._url(), _read_params(path, offset, length)) as chunks:
            yield from chunks

    def download(self, path: Path, local_path: Union[str, "os.PathLike[str]"]) -> int:
        """Streams the file to ``local_path`` (written beside it and renamed
        into place, so it is never half there); returns its size."""
        local = os.fspath(local_path)
        temp = f"{local}.capsule-part-{os.getpid()}"
        total = 0
        try:
            with open(temp, "xb") as out:
                for chunk in self.iter_bytes(path):
                    out.write(chunk)
                    total += len(chunk)
            os.replace(temp, local)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return total

    def write(self, path: Path, data: Data, *, mode: Optional[int] = None,
              parents: bool = True) -> EntryInfo:
        """Writes the file whole (text, bytes, or a binary file object read
        in chunks); the old file stays until every byte is written. Missing
        parents are made unless ``parents=False``. ``mode`` like ``0o755``."""
        if isinstance(data, str):
            content: Any = data.encode()
        elif isinstance(data, bytes):
            content = data
        else:
            content = _chunks_of(data)
        answer = self._http.call("PUT", self._url(), params=_write_params(path, mode, parents),
                                 content=content)
        return EntryInfo.from_api(answer)

    def upload(self, local_path: Union[str, "os.PathLike[str]"], path: Path, *,
               mode: Optional[int] = None, parents: bool = True) -> EntryInfo:
        """Streams a local file into the sandbox, keeping its permission bits
        unless ``mode`` is given."""
        if mode is None:
            mode = os.stat(local_path).st_mode & 0o7777
        with open(local_path, "rb") as f:
            return self.write(path, f, mode=mode, parents=parents)

    def upload_dir(self, local_dir: LocalPath, path: Path) -> EntryInfo:
        """Copies a local directory tree into ``path`` in the sandbox (made
        if missing) as a tar stream, made as it is sent: modes, times and
        symlinks kept. Returns what ``path`` is then."""
        r, w = os.pipe()
        with os.fdopen(r, "rb") as source:
            def pack() -> None:
                with os.fdopen(w, "wb") as out:
                    _pack(local_dir, out)
            thread, errors = _in_thread(pack)
            answer = self._http.call("PUT", self._url("/archive"), params=_path_param(path),
                                     content=_chunks_of(source))
        thread.join()
        if errors:
            raise errors[0]
        return EntryInfo.from_api(answer)

    def download_dir(self, path: Path, local_dir: LocalPath) -> None:
        """Copies a directory tree out of the sandbox into ``local_dir``
        (made if missing), unpacked as it arrives; members that would land
        outside ``local_dir`` are refused."""
        with self._http.chunks(self._url("/archive"), _path_param(path)) as chunks:
            _unpack(io.BufferedReader(_IterReader(iter(chunks))), local_dir)

    def watch_dir(self, path: Path, *, recursive: bool = False) -> WatchHandle:
        """Watches a directory (and every directory under it, including
        ones made later, with ``recursive``): iterate the handle for
        :class:`~capsule.FilesystemEvent` objects in the order they
        happened. The watch is set when this returns."""
        return WatchHandle(self._http.lines("GET", self._url("/watch"), None,
                                            read_timeout=None,
                                            params=_watch_params(path, recursive)))

    def stat(self, path: Path) -> EntryInfo:
        """What ``path`` is (a final symlink is not followed)."""
        return EntryInfo.from_api(self._http.call("GET", self._url("/stat"),
                                                  params=_path_param(path)))

    get_info = stat

    def exists(self, path: Path) -> bool:
        try:
            self.stat(path)
            return True
        except NotFound:
            return False

    def list(self, path: Path, *, limit: Optional[int] = None) -> List[EntryInfo]:
        """A directory's entries in name order."""
        params = _path_param(path)
        if limit is not None:
            params["limit"] = str(limit)
        answer = self._http.call("GET", self._url("/list"), params=params)
        return [EntryInfo.from_api(e) for e in answer["entries"]]

    def make_dir(self, path: Path, *, parents: bool = True,
                 mode: Optional[int] = None) -> EntryInfo:
        """Makes a directory (and its parents; an existing one is then no error)."""
        body = {"path": _body_path(path), "parents": parents,
                "mode": None if mode is None else format(mode, "o")}
        return EntryInfo.from_api(self._http.call("POST", self._url("/mkdir"), body))

    def remove(self, path: Path, *, recursive: bool = False) -> None:
        """Removes a file or an empty directory; any directory with ``recursive``."""
        params = _path_param(path)
        if recursive:
            params["recursive"] = "true"
        self._http.call("DELETE", self._url(), params=params)

    def rename(self, old: Path, new: Path) -> EntryInfo:
        """Renames inside the sandbox, replacing a file at ``new``."""
        body = {"from": _body_path(old), "to": _body_path(new)}
        return EntryInfo.from_api(self._http.call("POST", self._url("/rename"), body))


class AsyncFiles:
    """The async :class:`Files` (``AsyncSandbox.files``)."""

    def __init__(self, sandbox: Any):
        self._sandbox = sandbox

    @property
    def _http(self) -> Any:
        return self._sandbox.capsule.http

    def _url(self, tail: str = "") -> str:
        return f"/v1/sandboxes/{seg(self._sandbox.id)}/files{tail}"

    async def read(self, path: Path, *, encoding: str = "utf-8") -> str:
        return (await self.read_bytes(path)).decode(encoding)

    async def read_bytes(self, path: Path, *, offset: int = 0,
                         length: Optional[int] = None) -> bytes:
        parts = [c async for c in self.iter_bytes(path, offset=offset, length=length)]
        return b"".join(parts)

    async def iter_bytes(self, path: Path, *, offset: int = 0,
                         length: Optional[int] = None) -> AsyncIterator[bytes]:
        async with self._http.chunks(self._url(), _read_params(path, offset, length)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def write(self, path: Path, data: Union[str, bytes], *, mode: Optional[int] = None,
                    parents: bool = True) -> EntryInfo:
        content = data.encode() if isinstance(data, str) else data
        answer = await self._http.call("PUT", self._url(),
                                       params=_write_params(path, mode, parents),
                                       content=content)
        return EntryInfo.from_api(answer)

    async def upload_dir(self, local_dir: LocalPath, path: Path) -> EntryInfo:
        """See :meth:`Files.upload_dir`."""
        r, w = os.pipe()
        with os.fdopen(r, "rb") as source:
            def pack() -> None:
                with os.fdopen(w, "wb") as out:
                    _pack(local_dir, out)
            thread, errors = _in_thread(pack)

            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    chunk = await asyncio.to_thread(source.read, CHUNK)
                    if not chunk:
                        return
                    yield chunk
            answer = await self._http.call("PUT", self._url("/archive"),
                                           params=_path_param(path), content=chunks())
        await asyncio.to_thread(thread.join)
        if errors:
            raise errors[0]
        return EntryInfo.from_api(answer)

    async def download_dir(self, path: Path, local_dir: LocalPath) -> None:
        """See :meth:`Files.download_dir`."""
        r, w = os.pipe()
        source = os.fdopen(r, "rb")

        def unpack() -> None:
            try:
                _unpack(source, local_dir)
            finally:
                # An unpacking that stops early stops the writes too.
                source.close()
        thread, errors = _in_thread(unpack)
        try:
            with os.fdopen(w, "wb") as out:
                async with self._http.chunks(self._url("/archive"),
                                             _path_param(path)) as chunks:
                    async for chunk in chunks:
                        await asyncio.to_thread(out.write, chunk)
        except BrokenPipeError:
            pass  # the unpacking stopped: its error is raised below
        finally:
            await asyncio.to_thread(thread.join)
        if errors:
            raise errors[0]

    async def watch_dir(self, path: Path, *, recursive: bool = False) -> AsyncWatchHandle:
        """See :meth:`Files.watch_dir`."""
        stack = contextlib.AsyncExitStack()
        lines = await stack.enter_async_context(
            self._http.lines("GET", self._url("/watch"), None, read_timeout=None,
                             params=_watch_params(path, recursive)))
        return AsyncWatchHandle(stack, lines)

    async def stat(self, path: Path) -> EntryInfo:
        return EntryInfo.from_api(await self._http.call("GET", self._url("/stat"),
                                                        params=_path_param(path)))

    get_info = stat

    async def exists(self, path: Path) -> bool:
        try:
            await self.stat(path)
            return True
        except NotFound:
            return False

    async def list(self, path: Path, *, limit: Optional[int] = None) -> List[EntryInfo]:
        params = _path_param(path)
        if limit is not None:
            params["limit"] = str(limit)
        answer = await self._http.call("GET", self._url("/list"), params=params)
        return [EntryInfo.from_api(e) for e in answer["entries"]]

    async def make_dir(self, path: Path, *, parents: bool = True,
                       mode: Optional[int] = None) -> EntryInfo:
        body = {"path": _body_path(path), "parents": parents,
                "mode": None if mode is None else format(mode, "o")}
        return EntryInfo.from_api(await self._http.call("POST", self._url("/mkdir"), body))

    async def remove(self, path: Path, *, recursive: bool = False) -> None:
        params = _path_param(path)
        if recursive:
            params["recursive"] = "true"
        await self._http.call("DELETE", self._url(), params=params)

    async def rename(self, old: Path, new: Path) -> EntryInfo:
        body = {"from": _body_path(old), "to": _body_path(new)}
        return EntryInfo.from_api(await self._http.call("POST", self._url("/rename"), body))
