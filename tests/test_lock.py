"""The hash-pinned lock: read back, portable, and checked against pyproject.toml (CI's drift check)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from airgap.lock import DEFAULT_TARGET, Lock, LockError, drift, load_lock, lock_path, portable
from tests.conftest import cli

ROOT = Path(__file__).resolve().parent.parent


def test_committed_lock_matches_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    """CI's drift check: every requirement of pyproject.toml (and the CPU torch pin) is met by the lock."""
    lock = load_lock(lock_path(DEFAULT_TARGET))
    assert drift(lock) == []
    names = {p.name: p for p in lock.packages}
    assert names["torch"].version.endswith("+cpu")
    assert "pip" in names and "sovereign-appliance" not in names
    assert lock.target.python == "3.11" and lock.target.torch == "cpu"
    text = lock_path(DEFAULT_TARGET).read_text()
    assert "://" not in text, "a lock names no index or folder of the machine that made it"
    code, out, _ = cli(capsys, "airgap", "lock", "--check")
    assert code == 0 and f"{len(lock.packages)} packages" in out


@pytest.mark.parametrize("path", sorted((ROOT / "locks").glob("pylock.*.toml")), ids=lambda p: p.name)
def test_every_committed_lock_matches_pyproject(path: Path) -> None:
    lock = load_lock(path)
    assert path.name == f"pylock.{lock.target.name}.toml"
    assert drift(lock) == [], f"{path.name}: remake it with `appliance airgap lock --target {lock.target.name}`"
    assert "://" not in path.read_text()

    def torch(lk: Lock) -> str:
        return next(p.version for p in lk.packages if p.name == "torch").split("+")[0]

    # The same torch release for every build, the one CI tests; the CUDA build brings its runtime wheels.
    assert torch(lock) == torch(load_lock(lock_path(DEFAULT_TARGET)))
    assert (lock.target.torch == "cuda") == any(p.name.startswith("nvidia-") for p in lock.packages)


def _project_copy(tmp_path: Path, old: str, new: str) -> Path:
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    assert old in text
    pyproject.write_text(text.replace(old, new, 1))
    return pyproject


def test_drift_names_a_new_or_unmet_requirement(tmp_path: Path) -> None:
    lock = load_lock(lock_path(DEFAULT_TARGET))
    added = drift(lock, _project_copy(tmp_path, '"numpy>=1.26",', '"numpy>=1.26",\n  "left-pad>=1",'))
    assert "left-pad>=1 is not in the lock" in added
    assert any("changed since the lock was made" in p for p in added)
    unmet = drift(lock, _project_copy(tmp_path, '"numpy>=1.26",', '"numpy>=99",'))
    assert any(p.startswith("numpy>=99 is not met by the locked numpy") for p in unmet)
    # A requirement whose marker does not apply to the target is not asked of the lock.
    assert not any(
        "winreg" in p for p in drift(lock, _project_copy(tmp_path, '"numpy>=1.26",', '"numpy>=1.26",\n  "winreg-helper>=1; sys_platform == \'win32\'",'))
    )


def test_lock_check_cli_fails_on_drift(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    lock = tmp_path / "pylock.x.toml"
    text = lock_path(DEFAULT_TARGET).read_text()
    lock.write_text(text.replace('requirements-sha256 = "', 'requirements-sha256 = "0', 1))
    code, _, err = cli(capsys, "airgap", "lock", "--check", "--lock", str(lock))
    assert code == 2 and "no longer matches pyproject.toml" in err and "appliance airgap lock" in err


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('lock-version = "1.0"', 'lock-version = "0.9"', "lock-version is '0.9'"),
        ('sha256 = "', 'sha256 = "zz', "hashes.sha256 is not a sha256 hex digest"),
        ('torch = "cpu"', "", "tool.appliance.torch is missing"),
        ("[[packages.wheels]]", "[packages.nowheels]", "packages[0].wheels is missing"),
    ],
)
def test_malformed_lock_names_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    lock = tmp_path / "pylock.x.toml"
    lock.write_text(lock_path(DEFAULT_TARGET).read_text().replace(old, new, 1))
    with pytest.raises(LockError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")) as exc:
        load_lock(lock)
    assert str(lock) in str(exc.value)


def test_missing_lock_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="no lock at") as exc:
        load_lock(tmp_path / "pylock.none.toml")
    assert "appliance airgap lock" in exc.value.diagnostics()


def test_portable_drops_urls_and_the_source_tree(tmp_path: Path) -> None:
    raw = {
        "packages": [
            {
                "name": "Zstandard",
                "version": "0.25.0",
                "wheels": [
                    {
                        "name": "zstandard-0.25.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                        "url": "file:///somewhere/z.whl",
                        "hashes": {"sha256": "a" * 64},
                    }
                ],
            },
            {"name": "sovereign-appliance", "directory": {"path": "."}},
            {
                "name": "rich",
                "version": "15.0.0",
                "wheels": [{"name": "rich-15.0.0-py3-none-any.whl", "url": "https://index.example/rich.whl", "hashes": {"sha256": "b" * 64}}],
            },
        ]
    }
    path = tmp_path / "pylock.t.toml"
    path.write_text(portable(raw, "cpu-py311-manylinux_x86_64", torch="cpu", requirements=["rich"], constraints=[], python="3.11"))
    assert "://" not in path.read_text()
    lock = load_lock(path)
    assert [(p.name, p.version) for p in lock.packages] == [("rich", "15.0.0"), ("zstandard", "0.25.0")]
    assert lock.target.platforms == ("manylinux2014_x86_64", "manylinux_2_17_x86_64") and lock.target.abi == "cp311"
    assert "--platform" in lock.target.pip_args()
    sdist_only = {"packages": [{"name": "deepspeed", "version": "0.18.0", "sdist": {"name": "deepspeed-0.18.0.tar.gz"}}]}
    with pytest.raises(LockError, match="no wheel for deepspeed"):
        portable(sdist_only, "x", torch="cpu", requirements=[], constraints=[], python="3.11")


def test_lock_folder_is_shipped_with_the_tree() -> None:
    # The bundle copies the lock into itself; the lock must be where the CLI looks by default.
    assert lock_path(DEFAULT_TARGET).parent == ROOT / "locks"
    assert shutil.which("openssl"), "install.sh needs openssl; so do these tests"


def test_lock_failure_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # No package source at all: pip lock fails (or is missing from an older pip); the message says which, no file is left.
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "pylock.x.toml"
    code, _, err = cli(capsys, "airgap", "lock", "--lock", str(out), "--no-index", "--find-links", str(empty))
    assert code == 2 and "pip lock failed" in err and "pip >= 25.1" in err
    assert not out.exists() and not list(ROOT.glob("pylock.raw*.toml"))
