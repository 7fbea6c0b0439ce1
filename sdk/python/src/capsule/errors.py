"""The errors the SDK raises: one class per kind of refusal, each carrying
the API's stable ``code`` and its human ``message``.

Everything derives from :class:`CapsuleError`; catch a subclass for one
kind (``except capsule.NotFound``) or the base for all.
"""

from __future__ import annotations

from typing import Any, Optional


class CapsuleError(Exception):
    """A request the daemon refused, or could not be made.

    ``status`` is the HTTP status (``None`` when no answer came), ``code``
    the API's stable machine code (see the daemon's docs/API.md)."""

    def __init__(self, message: str, *, code: str = "error", status: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class BadRequest(CapsuleError):
    """400: a field out of range, a bad label or selector; the message names it."""


class Unauthorized(CapsuleError):
    """401: a TCP daemon without its bearer token, or the wrong one."""


class PermissionDenied(CapsuleError):
    """403: the sandbox's file system refused it (read-only, or not allowed)."""


class NotFound(CapsuleError):
    """404: no such sandbox, template, group, secret, pool, file or command."""


class NoSpace(CapsuleError):
    """507: the sandbox's disk is full; the file was left as it was."""


class Conflict(CapsuleError):
    """409: its state does not allow it (already ended, not suspended,
    another operation under way on it, a name taken)."""


class QuotaExceeded(CapsuleError):
    """429: a group's quota or the host's limit is reached; nothing was made."""


class SandboxFailed(CapsuleError):
    """The VM work failed: a create, suspend, resume or snapshot; or the
    sandbox ended for a reason other than a delete or its timeout.

    ``reason`` is the sandbox's termination reason when there is one
    (``create_failed``, ``vmm_died``, ``guest_powered_off``, ``lost``)."""

    def __init__(self, message: str, *, code: str = "sandbox_failed",
                 status: Optional[int] = None, reason: Optional[str] = None,
                 detail: Optional[str] = None):
        super().__init__(message, code=code, status=status)
        self.reason = reason
        self.detail = detail


class SandboxEnded(Conflict):
    """The sandbox has ended, deleted or expired (``reason``)."""

    def __init__(self, message: str, *, reason: str, detail: str = "",
                 code: str = "conflict", status: Optional[int] = 409):
        super().__init__(message, code=code, status=status)
        self.reason = reason
        self.detail = detail


class Timeout(CapsuleError):
    """A wait ran out: a command's own ``timeout`` (it was killed in the
    sandbox; ``result`` has what it printed) or the connection's."""

    def __init__(self, message: str, *, code: str = "timeout", status: Optional[int] = None,
                 result: Any = None):
        super().__init__(message, code=code, status=status)
        self.result = result


class DaemonUnavailable(CapsuleError):
    """The daemon is not running, or its socket or URL does not answer."""


# Termination reasons that are a failure rather than something asked for.
FAILURE_REASONS = {"create_failed", "vmm_died", "guest_powered_off", "lost"}

_BY_STATUS = {400: BadRequest, 401: Unauthorized, 403: PermissionDenied, 404: NotFound,
              409: Conflict, 429: QuotaExceeded, 507: NoSpace}


def from_answer(status: int, body: Any) -> CapsuleError:
    """The exception for an error answer: the one place API errors map to
    classes (later resources add codes here, not at each call)."""
    code = "error"
    message = f"the daemon answered {status}"
    if isinstance(body, dict):
        code = str(body.get("code", code))
        message = str(body.get("message", message))
    elif body:
        message = f"{message}: {body}"
    if code in ("sandbox_failed", "suspend_failed", "resume_failed", "snapshot_failed",
                "template_failed", "guest_unavailable"):
        return SandboxFailed(message, code=code, status=status)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = SandboxFailed if status >= 500 else CapsuleError
    return cls(message, code=code, status=status)


def ended(sandbox: dict) -> CapsuleError:
    """The exception for acting on a sandbox that has ended."""
    ending = sandbox.get("ended") or {}
    reason = ending.get("reason", "?")
    detail = ending.get("detail", "")
    message = f"sandbox {sandbox.get('id')} has ended ({reason}{': ' + detail if detail else ''})"
    if reason in FAILURE_REASONS:
        return SandboxFailed(message, code="sandbox_ended", status=409, reason=reason,
                             detail=detail)
    return SandboxEnded(message, reason=reason, detail=detail)
