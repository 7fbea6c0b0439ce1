"""Capsule's Python SDK: isolated KVM microVM sandboxes, driven through the
Capsule daemon's HTTP API (``capsule serve``).

    from capsule import Sandbox

    with Sandbox.create(template="py", timeout=600, labels={"owner": "alice"}) as sb:
        r = sb.commands.run("python3 -c 'print(6*7)'", on_stdout=print, timeout=30)
        assert r.exit_code == 0 and r.stdout == "42\\n"

The daemon is found through ``CAPSULE_URL`` and ``CAPSULE_TOKEN`` (a TCP
daemon started with ``--listen``), else its Unix socket
(``CAPSULE_SOCKET``, default ``$CAPSULE_HOME/api.sock``). Errors are
:class:`CapsuleError` subclasses carrying the API's code. The same API with
``await`` is in :mod:`capsule.aio` (:class:`AsyncSandbox`).
"""

from .aio import AsyncCapsule, AsyncCommandHandle, AsyncSandbox, AsyncTemplate
from .errors import (BadRequest, CapsuleError, Conflict, DaemonUnavailable, NoSpace, NotFound,
                     PermissionDenied, QuotaExceeded, SandboxEnded, SandboxFailed, Timeout,
                     Unauthorized)
from .files import AsyncFiles, AsyncWatchHandle, Files, WatchHandle
from .models import (CommandInfo, CommandResult, EntryInfo, Ending, Event, FilesystemEvent,
                     GroupInfo, LogChunk, PoolStatus, ProcessInfo, SandboxInfo, SandboxStats,
                     SecretInfo, TemplateInfo)
from .processes import AsyncProcessHandle, ProcessHandle
from .pty import AsyncPty, AsyncPtySession, Pty, PtySession
from .sandbox import Capsule, CommandHandle, Commands, Sandbox, Snapshot, Template

__version__ = "0.1.0"

__all__ = [
    "AsyncPty", "AsyncPtySession", "Pty", "PtySession",
    "AsyncCapsule", "AsyncCommandHandle", "AsyncFiles", "AsyncSandbox", "AsyncTemplate",
    "AsyncWatchHandle", "FilesystemEvent", "WatchHandle", "AsyncProcessHandle", "ProcessHandle",
    "ProcessInfo", "LogChunk",
    "BadRequest", "Capsule", "CapsuleError", "CommandHandle", "CommandInfo", "CommandResult",
    "Commands", "Conflict", "DaemonUnavailable", "Ending", "EntryInfo", "Event", "Files",
    "GroupInfo", "NoSpace", "NotFound", "PermissionDenied", "PoolStatus", "QuotaExceeded", "Sandbox", "SandboxEnded", "SandboxFailed", "SandboxInfo",
    "SandboxStats", "SecretInfo", "Snapshot", "Template", "TemplateInfo", "Timeout",
    "Unauthorized",
]
