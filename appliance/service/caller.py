"""Who is asking: the caller of one request, as the kernel says.

Over the socket the service reads the peer's uid with ``SO_PEERCRED`` and looks up the user
and groups itself; nothing the client sends about who it is counts. In local mode (``--home``)
the caller is the process's own user. The service runs as its own user and reads files on a
caller's behalf, so before it reads a path a caller names it checks that *the caller* could
read it (`Caller.require_readable`): the service's rights are not the caller's.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from policies.errors import PolicyError

R, W, X = 4, 2, 1
# A corpus of a million files is checked in one walk; past this many the walk stops and the
# rest is left to the job's own reads (which run as the service, inside the checked tree).
MAX_CHECKED_FILES = 1_000_000


@dataclass(frozen=True)
class Caller:
    """The user behind one request: uid, name, and every group id it belongs to."""

    uid: int
    user: str
    gids: tuple[int, ...]
    groups: tuple[str, ...]
    # The client process, where known (for the record; never used to decide).
    pid: int | None = None

    @classmethod
    def from_uid(cls, uid: int, *, pid: int | None = None) -> Caller:
        """Look the user and its groups up from the uid (the kernel's word, not the client's)."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            # A uid with no passwd entry (a container's, say) is still a caller: named by number.
            return cls(uid=uid, user=f"uid:{uid}", gids=(), groups=(), pid=pid)
        gids = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
        return cls(uid=uid, user=entry.pw_name, gids=gids, groups=tuple(_group_name(g) for g in gids), pid=pid)

    @classmethod
    def current(cls) -> Caller:
        """The user running this process (local mode)."""
        return cls.from_uid(os.getuid(), pid=os.getpid())

    def as_record(self) -> dict[str, object]:
        """How the caller is written into the ledger."""
        return {"uid": self.uid, "user": self.user, "groups": list(self.groups), "pid": self.pid}

    # -- file rights -----------------------------------------------------------------------

    def require_readable(self, path: Path, *, what: str, tree: bool = False) -> Path:
        """Raise PolicyError unless this caller may read ``path`` (every file below it, with
        ``tree``); return the resolved path. Symlinks are judged by where they lead."""
        path = Path(path)
        if not path.is_absolute():
            raise PolicyError(f"{what} {path} is not an absolute path", "the client sends absolute paths; pass the full path")
        real = path.resolve()
        if not real.exists():
            raise PolicyError(f"{what} {path} does not exist", "check the path")
        self._require_walkable(real, what)
        if not tree or not real.is_dir():
            self._require(real, R, what)
            return real
        checked = 0
        for root, dirs, files in os.walk(real):
            self._require(Path(root), R | X, what)
            for name in files:
                self._require(Path(root) / name, R, what, follow=True)
                checked += 1
            if checked > MAX_CHECKED_FILES:
                break
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        return real

    def _require_walkable(self, real: Path, what: str) -> None:
        # Every directory above the target needs search (x) permission for the caller.
        for parent in reversed(real.parents):
            self._require(parent, X, what)

    def _require(self, path: Path, want: int, what: str, *, follow: bool = True) -> None:
        if self.uid == 0:
            return
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError as exc:
            raise PolicyError(f"{what}: cannot inspect {path} ({exc.strerror})", "check the path and its permissions") from None
        if stat.S_ISLNK(st.st_mode):
            return
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if bits & want != want:
            need = "".join(c for c, b in (("r", R), ("w", W), ("x", X)) if want & b)
            raise PolicyError(
                f"{what}: user '{self.user}' may not read {path} (mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid}; needs {need})",
                "the service reads files only where the caller could read them itself: fix the permissions or give a path you can read",
            )


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
