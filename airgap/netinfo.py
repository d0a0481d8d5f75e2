"""What the host's network looks like, read from the kernel's own tables (no tool, no traffic).

A head node that is really air-gapped has no default route; `appliance airgap check` warns
when one is there. Readers take their file as an argument so tests can give them any table.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

ROUTE_V4 = Path("/proc/net/route")
ROUTE_V6 = Path("/proc/net/ipv6_route")
INTERFACES = Path("/sys/class/net")


def default_routes(v4: Path = ROUTE_V4, v6: Path = ROUTE_V6) -> list[dict[str, str]] | None:
    """Every default route (IPv4 destination 0/0, IPv6 ::/0) with its interface; None if unreadable."""
    found: list[dict[str, str]] = []
    readable = False
    try:
        lines = v4.read_text().splitlines()[1:]
        readable = True
        for line in lines:
            cols = line.split()
            if len(cols) > 7 and cols[1] == "00000000" and cols[7] == "00000000":
                gateway = ".".join(str(b) for b in reversed(bytes.fromhex(cols[2])))
                found.append({"family": "ipv4", "interface": cols[0], "via": gateway})
    except (OSError, ValueError):
        pass
    try:
        lines = v6.read_text().splitlines()
        readable = True
        for line in lines:
            cols = line.split()
            # destination ::/0, not the loopback's unreachable default, with a real next hop
            if len(cols) >= 10 and cols[0] == "0" * 32 and cols[1] == "00" and cols[9] != "lo":
                found.append({"family": "ipv6", "interface": cols[9], "via": str(ipaddress.IPv6Address(bytes.fromhex(cols[4])))})
    except (OSError, ValueError):
        pass
    return found if readable else None


def interfaces_up(root: Path = INTERFACES) -> list[dict[str, Any]] | None:
    """Interfaces whose operational state is up (or unknown, as loopback and tunnels report)."""
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError:
        return None
    out = []
    for name in names:
        try:
            state = (root / name / "operstate").read_text().strip()
            flags = int((root / name / "flags").read_text().strip(), 16)
        except (OSError, ValueError):
            continue
        if flags & 0x1:  # IFF_UP
            out.append({"name": name, "state": state, "loopback": bool(flags & 0x8)})
    return out
