"""Where the daemon is: its Unix socket by default, or a TCP URL with a
bearer token; each from an argument or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import httpx


def default_socket() -> str:
    """``$CAPSULE_HOME/api.sock``, the daemon's default, with CAPSULE_HOME
    found as the daemon finds it."""
    home = os.environ.get("CAPSULE_HOME")
    if not home:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime:
            home = os.path.join(runtime, "capsule")
        elif os.geteuid() == 0:
            home = "/run/capsule"
        else:
            home = f"/tmp/capsule-{os.geteuid()}"
    return os.path.join(home, "api.sock")


@dataclass
class Connection:
    """How to reach the daemon.

    ``url`` (``CAPSULE_URL``, e.g. ``http://127.0.0.1:7878``) with
    ``token`` (``CAPSULE_TOKEN``, or the file named by
    ``CAPSULE_TOKEN_FILE``) reaches a daemon started with ``--listen``;
    otherwise ``socket`` (``CAPSULE_SOCKET``, default
    ``$CAPSULE_HOME/api.sock``)."""

    url: Optional[str] = None
    token: Optional[str] = None
    socket: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, url: Optional[str] = None, token: Optional[str] = None,
                socket: Optional[str] = None) -> "Connection":
        url = url or os.environ.get("CAPSULE_URL")
        if url:
            token = token or os.environ.get("CAPSULE_TOKEN")
            token_file = os.environ.get("CAPSULE_TOKEN_FILE")
            if not token and token_file:
                with open(token_file) as f:
                    token = f.read().strip()
            headers = {"authorization": f"Bearer {token}"} if token else {}
            return cls(url=url.rstrip("/"), token=token, headers=headers)
        return cls(socket=socket or os.environ.get("CAPSULE_SOCKET") or default_socket())

    @property
    def base_url(self) -> str:
        return self.url or "http://capsule"

    def describe(self) -> str:
        return self.url or f"unix:{self.socket}"

    def sync_transport(self) -> Optional[httpx.HTTPTransport]:
        return httpx.HTTPTransport(uds=self.socket) if self.socket else None

    def async_transport(self) -> Optional[httpx.AsyncHTTPTransport]:
        return httpx.AsyncHTTPTransport(uds=self.socket) if self.socket else None
