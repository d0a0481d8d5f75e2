"""Offline wheel bundles: built from local wheels, installed with no index, refused when tampered.

The bundle is small (the appliance, cryptography and what it needs, pip) so CI stays fast; its
wheels come from this machine's local wheel folders, never from an index. Every tamper case runs
the real bootstrap (bash + openssl + python3) and `appliance airgap verify`, and checks that
the environment it was pointed at is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename

from airgap.bundle_check import sha256_file
from airgap.lock import lock_path, portable
from keys.keystore import create_key
from tests.conftest import PASSPHRASE, cli

APPLIANCE = Path(sys.executable).with_name("appliance")
# The appliance with cryptography (which `airgap verify` needs) and pip (the bundle's own).
SMALL = ("pip", "cryptography", "cffi", "pycparser")


def _wheel_folders() -> list[Path]:
    named = os.environ.get("APPLIANCE_TEST_WHEELS", "") + os.pathsep + os.environ.get("PIP_FIND_LINKS", "").replace(" ", os.pathsep)
    folders = [Path(p) for p in named.split(os.pathsep) if p] + [Path("/opt/pypi/files"), Path("/opt/wheels")]
    return [f for f in folders if f.is_dir()]


def _local_wheel(name: str) -> Path | None:
    """The newest wheel of ``name`` in the local wheel folders that installs here."""
    here = set(sys_tags())
    found = []
    for folder in _wheel_folders():
        for path in folder.glob("*.whl"):
            try:
                dist, version, _, tags = parse_wheel_filename(path.name)
            except ValueError:
                continue
            if dist == name and tags & here:
                found.append((version, path))
    return max(found)[1] if found else None


@dataclass
class Built:
    root: Path
    bundle: Path
    pub: Path
    lock: Path


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"APPLIANCE_PASSPHRASE": PASSPHRASE}
    return subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=600, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    wheels = {name: _local_wheel(name) for name in SMALL}
    if missing := [n for n, w in wheels.items() if w is None]:
        pytest.skip(f"no local wheel for {', '.join(missing)} (set APPLIANCE_TEST_WHEELS to a folder holding them)")
    root = tmp_path_factory.mktemp("bundle")
    source = root / "local-wheels"
    source.mkdir()
    raw = {"packages": []}
    for name, wheel in wheels.items():
        assert wheel is not None
        shutil.copy2(wheel, source / wheel.name)
        version = str(parse_wheel_filename(wheel.name)[1])
        raw["packages"].append(
            {"name": name, "version": version, "wheels": [{"name": wheel.name, "url": f"file://{wheel}", "hashes": {"sha256": sha256_file(wheel)}}]}
        )
    lock = root / "pylock.small.toml"
    lock.write_text(portable(raw, "cpu-py311-manylinux_x86_64", torch="cpu", requirements=list(SMALL), constraints=[], python="3.11"))
    create_key(root / "release.key", PASSPHRASE.encode())
    done = _run(
        [
            str(APPLIANCE),
            "airgap",
            "bundle",
            "--lock",
            str(lock),
            "--out",
            str(root / "b"),
            "--key",
            str(root / "release.key"),
            "--no-index",
            "--find-links",
            str(source),
        ]
    )
    assert done.returncode == 0, done.stderr
    return Built(root, root / "b", root / "release.pub.pem", lock)


def _tree(path: Path) -> list[tuple[str, int, int]]:
    """What a folder holds: every file's path, size and mtime."""
    if not path.exists():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file() or p.is_symlink())


def _install(built: Built, bundle: Path, venv: Path, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    return _run(["bash", str(bundle / "install.sh"), "--key", str(key or built.pub), str(bundle), str(venv)])


def test_bundle_is_signed_and_lists_every_wheel(built: Built) -> None:
    manifest = json.loads((built.bundle / "manifest.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert names == {*SMALL, "sovereign-appliance"}
    for w in manifest["wheels"]:
        assert sha256_file(built.bundle / "wheels" / w["file"]) == w["sha256"]
    assert {f["path"] for f in manifest["files"]} == {"install.sh", "check.py", built.lock.name}
    assert manifest["target"]["name"] == "cpu-py311-manylinux_x86_64" and manifest["target"]["python"] == "3.11"
    # A third party checks the signature with openssl alone.
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(built.pub), "-signature", str(built.bundle / "manifest.json.sig"), str(built.bundle / "manifest.json")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "Verified OK" in done.stdout


def test_install_into_a_fresh_venv_with_no_index(built: Built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = _install(built, built.bundle, venv)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "signature OK" in done.stdout and "bundle files OK: 5 wheels" in done.stdout
    # The appliance starts, from the environment, not from this checkout.
    version = subprocess.run([str(venv / "bin" / "appliance"), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("appliance 0.1.0"), version.stderr
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import appliance; print(appliance.__file__)"], capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout
    # Self-test: the installed appliance verifies its own bundle, and its jobs' guard works.
    check = _run([str(venv / "bin" / "appliance"), "airgap", "verify", str(built.bundle), "--key", str(built.pub)], cwd=tmp_path)
    assert check.returncode == 0 and "bundle OK: 5 wheels" in check.stdout, check.stderr
    probe = _run([str(venv / "bin" / "python"), "-m", "airgap.run", "airgap.selftest"], cwd=tmp_path)
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["guard"] and report["refuses_lookup"] and report["refuses_connect"]
    # Every distribution in the environment came from the bundle (pip too), and the
    # attestation carries each wheel's sha256.
    manifest = json.loads((built.bundle / "manifest.json").read_text())
    attested = _run([str(venv / "bin" / "python"), "-c", "import json; from airgap.attest import packages; print(json.dumps(packages()))"], cwd=tmp_path)
    pkgs = {p["name"].lower(): p for p in json.loads(attested.stdout)}
    assert set(pkgs) == {w["name"] for w in manifest["wheels"]}
    assert all(pkgs[w["name"]]["wheel_sha256"] == w["sha256"] for w in manifest["wheels"])
    record = json.loads((venv / "appliance-bundle.json").read_text())
    assert record["bundles"][0]["signer_key_id"] == manifest["signer_key_id"]


def _flip_byte(b: Path) -> None:
    wheel = next((b / "wheels").glob("cryptography-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 1
    wheel.write_bytes(bytes(data))


def _remove_wheel(b: Path) -> None:
    next((b / "wheels").glob("cffi-*.whl")).unlink()


def _extra_wheel(b: Path) -> None:
    shutil.copy2(next((b / "wheels").glob("pycparser-*.whl")), b / "wheels" / "evil-1.0-py3-none-any.whl")


def _edit_manifest(b: Path) -> None:
    m = json.loads((b / "manifest.json").read_text())
    m["wheels"][0]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")


def _edit_checker(b: Path) -> None:
    with (b / "check.py").open("a") as f:
        f.write("\nraise SystemExit(0)\n")


def _unsign(b: Path) -> None:
    (b / "manifest.json.sig").unlink()


TAMPER: dict[str, tuple[Callable[[Path], None], str]] = {
    "changed wheel": (_flip_byte, "does not match its signed sha256"),
    "missing wheel": (_remove_wheel, "lacks 1 file(s) its signed manifest lists: wheels/cffi-"),
    "extra wheel": (_extra_wheel, "its signed manifest does not list: wheels/evil-1.0-py3-none-any.whl"),
    "edited manifest": (_edit_manifest, "signature does not verify"),
    "changed checker": (_edit_checker, "check.py does not match its signed sha256"),
    "unsigned": (_unsign, "unsigned"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_bundle_installs_nothing(built: Built, tmp_path: Path, case: str) -> None:
    tamper, message = TAMPER[case]
    bundle = tmp_path / "b"
    shutil.copytree(built.bundle, bundle)
    tamper(bundle)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    before = _tree(venv)
    done = _install(built, bundle, venv)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and "fix:" in done.stderr, done.stderr
    assert _tree(venv) == before
    # A new environment is not even made.
    assert _install(built, bundle, tmp_path / "new").returncode == 2 and not (tmp_path / "new").exists()
    # `appliance airgap verify` refuses it the same way.
    check = _run([str(APPLIANCE), "airgap", "verify", str(bundle), "--key", str(built.pub)])
    assert check.returncode == 2 and message in check.stderr, check.stderr


def test_bundle_signed_by_another_key_is_refused(built: Built, tmp_path: Path) -> None:
    other = tmp_path / "other.pub.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    done = _install(built, built.bundle, tmp_path / "venv", key=other)
    assert done.returncode == 2 and "signature does not verify with" in done.stderr and not (tmp_path / "venv").exists()
    check = _run([str(APPLIANCE), "airgap", "verify", str(built.bundle), "--key", str(other)])
    assert check.returncode == 2 and "the manifest names signer" in check.stderr, check.stderr


def test_install_refuses_without_a_key(built: Built, tmp_path: Path) -> None:
    done = _run(["bash", str(built.bundle / "install.sh"), str(built.bundle), str(tmp_path / "venv")])
    assert done.returncode == 2 and "no release key given" in done.stderr and not (tmp_path / "venv").exists()


def test_bundle_refuses_an_existing_folder_and_unknown_names(built: Built, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = str(built.root / "release.key")
    code, _, err = cli(capsys, "airgap", "bundle", "--lock", str(built.lock), "--out", str(built.bundle), "--key", key)
    assert code == 2 and "already exists" in err
    code, _, err = cli(capsys, "airgap", "bundle", "--lock", str(built.lock), "--out", str(tmp_path / "x"), "--key", key, "--only", "nosuchthing")
    assert code == 2 and "nosuchthing, not in the lock" in err and not (tmp_path / "x").exists()


def test_failed_fetch_leaves_no_bundle(built: Built, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty wheel folder and no index: pip finds nothing, and no half-made bundle is left.
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    out = tmp_path / "b"
    code, _, err = cli(
        capsys,
        "airgap",
        "bundle",
        "--lock",
        str(built.lock),
        "--out",
        str(out),
        "--key",
        str(built.root / "release.key"),
        "--no-index",
        "--find-links",
        str(empty),
    )
    assert code == 2 and "pip download failed" in err and "--find-links" in err
    assert not out.exists() and not list(tmp_path.glob(".b.partial-*"))


def test_committed_lock_is_used_by_default(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # No key needed to see that the default target's lock is read: a missing key is reported after it.
    code, _, err = cli(capsys, "airgap", "bundle", "--out", str(tmp_path / "b"), "--key", str(tmp_path / "none.key"))
    assert code == 2 and "none.key" in err
    assert lock_path("cpu-py311-manylinux_x86_64").is_file()
