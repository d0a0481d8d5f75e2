"""The console's view of the service: one client, the caller's grants, errors as the user sees them.

Textual-free on purpose: the core of the console (who may do what, how an error reads, how
numbers read) is importable and testable without the UI library, and a screen never calls
the client itself: it goes through `Session.call` from a worker thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from keys.errors import ApplianceError


@dataclass(frozen=True)
class Grants:
    """What the caller may do under the signed policy, from ``service.whoami``."""

    user: str
    roles: tuple[str, ...]
    permissions: frozenset[str]
    two_person: frozenset[str] = frozenset()
    may_approve: frozenset[str] = frozenset()
    granting: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_whoami(cls, who: dict[str, Any]) -> Grants:
        return cls(
            user=str(who["user"]),
            roles=tuple(r for r in who.get("roles", []) if r != "everyone"),
            permissions=frozenset(who.get("permissions", [])),
            two_person=frozenset(who.get("two_person", [])),
            may_approve=frozenset(who.get("may_approve", [])),
            granting={k: tuple(v) for k, v in who.get("granting", {}).items()},
        )

    def allows(self, permission: str) -> bool:
        return permission in self.permissions or "*" in self.permissions

    def reason(self, permission: str) -> str:
        """Why a control is disabled ("" when it is not): what the user lacks and whom to ask."""
        if self.allows(permission):
            return ""
        roles = [r for r in self.granting.get(permission, ()) if r != "everyone"]
        ask = f"ask an admin for role {' or '.join(roles)}" if roles else "no role in the policy grants it"
        held = ", ".join(self.roles) or "no role"
        return f"{self.user} ({held}) lacks {permission}: {ask}"

    def needs_approval(self, permission: str) -> bool:
        return permission in self.two_person


def describe(exc: BaseException) -> tuple[str, str]:
    """(what went wrong, what to do) for any error a screen meets; the one way errors read."""
    if isinstance(exc, ApplianceError):
        return exc.message, exc.hint or ""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc), "check the path and its permissions"
    return f"{type(exc).__name__}: {exc}", "this is a bug in the console: report it with the steps that led here"


class Session:
    """The client shared by every screen, called from worker threads at once: the service serves
    concurrent requests (its server runs them on a thread pool), and so does its client."""

    def __init__(self, client: Any, *, where: str) -> None:
        self.client = client
        self.where = where  # "socket /run/appliance/appliance.sock" or "home ./demo-home (local mode)"
        self.info: dict[str, Any] = {}
        self.whoami: dict[str, Any] = {}
        self.grants = Grants(user="?", roles=(), permissions=frozenset())

    def connect(self) -> None:
        """Ask who we are; called once, before the app starts (every control is gated on the answer)."""
        self.info = self.call("service.info")
        self.whoami = self.call("service.whoami")
        self.grants = Grants.from_whoami(self.whoami)

    def call(self, op: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.client.call(op, **clean)

    def stream(self, op: str, **params: Any) -> Iterator[Any]:
        """A streamed operation (NDJSON events), read by a worker thread as they come."""
        return iter(self.client.stream(op, **{k: v for k, v in params.items() if v is not None}))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def short(digest: str | None, n: int = 12) -> str:
    return (digest or "")[:n]
