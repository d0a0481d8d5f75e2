"""Secrets on disk: where the passphrase comes from, which files may hold it, and the modes of what we write.

Every case that writes runs under umask 000 (nothing narrows a mode by accident) and most
also under 077; the umask is restored after each test.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

import pytest

from keys.errors import KeyStoreError
from keys.keystore import create_key, load_key, public_key_path
from keys.passphrase import (
    CREDENTIAL_NAME,
    ENV_CREDENTIALS_DIRECTORY,
    ENV_PASSPHRASE,
    ENV_PASSPHRASE_FILE,
    MAX_SECRET_FILE_BYTES,
    read_passphrase,
    read_secret_file,
)

PASS = b"correct horse battery"
IS_ROOT = os.geteuid() == 0


@pytest.fixture
def no_sources(monkeypatch):
    """No passphrase variable, no credential, no terminal."""
    for name in (ENV_PASSPHRASE, ENV_PASSPHRASE_FILE, ENV_CREDENTIALS_DIRECTORY):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    return monkeypatch


def _secret(path, data=b"from a file\n", mode=0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _acl(*entries):
    """A POSIX access ACL as Linux stores it in the system.posix_acl_access xattr."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


_NO_ID = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _set_acl(path, *entries):
    try:
        os.setxattr(path, "system.posix_acl_access", _acl(*entries))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip("this file system has no POSIX ACLs")
        raise


# ---------------------------------------------------------------- passphrase sources


def test_precedence_env_then_file_then_credential_then_prompt(no_sources, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    _secret(creds / CREDENTIAL_NAME, b"from the credential\n", 0o400)
    _secret(tmp_path / "pass", b"from the file\n")
    no_sources.setenv(ENV_CREDENTIALS_DIRECTORY, str(creds))
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(tmp_path / "pass"))
    no_sources.setenv(ENV_PASSPHRASE, "from the environment")
    assert read_passphrase(purpose="test") == b"from the environment"
    no_sources.delenv(ENV_PASSPHRASE)
    assert read_passphrase(purpose="test") == b"from the file"
    no_sources.delenv(ENV_PASSPHRASE_FILE)
    assert read_passphrase(purpose="test") == b"from the credential"

    class TTY:
        def isatty(self):
            return True

    no_sources.setattr("sys.stdin", TTY())
    no_sources.setattr("getpass.getpass", lambda prompt: "from the prompt")
    (creds / CREDENTIAL_NAME).unlink()  # the directory alone is not a source
    assert read_passphrase(purpose="test") == b"from the prompt"


def test_no_source_and_no_terminal_names_every_source(no_sources):
    with pytest.raises(KeyStoreError) as err:
        read_passphrase(purpose="unlock the node key")
    for name in (ENV_PASSPHRASE, ENV_PASSPHRASE_FILE, CREDENTIAL_NAME, "LoadCredential="):
        assert name in err.value.hint


def test_file_loses_exactly_one_trailing_newline(no_sources, tmp_path):
    secret = _secret(tmp_path / "pass", b"from a file \n\n")
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(secret))
    assert read_passphrase(purpose="test") == b"from a file \n"
    _secret(secret, b"crlf line\r\n")
    assert read_passphrase(purpose="test") == b"crlf line"
    _secret(secret, b"no newline")
    assert read_passphrase(purpose="test") == b"no newline"


def test_empty_file_and_missing_file(no_sources, tmp_path):
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(_secret(tmp_path / "pass", b"\n")))
    with pytest.raises(KeyStoreError, match="is empty"):
        read_passphrase(purpose="test")
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(tmp_path / "nope"))
    with pytest.raises(KeyStoreError, match="does not exist") as err:
        read_passphrase(purpose="test")
    assert str(tmp_path / "nope") in err.value.message and ENV_PASSPHRASE_FILE in err.value.message


def test_prompt_confirms(no_sources):
    class TTY:
        def isatty(self):
            return True

    no_sources.setattr("sys.stdin", TTY())
    answers = iter(["long enough one", "long enough two"])
    no_sources.setattr("getpass.getpass", lambda prompt: next(answers))
    with pytest.raises(KeyStoreError, match="differ"):
        read_passphrase(purpose="protect the new key", confirm=True)
    answers = iter(["long enough", "long enough"])
    assert read_passphrase(purpose="protect", confirm=True) == b"long enough"


def test_new_passphrase_minimum_length(no_sources):
    no_sources.setenv(ENV_PASSPHRASE, "short")
    assert read_passphrase(purpose="unlock") == b"short"
    with pytest.raises(KeyStoreError, match="shorter than 8"):
        read_passphrase(purpose="protect the new key", confirm=True)


# ---------------------------------------------------------------- passphrase file checks


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o666, 0o660])
def test_loose_passphrase_file_is_refused_with_the_fix(no_sources, tmp_path, umask000, mode):
    secret = _secret(tmp_path / "pass", mode=mode)
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(secret))
    with pytest.raises(KeyStoreError) as err:
        read_passphrase(purpose="unlock the node key")
    assert str(secret) in err.value.message
    assert f"mode {mode:04o}" in err.value.message and "accessible by other users" in err.value.message
    assert err.value.hint == f"run `chmod 600 {secret}`"


def test_file_written_under_umask_000_is_refused(no_sources, tmp_path, umask000):
    secret = tmp_path / "pass"
    secret.write_text("written carelessly\n")  # 0666 under umask 000
    no_sources.setenv(ENV_PASSPHRASE_FILE, str(secret))
    with pytest.raises(KeyStoreError, match="mode 0666"):
        read_passphrase(purpose="test")
    os.chmod(secret, 0o600)
    assert read_passphrase(purpose="test") == b"written carelessly"


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_private_modes_are_accepted(tmp_path, mode):
    assert read_secret_file(_secret(tmp_path / "pass", mode=mode), label="f") == b"from a file"


@pytest.mark.skipif(not IS_ROOT, reason="giving a file to another user needs root")
def test_file_of_another_user_is_refused(tmp_path):
    secret = _secret(tmp_path / "pass")
    os.chown(secret, 65534, 65534)
    with pytest.raises(KeyStoreError, match="uid 65534") as err:
        read_secret_file(secret, label=f"passphrase file {secret}")
    assert str(secret) in err.value.message and "chown" in err.value.hint


def test_symlink_is_followed_and_its_target_checked(tmp_path):
    target = _secret(tmp_path / "real", b"through a link\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert read_secret_file(link, label=f"passphrase file {link}") == b"through a link"
    os.chmod(target, 0o644)
    with pytest.raises(KeyStoreError, match="mode 0644") as err:
        read_secret_file(link, label=f"passphrase file {link}")
    assert f"a link to {target}" in err.value.message


def test_not_a_file_and_too_large(tmp_path):
    with pytest.raises(KeyStoreError, match="not a regular file or a pipe"):
        read_secret_file(tmp_path, label="passphrase file")
    with pytest.raises(KeyStoreError, match="not a regular file or a pipe"):
        read_secret_file("/dev/null", label="passphrase file")
    big = _secret(tmp_path / "big", b"x" * (MAX_SECRET_FILE_BYTES + 1))
    with pytest.raises(KeyStoreError, match="larger than 64 KiB"):
        read_secret_file(big, label="passphrase file")


def test_pipe_is_read(tmp_path):
    """APPLIANCE_PASSPHRASE_FILE=<(pass show appliance): the secret never rests on disk."""
    r, w = os.pipe()
    try:
        os.write(w, b"from a pipe\n")
        os.close(w)
        assert read_secret_file(f"/proc/self/fd/{r}", label="pipe") == b"from a pipe"
    finally:
        os.close(r)


# ---------------------------------------------------------------- systemd credentials


def _credential(tmp_path, monkeypatch, *acl):
    """A credential as systemd's write_credential leaves it: 0400, plus read for the service user by ACL."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    cred = _secret(creds / CREDENTIAL_NAME, b"from systemd\n", 0o400)
    if acl:
        _set_acl(cred, *acl)
    monkeypatch.delenv(ENV_PASSPHRASE, raising=False)
    monkeypatch.delenv(ENV_PASSPHRASE_FILE, raising=False)
    monkeypatch.setenv(ENV_CREDENTIALS_DIRECTORY, str(creds))
    return cred


def test_credential_with_systemds_acl_is_accepted(tmp_path, monkeypatch):
    me = os.geteuid()
    cred = _credential(tmp_path, monkeypatch, (USER_OBJ, 4, _NO_ID), (USER, 4, me), (GROUP_OBJ, 0, _NO_ID), (MASK, 4, _NO_ID), (OTHER, 0, _NO_ID))
    assert _mode(cred) == 0o440  # stat shows the ACL mask as group bits
    assert read_passphrase(purpose="unlock") == b"from systemd"


def test_credential_plain_0400_is_accepted(tmp_path, monkeypatch):
    _credential(tmp_path, monkeypatch)
    assert read_passphrase(purpose="unlock") == b"from systemd"


def test_acl_granting_another_user_is_refused(tmp_path, monkeypatch):
    other = 65534 if os.geteuid() != 65534 else 65533
    cred = _credential(tmp_path, monkeypatch, (USER_OBJ, 4, _NO_ID), (USER, 4, other), (GROUP_OBJ, 0, _NO_ID), (MASK, 4, _NO_ID), (OTHER, 0, _NO_ID))
    with pytest.raises(KeyStoreError, match="access control list granting access to others") as err:
        read_passphrase(purpose="unlock")
    assert str(cred) in err.value.message and "chmod 600" in err.value.hint


def test_acl_giving_the_group_read_is_refused(tmp_path, monkeypatch):
    me = os.geteuid()
    _credential(tmp_path, monkeypatch, (USER_OBJ, 4, _NO_ID), (USER, 4, me), (GROUP_OBJ, 4, _NO_ID), (MASK, 4, _NO_ID), (OTHER, 0, _NO_ID))
    with pytest.raises(KeyStoreError, match="mode 0440, with an access control list"):
        read_passphrase(purpose="unlock")


def test_group_readable_credential_without_acl_is_refused(tmp_path, monkeypatch):
    cred = _credential(tmp_path, monkeypatch)
    os.chmod(cred, 0o440)
    with pytest.raises(KeyStoreError, match="mode 0440"):
        read_passphrase(purpose="unlock")


# ---------------------------------------------------------------- key files written with explicit modes


def test_key_files_have_explicit_modes_whatever_the_umask(tmp_path, umask):
    path = tmp_path / "node.key"
    key = create_key(path, PASS)
    assert _mode(path) == 0o600
    assert _mode(public_key_path(path)) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "node.pub.pem"]  # no temporary file left
    assert load_key(path, PASS).key_id == key.key_id


def test_failed_key_write_leaves_no_partial_key(tmp_path, monkeypatch, umask000):
    path = tmp_path / "node.key"
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        create_key(path, PASS)
    assert list(tmp_path.iterdir()) == []  # not a torn node.key that would block the next init
    monkeypatch.setattr(os, "fsync", real_fsync)
    create_key(path, PASS)
    assert _mode(path) == 0o600


@pytest.mark.skipif(not IS_ROOT, reason="giving a file to another user needs root")
def test_key_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "node.key"
    create_key(path, PASS)
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyStoreError, match="uid 65534"):
        load_key(path, PASS)
