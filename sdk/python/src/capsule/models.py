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
