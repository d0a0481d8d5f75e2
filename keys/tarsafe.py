"""Unpacking a tar that came from elsewhere: plain files and folders inside the target, nothing else.

Python's ``filter="data"`` does this from 3.11.4 on; head nodes run the distribution's 3.11,
which may be older (Debian 12 ships 3.11.2, where ``extractall`` takes no ``filter``), so the
checks are made here, member by member, and the filter is added where it exists. Works on a
stream (mode ``"r|"``) too: each member is checked before a byte of it is written.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why ``member`` may not be unpacked (an absolute path, a ``..``, a link or a device), or None."""
    name = member.name
    if name.startswith("/") or ".." in PurePosixPath(name).parts:
        return "a path outside the folder"
    if not (member.isfile() or member.isdir()):
        return "a link or a special file"
    return None


def extract_plain(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack every member of ``tar`` into ``dest``; ValueError naming the first member that is
    not a plain file or folder inside ``dest`` (what was unpacked before it stays: callers
    unpack into a new folder and remove it on error)."""
    for member in tar:
        why = unsafe_reason(member)
        if why is not None:
            raise ValueError(f"{member.name!r} is {why}")
        if HAS_DATA_FILTER:
            tar.extract(member, dest, filter="data")
        else:
            # No owner, no set-uid bits, no times from the archive: what the data filter drops.
            member.mode &= 0o755
            tar.extract(member, dest, set_attrs=False)
