"""Unpacking tars from elsewhere on every Python 3.11 (3.11.2, Debian 12's, has no tar filters)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from keys import tarsafe


def _tar(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """A tar of (name, file bytes or None for a folder, symlink target or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o4755  # set-uid: never kept
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(params=[True, False], ids=["data-filter", "no-filter (3.11.2)"])
def with_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(tarsafe, "HAS_DATA_FILTER", request.param and tarsafe.HAS_DATA_FILTER)
    return bool(request.param)


@pytest.mark.parametrize("mode", ["r", "r|"])
def test_plain_files_and_folders_unpack(tmp_path: Path, with_filter: bool, mode: str) -> None:
    data = _tar([("model", None, None), ("model/weights.bin", b"\x00\x01" * 100, None), ("signer.pub.pem", b"pem", None)])
    with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
        tarsafe.extract_plain(tar, tmp_path)
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    assert (tmp_path / "signer.pub.pem").read_bytes() == b"pem"
    assert not (tmp_path / "signer.pub.pem").stat().st_mode & 0o4000


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (("/etc/evil", b"x", None), "outside the folder"),
        (("model/../../evil", b"x", None), "outside the folder"),
        (("model/link", None, "/etc/passwd"), "a link"),
    ],
)
def test_anything_else_is_refused_before_it_is_written(tmp_path: Path, with_filter: bool, member: tuple[str, bytes | None, str | None], why: str) -> None:
    data = _tar([member])
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar, pytest.raises(ValueError, match=why):
        tarsafe.extract_plain(tar, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "model" / "link").exists()
    assert tarsafe.unsafe_reason(tarfile.TarInfo("fine.txt")) is None
