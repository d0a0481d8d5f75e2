"""Real Unix users and groups for tests that run as root: made, yielded, and always removed.

Used by the tests that check the service's identity and roles against the kernel's word
(`SO_PEERCRED`): each person is a real user with a private primary group (``useradd -U``) and
the supplementary groups the test names.
"""

from __future__ import annotations

import contextlib
import grp
import pwd
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def unix_people(groups: list[str], users: list[tuple[str, list[str]]]) -> Iterator[dict[str, User]]:
    """Create ``groups``, then each (name, its groups) user; yield name -> User; remove them all."""
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        for group in groups:
            run("groupadd", group)
            made_groups.append(group)
        for name, member_of in users:
            # -U: a private primary group of the same name (removed with the user, or below).
            run("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *(["-G", ",".join(member_of)] if member_of else []), name)
            made_users.append(name)
            made_groups.append(name)
        yield {n: User(n, pwd.getpwnam(n).pw_uid, pwd.getpwnam(n).pw_gid) for n in made_users}
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
        for name in made_groups:
            try:
                grp.getgrnam(name)
            except KeyError:
                continue
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)
