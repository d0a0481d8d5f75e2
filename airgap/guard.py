"""The egress guard: a Python audit hook that refuses network traffic leaving the machine.

Installed first thing in the service and in every job process (`airgap.run` wraps each job
module), before any third-party import, it refuses:

- ``socket.connect`` / ``socket.sendto`` / ``socket.sendmsg`` to an IP address that is not
  allowed (Unix sockets always pass);
- ``socket.getaddrinfo`` / ``gethostbyname`` / ``gethostbyname_ex`` / ``gethostbyaddr`` /
  ``getnameinfo`` for a name that is not local — before any lookup, so not even a DNS query
  leaves.

Allowed: 127.0.0.1 and ::1, the local names (``localhost``, this host's own name), and what
``APPLIANCE_EGRESS_ALLOW`` adds (comma-separated addresses, CIDR networks or host names: the
cluster's own subnet for multi-node training). Only 127.0.0.1 of the loopback range is allowed
by default, so a test can check a refusal without ever leaving the machine (127.0.0.2).

A refusal raises `EgressRefused` in the caller, naming the address and the modules on the
stack that asked, and is appended as one JSON line to ``APPLIANCE_EGRESS_LOG`` (the job's
work folder) for the service to record in the ledger.

What it cannot stop: native code that opens sockets without going through Python's socket
module (a C extension, a subprocess that is not Python). The systemd unit's
``IPAddressDeny=any`` + ``IPAddressAllow=localhost`` (and the cluster subnet) enforce the same
below the process, in the kernel; see the README.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from airgap.errors import AirgapError
from keys.errors import ApplianceError

ENV_ALLOW = "APPLIANCE_EGRESS_ALLOW"
ENV_LOG = "APPLIANCE_EGRESS_LOG"
DEFAULT_ALLOWED = ("127.0.0.1", "::1")
LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")

# Frames of these modules are the plumbing between the caller and the socket: skipped when
# naming who asked.
_PLUMBING = ("airgap.guard", "airgap.run", "runpy", "socket", "ssl", "selectors", "asyncio", "http.client", "urllib.", "email.")


class EgressRefused(AirgapError):
    """A connection or name lookup that would leave the machine, refused by the egress guard.

    Deliberately not an OSError: HTTP stacks retry connection errors (the hub client backs off
    for about 20 s), while this propagates untranslated, so the caller fails at once with the
    guard's own message.
    """


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self.names: set[str] = set()
        self.on_refuse: Callable[[dict[str, Any]], None] | None = None
        self.log: str | None = None
        self.busy = threading.local()


_STATE = _State()


def parse_allow(items: Iterable[str]) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], set[str]]:
    """Addresses / CIDR networks and host names, from an allow list; AirgapError names a bad entry."""
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    names: set[str] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if not all(part and (part.replace("-", "").isalnum()) for part in item.split(".")):
            raise AirgapError(f"egress allow entry {item!r} is not an address, a network (CIDR) or a host name", f"fix {ENV_ALLOW} or the allow list")
        names.add(item.lower().rstrip("."))
    return nets, names


def install(allow: Iterable[str] = (), *, on_refuse: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Install the guard in this process (once; a second call only widens nothing and keeps it)."""
    extra = [a for a in os.environ.get(ENV_ALLOW, "").split(",") if a.strip()]
    nets, names = parse_allow([*DEFAULT_ALLOWED, *allow, *extra])
    if not _STATE.installed:
        # An allowed host name (the rendezvous host of a multi-node job) is looked up now, while
        # lookups are still free, so connections to its addresses pass later.
        nets += _addresses_of(names)
    _STATE.nets, _STATE.names = nets, names | set(LOCAL_NAMES) | {socket.gethostname().lower()}
    _STATE.on_refuse = on_refuse
    _STATE.log = os.environ.get(ENV_LOG) or None
    if not _STATE.installed:
        sys.addaudithook(_hook)  # audit hooks cannot be removed: the guard stays for the process's life
        _STATE.installed = True


def _addresses_of(names: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            continue  # unknown here: its lookup is still allowed, a connection to it is not
        for info in infos:
            try:
                out.append(ipaddress.ip_network(str(info[4][0]).split("%", 1)[0]))
            except ValueError:
                continue
    return out


def set_on_refuse(fn: Callable[[dict[str, Any]], None] | None) -> None:
    """Who records a refusal in this process (the service: its ledger)."""
    _STATE.on_refuse = fn


def installed() -> bool:
    return _STATE.installed


def configured_allow() -> list[str]:
    """What a guard installed now would let through, besides local names: defaults and ``APPLIANCE_EGRESS_ALLOW``."""
    return [*DEFAULT_ALLOWED, *(a.strip() for a in os.environ.get(ENV_ALLOW, "").split(",") if a.strip())]


def _ip_allowed(host: str) -> bool | None:
    """True/False for an IP literal; None if ``host`` is not one."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _STATE.nets)


def _name_allowed(host: Any) -> bool:
    if host is None:
        return True  # getaddrinfo(None, port): the local wildcard, for binding
    if isinstance(host, bytes):
        host = host.decode("idna", errors="replace")
    host = str(host).lower().rstrip(".")
    if host == "":
        return True
    as_ip = _ip_allowed(host)
    if as_ip is not None:
        return as_ip
    return host in _STATE.names


def _callers() -> str:
    """The modules that asked, innermost first, past the socket plumbing (at most three)."""
    names: list[str] = []
    frame = sys._getframe(2)
    while frame is not None and len(names) < 3:
        spec = frame.f_globals.get("__spec__")
        # A module run as __main__ (every job, through runpy) is named by its spec: tests.egress_probe, not __main__.
        mod = getattr(spec, "name", None) or frame.f_globals.get("__name__", "?")
        if not mod.startswith(_PLUMBING) and (not names or names[-1] != mod):
            names.append(mod)
        frame = frame.f_back  # type: ignore[assignment]
    return " <- ".join(names) or "?"


def _refuse(event: str, address: str) -> None:
    who = _callers()
    record = {"event": event, "address": address, "module": who, "pid": os.getpid()}
    if _STATE.log:
        try:
            with open(_STATE.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass  # the refusal itself still stands
    if _STATE.on_refuse is not None:
        try:
            _STATE.on_refuse(record)
        except (ApplianceError, OSError, RuntimeError, ValueError):
            pass  # recording failed (the ledger closing, say): the refusal below still stands
    raise EgressRefused(
        f"egress refused: {event} to {address}, asked by {who}; this appliance is air-gapped",
        f"nothing may leave this machine; if {address} is the cluster's own, allow it ({ENV_ALLOW}, or the recipe's allowed addresses)",
    )


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not event.startswith("socket."):
        return
    if getattr(_STATE.busy, "on", False):
        return  # our own bookkeeping (the log file) never reaches here, but be safe against re-entry
    _STATE.busy.on = True
    try:
        _check(event, args)
    finally:
        _STATE.busy.on = False


def _check(event: str, args: tuple[Any, ...]) -> None:
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        sock, address = args[0], args[1] if len(args) > 1 else None
        family = getattr(sock, "family", None)
        if family not in (socket.AF_INET, socket.AF_INET6) or address is None:
            return  # Unix sockets, netlink and friends stay on the machine
        if isinstance(address, tuple) and address:
            host = address[0]
            if isinstance(host, bytes):
                host = host.decode("ascii", errors="replace")
            verdict = _ip_allowed(str(host))
            if verdict is None:
                verdict = _name_allowed(host)  # connect(("name", port)) resolves inside: treat as a lookup
            if not verdict:
                _refuse(event.removeprefix("socket."), f"{host}:{address[1]}" if len(address) > 1 else str(host))
        return
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        host = args[0] if args else None
        if not _name_allowed(host):
            port = args[1] if event == "socket.getaddrinfo" and len(args) > 1 and args[1] not in (None, 0, "") else None
            _refuse(event.removeprefix("socket."), f"{host}:{port}" if port is not None else str(host))
        return
    if event == "socket.getnameinfo":
        sockaddr = args[0] if args else None
        if isinstance(sockaddr, tuple) and sockaddr and not _name_allowed(sockaddr[0]):
            _refuse("getnameinfo", str(sockaddr[0]))
