"""What the API returns, as typed objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass(frozen=True)
class Ending:
    """Why and when a sandbox ended."""

    reason: str
    detail: str
    at: str


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the daemon knows it."""

    id: str
    state: str
    group: str
    cpus: int
    memory_mib: int
    labels: Dict[str, str]
    created_at: str
    end_at: Optional[str]
    ended: Optional[Ending]
    secrets: List[str]
    env: Dict[str, str]
    idle_suspend_seconds: Optional[int]

    @classmethod
    def from_api(cls, s: Dict[str, Any]) -> "SandboxInfo":
        e = s.get("ended")
        return cls(
            id=s["id"], state=s["state"], group=s["group"], cpus=s["cpus"],
            memory_mib=s["memory_mib"], labels=dict(s.get("labels") or {}),
            created_at=s["created_at"], end_at=s.get("end_at"),
            ended=Ending(e["reason"], e.get("detail", ""), e["at"]) if e else None,
            secrets=list(s.get("secrets") or []), env=dict(s.get("env") or {}),
            idle_suspend_seconds=s.get("idle_suspend_seconds"),
        )


@dataclass(frozen=True)
class SandboxStats:
    """What a sandbox uses of the host, measured by the host. The process
    figures are ``None`` unless it is running."""

    id: str
    state: str
    cpus: int
    memory_limit_bytes: int
    uptime_seconds: Optional[float]
    cpu_seconds: Optional[float]
    memory_bytes: Optional[int]
    memory_pss_bytes: Optional[int]
    disk_bytes: int

    @classmethod
    def from_api(cls, s: Dict[str, Any]) -> "SandboxStats":
        return cls(**{k: s.get(k) for k in cls.__dataclass_fields__})


@dataclass
class CommandResult:
    """A finished command: its output (decoded as UTF-8, bad bytes
    replaced) and how it ended."""

    exit_code: Optional[int]
    stdout: str
    stderr: str
    signal: Optional[int] = None
    timed_out: bool = False
    pid: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class CommandInfo:
    """A command running in a sandbox."""

    pid: int
    cmd: List[str]
    started_at: str

    @classmethod
    def from_api(cls, c: Dict[str, Any]) -> "CommandInfo":
        return cls(pid=c["pid"], cmd=list(c["cmd"]), started_at=c["started_at"])


@dataclass(frozen=True)
class TemplateInfo:
    """A template (or a sandbox's snapshot) sandboxes are made from."""

    name: str
    kind: str
    cpus: int
    memory_mib: int
    has_rootfs: bool
    created_at: str
    source: Any = None

    @classmethod
    def from_api(cls, t: Dict[str, Any]) -> "TemplateInfo":
        return cls(name=t["name"], kind=t["kind"], cpus=t["cpus"], memory_mib=t["memory_mib"],
                   has_rootfs=t["has_rootfs"], created_at=t["created_at"],
                   source=t.get("source"))


@dataclass(frozen=True)
class PoolStatus:
    """A template's warm pool: how many it keeps ready, how many are."""

    template: str
    warm: int
    ready: int

    @classmethod
    def from_api(cls, p: Dict[str, Any]) -> "PoolStatus":
        return cls(template=p["template"], warm=p["warm"], ready=p["ready"])


@dataclass(frozen=True)
class GroupInfo:
    """A group: its quota (``None`` fields are unlimited) and what it uses."""

    name: str
    quota: Dict[str, Optional[int]]
    usage: Dict[str, int]
    created_at: str

    @classmethod
    def from_api(cls, g: Dict[str, Any]) -> "GroupInfo":
        return cls(name=g["name"], quota=dict(g["quota"]), usage=dict(g["usage"]),
                   created_at=g["created_at"])


@dataclass(frozen=True)
class SecretInfo:
    """A secret's name (its value is never shown again)."""

    name: str
    created_at: str
    updated_at: Optional[str] = None

    @classmethod
    def from_api(cls, s: Dict[str, Any]) -> "SecretInfo":
        return cls(name=s["name"], created_at=s.get("created_at", ""),
                   updated_at=s.get("updated_at"))


@dataclass(frozen=True)
class Event:
    """Something that happened to a sandbox, in order (``seq``)."""

    seq: int
    kind: str
    sandbox_id: Optional[str]
    #: Unix time in milliseconds.
    at: int
    detail: Any = field(default=None)

    @classmethod
    def from_api(cls, e: Dict[str, Any]) -> "Event":
        return cls(seq=e["seq"], kind=e["kind"], sandbox_id=e.get("sandbox_id"),
                   at=int(e.get("at") or 0), detail=e.get("detail"))


@dataclass(frozen=True)
class EntryInfo:
    """What a path in a sandbox is."""

    #: The final component (anything not UTF-8 replaced; see ``name_bytes``).
    name: str
    #: The name's bytes, exactly.
    name_bytes: bytes
    #: ``file``, ``dir``, ``symlink`` or ``other``.
    type: str
    size: int
    #: Permission bits (``0o644``).
    mode: int
    uid: int
    gid: int
    modified_at: str
    symlink_target: Optional[str]

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @classmethod
    def from_api(cls, e: Dict[str, Any]) -> "EntryInfo":
        import base64
        raw = base64.b64decode(e["name_b64"]) if e.get("name_b64") else e["name"].encode()
        return cls(name=e["name"], name_bytes=raw, type=e["type"], size=e["size"],
                   mode=e["mode"], uid=e["uid"], gid=e["gid"], modified_at=e["modified_at"],
                   symlink_target=e.get("symlink_target"))



@dataclass(frozen=True)
class FilesystemEvent:
    """Something that happened under a watched directory."""

    #: ``create``, ``write``, ``remove``, ``rename_from``, ``rename_to``,
    #: ``chmod``, or ``overflow`` (events were lost while nobody read).
    type: str
    path: str
    path_bytes: bytes
    is_dir: bool

    @classmethod
    def from_api(cls, e: Dict[str, Any]) -> "FilesystemEvent":
        import base64
        path = e.get("path") or ""
        raw = base64.b64decode(e["path_b64"]) if e.get("path_b64") else path.encode()
        return cls(type=e["type"], path=path, path_bytes=raw, is_dir=bool(e.get("dir")))



@dataclass(frozen=True)
class ProcessInfo:
    """A detached process (``sb.commands.spawn``)."""

    pid: int
    cmd: List[str]
    running: bool
    exit_code: Optional[int]
    signal: Optional[int]
    timed_out: bool
    #: Output bytes written so far (stdout and stderr together).
    output_bytes: int
    #: The first offset still kept (the guest keeps the last 4 MiB).
    kept_from: int
    started_at: str

    @classmethod
    def from_api(cls, p: Dict[str, Any]) -> "ProcessInfo":
        return cls(pid=p["pid"], cmd=list(p["cmd"]), running=p["running"],
                   exit_code=p.get("exit_code"), signal=p.get("signal"),
                   timed_out=bool(p.get("timed_out")), output_bytes=p["output_bytes"],
                   kept_from=p["kept_from"], started_at=p["started_at"])


@dataclass(frozen=True)
class LogChunk:
    """Output of a detached process: ``stream`` is ``stdout`` or
    ``stderr``, ``offset`` where ``data`` starts (bytes since the process
    started, both streams together)."""

    stream: str
    offset: int
    data: bytes
