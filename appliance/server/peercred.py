"""Who is on the other end of a Unix socket, as the kernel says (``SO_PEERCRED``).

The kernel records the pid, uid and gid of the process that called ``connect()``; a client
cannot forge them. This is the only place the server learns a caller's identity: headers,
bodies and query strings carry no identity the service believes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from policies.errors import PolicyError

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;} on Linux


@dataclass(frozen=True)
class PeerCred:
    """The connecting process's credentials at ``connect()`` time."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> PeerCred:
    """The peer's (pid, uid, gid) of a connected ``AF_UNIX`` stream socket.

    ``sock`` is a `socket.socket` or asyncio's ``TransportSocket`` (what
    ``transport.get_extra_info('socket')`` returns). Raises PolicyError when the kernel cannot
    say: a caller the service cannot identify is refused, never guessed.
    """
    if sock is None:
        raise PolicyError("the connection closed before the service could identify the caller", "connect again")
    if not hasattr(socket, "SO_PEERCRED"):
        raise PolicyError("this platform has no SO_PEERCRED: the service cannot identify callers", "run the service on Linux")
    if sock.family != socket.AF_UNIX:
        raise PolicyError(f"the service identifies callers only over a Unix socket, not {sock.family!r}", "connect through the service's Unix socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        raise PolicyError(f"the kernel did not say who is calling ({exc.strerror})", "connect again; if it persists, check the service's log") from None
    pid, uid, gid = _UCRED.unpack(raw)
    # uid -1 (overflow uid) would mean the kernel had no credentials for this socket.
    if uid < 0:
        raise PolicyError("the kernel gave no credentials for this connection", "connect through the service's Unix socket")
    return PeerCred(pid=pid, uid=uid, gid=gid)
