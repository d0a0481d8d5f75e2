"""Where the node key's passphrase comes from, and the checks on files that hold one.

Sources, first found wins (`read_passphrase`):

1. ``$APPLIANCE_PASSPHRASE``: the passphrase itself.
2. ``$APPLIANCE_PASSPHRASE_FILE``: the path of a file holding it.
3. ``$CREDENTIALS_DIRECTORY/appliance-passphrase``: the systemd credential of that name, as
   a unit gives it with ``LoadCredential=appliance-passphrase:/etc/appliance/passphrase``
   (or ``LoadCredentialEncrypted=`` / ``SetCredentialEncrypted=``); used when the file exists.
4. The terminal, when there is one.

Why this order: a variable is set for one invocation or one unit on purpose, so it beats
the ambient credential of the service it runs in (an operator debugging inside the unit's
environment can point at another file without editing the unit); the prompt is last because
a service has no terminal. The credential is the recommended way for the service: systemd
keeps it on a private, non-swappable mount readable by the service's user only, and, unlike
a variable, it is not inherited by the job processes the service starts.

A file holding a secret (source 2 or 3) is read only if, like ssh's key files:

- it is owned by this user or by root (systemd writes credentials as root when it can give
  the service's user access through an ACL, and as that user otherwise: both pass);
- nobody else can read or write it: no permission bits for others and none for the group.
  The one exception is exactly what systemd makes for a credential: a read-only file (0400)
  whose access control list adds read access for one named user — this user — which ``stat``
  shows as 0440 because with an ACL the group bits are the ACL's mask. Any other ACL entry
  that grants access (a group, another user) is refused like a group bit;
- it is a regular file or a pipe (``APPLIANCE_PASSPHRASE_FILE=<(pass show appliance)`` works:
  the secret is then never at rest), at most 64 KiB.

Symbolic links are followed, as ssh does: the checks apply to the file actually read, made on
the open descriptor (``fstat``), so a link swapped between the check and the read changes
nothing, and refusing links would buy no safety (whoever can replace the link can replace
the file). One trailing newline (``\\n`` or ``\\r\\n``) is stripped, so ``echo pass > file``
works; everything else is the passphrase.
"""

from __future__ import annotations

import errno
import getpass
import os
import pwd
import stat
import struct
import sys
from pathlib import Path

from keys.errors import KeyStoreError

ENV_PASSPHRASE = "APPLIANCE_PASSPHRASE"
ENV_PASSPHRASE_FILE = "APPLIANCE_PASSPHRASE_FILE"
ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
CREDENTIAL_NAME = "appliance-passphrase"
MIN_PASSPHRASE_LEN = 8
MAX_SECRET_FILE_BYTES = 64 * 1024

PASSPHRASE_HINT = (
    f"give the passphrase chosen at `appliance init` through {ENV_PASSPHRASE}, or {ENV_PASSPHRASE_FILE} naming a file "
    f"(mode 0600) that holds it, or the systemd credential {CREDENTIAL_NAME} (LoadCredential=), or run the command on a "
    "terminal to be asked"
)

# POSIX ACLs as Linux stores them in the "system.posix_acl_access" extended attribute:
# a little-endian u32 version (2), then (u16 tag, u16 permissions, u32 id) per entry.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK = 0x02, 0x04, 0x08, 0x10
_ACL_READ = 0x4


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _acl_entries(fd: int, label: str, path: Path) -> list[tuple[int, int, int]] | None:
    """The file's access ACL as (tag, permissions, id) entries; None when it has none."""
    if not hasattr(os, "getxattr"):  # not Linux: no POSIX ACLs to read
        return None
    try:
        raw = os.getxattr(fd, _ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise KeyStoreError(f"cannot read the access control list of {label}: {exc.strerror}", "check the file system holding it") from None
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != _ACL_VERSION:
        raise KeyStoreError(f"{label} has an access control list of an unknown format", f"run `setfacl -b {path}` and `chmod 600 {path}`")
    return [struct.unpack_from("<HHI", raw, offset) for offset in range(4, len(raw), 8)]


def _check_private(st: os.stat_result, fd: int, label: str, path: Path) -> None:
    """Refuse a secret file that someone other than its owner, root and this user can use."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise KeyStoreError(
            f"{label} is owned by {_user_name(st.st_uid)} (uid {st.st_uid}), not by this user ({_user_name(me)}) or root",
            f"run `chown {_user_name(me)} {path}` as root (and `chmod 600 {path}`), or use a copy of your own with mode 0600",
        )
    mode = stat.S_IMODE(st.st_mode)
    loose = f"{label} is accessible by other users (mode {mode:04o}"
    fix = f"run `chmod 600 {path}`"
    if mode & 0o007:
        raise KeyStoreError(loose + ")", fix)
    if not mode & 0o070:
        return
    acl = _acl_entries(fd, label, path)
    if acl is None:
        raise KeyStoreError(loose + ")", fix)
    # With an ACL the group bits are the mask: what the group-class entries can get at most.
    mask = next((perm for tag, perm, _ in acl if tag == _ACL_MASK), 0o7)
    for tag, perm, ident in acl:
        granted = perm & mask
        if not granted or tag not in (_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP):
            continue
        if tag == _ACL_USER and ident == me and granted == _ACL_READ:
            continue  # systemd's credential: read access for the service's user, nothing else
        raise KeyStoreError(loose + ", with an access control list granting access to others)", fix)


def read_private_file(path: Path, *, label: str) -> bytes:
    """The bytes of ``path``, a file only its owner (this user or root) can use, read as is.

    The checks are those of the module docstring (owner, permissions and ACL, type, at most
    64 KiB), made on the open descriptor. ``label`` names the file in errors (e.g. "key file
    /x"). Raises KeyStoreError naming the file and the fix.
    """
    path = Path(path)
    if path.is_symlink():  # followed; say where to, since the mode in errors is the target's
        label = f"{label} (a link to {os.path.realpath(path)})"
    try:
        st_path = os.stat(path)
        if not (stat.S_ISREG(st_path.st_mode) or stat.S_ISFIFO(st_path.st_mode)):
            raise KeyStoreError(f"{label} is not a regular file or a pipe", "point it at the file that holds the secret")
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyStoreError(f"{label} does not exist", "create it (mode 0600) or correct the path") from None
    except OSError as exc:
        raise KeyStoreError(f"cannot read {label}: {exc.strerror}", "run the command as the user who owns the file") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (st_path.st_dev, st_path.st_ino):
            raise KeyStoreError(f"{label} was replaced while it was being opened", "run the command again; find out what changes the file")
        _check_private(st, fd, label, path)
        chunks, size = [], 0
        while size <= MAX_SECRET_FILE_BYTES and (chunk := os.read(fd, MAX_SECRET_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise KeyStoreError(f"cannot read {label}: {exc.strerror}", "check the file and the disk holding it") from None
    finally:
        os.close(fd)
    if size > MAX_SECRET_FILE_BYTES:
        raise KeyStoreError(
            f"{label} is larger than {MAX_SECRET_FILE_BYTES // 1024} KiB: it holds more than a secret", "point it at the file that holds the secret"
        )
    return b"".join(chunks)


def read_secret_file(path: Path, *, label: str) -> bytes:
    """`read_private_file` less one trailing newline (``\\n`` or ``\\r\\n``): the passphrase in ``path``."""
    data = read_private_file(path, label=label)
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def credential_path() -> Path | None:
    """``$CREDENTIALS_DIRECTORY/appliance-passphrase`` when systemd gave the process that credential."""
    directory = os.environ.get(ENV_CREDENTIALS_DIRECTORY)
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    return path if path.exists() else None


def read_passphrase(*, purpose: str, confirm: bool = False, env: str = ENV_PASSPHRASE, env_file: str = ENV_PASSPHRASE_FILE, credential: bool = True) -> bytes:
    """The passphrase for ``purpose`` (e.g. "unlock the node key"), from the first source found.

    Sources in order: ``$APPLIANCE_PASSPHRASE``; the file named by
    ``$APPLIANCE_PASSPHRASE_FILE``; the systemd credential ``appliance-passphrase``
    (``$CREDENTIALS_DIRECTORY/appliance-passphrase``, given by ``LoadCredential=``); the
    terminal. Files are checked as the module docstring says (owner, mode, type, size) and
    lose one trailing newline. ``confirm=True`` is for choosing a new passphrase: asked twice
    on a terminal, and at least 8 bytes whatever its source. Raises KeyStoreError.
    """
    hint = (
        PASSPHRASE_HINT
        if env == ENV_PASSPHRASE
        else f"give it through {env}, or {env_file} naming a file (mode 0600) that holds it, or run the command on a terminal to be asked"
    )
    if env in os.environ:
        passphrase = os.environ[env].encode("utf-8")
        source = f"${env}"
    elif env_file in os.environ:
        name = os.environ[env_file]
        source = f"passphrase file {name} named by ${env_file}"
        passphrase = read_secret_file(Path(name), label=source)
    elif credential and (cred := credential_path()) is not None:
        source = f"systemd credential {cred}"
        passphrase = read_secret_file(cred, label=source)
    elif sys.stdin is not None and sys.stdin.isatty():
        source = "the prompt"
        passphrase = getpass.getpass(f"Passphrase to {purpose}: ").encode("utf-8")
        if confirm and getpass.getpass("Repeat it: ").encode("utf-8") != passphrase:
            raise KeyStoreError("the two passphrases differ", "run the command again and type the same twice")
    else:
        raise KeyStoreError(f"a passphrase is needed to {purpose}, and there is no terminal to ask on", hint)
    if not passphrase:
        raise KeyStoreError(f"the passphrase from {source} is empty", hint)
    if confirm and len(passphrase) < MIN_PASSPHRASE_LEN:
        raise KeyStoreError(
            f"the new passphrase from {source} is shorter than {MIN_PASSPHRASE_LEN} bytes",
            "choose a longer passphrase (a few random words work well)",
        )
    return passphrase
