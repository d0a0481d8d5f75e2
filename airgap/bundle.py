"""Offline wheel bundles: everything an air-gapped head node installs, hash-pinned and signed.

Built on a connected machine (`build_bundle`): the lock's wheels for its target, fetched by
name, version and sha256 with ``pip download`` (through whatever index and folders that
machine's pip uses), plus the appliance's own wheel; a manifest lists every file with its
size and sha256 and is signed (ECDSA P-256, DER, over the manifest's bytes) with a release
key, so ``openssl dgst -sha256 -verify`` checks it with nothing of ours installed.

Layout::

    BUNDLE/manifest.json        format, appliance, target, lock, signer key id, wheels, files
    BUNDLE/manifest.json.sig    the release key's signature over manifest.json
    BUNDLE/wheels/*.whl
    BUNDLE/install.sh           the bootstrap: openssl + python3 + pip (airgap/install.sh)
    BUNDLE/check.py             the file checks install.sh runs (airgap/bundle_check.py)
    BUNDLE/pylock.<target>.toml the lock it was built from

`verify_bundle` does what install.sh does, from Python (``appliance airgap verify``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from airgap import bundle_check
from airgap.bundle_check import FORMAT, MANIFEST, SIGNATURE, WHEELS, BundleProblem, sha256_file
from airgap.errors import AirgapError
from airgap.lock import ROOT, Lock, Locked, normalise
from keys.errors import SigningError
from keys.keystore import NodeKey, key_id_of, verify_signature

HERE = Path(__file__).resolve().parent
APPLIANCE = "sovereign-appliance"
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
SOURCE_PACKAGES = ("appliance", "registry", "pipeline", "policies", "keys", "airgap")


class BundleError(AirgapError):
    """A bundle cannot be built, or does not verify: tampered, incomplete, or signed by another key."""


def _pip(args: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        detail = " / ".join(lines[-4:])
        raise BundleError(
            f"{what} failed: {detail}", "give the build machine's wheel sources with --find-links DIR or --index-url URL (see the message for the requirement)"
        )


def _appliance_wheel(work: Path, source: Path | None, wheel: Path | None, pip_args: list[str]) -> Path:
    if wheel is not None:
        if not wheel.is_file() or not wheel.name.startswith("sovereign_appliance-") or wheel.suffix != ".whl":
            raise BundleError(
                f"{wheel} is not the appliance's wheel (sovereign_appliance-*.whl)",
                "build it with `pip wheel --no-deps -w DIR SOURCE`, or leave out --appliance-wheel",
            )
        return wheel
    source = source or ROOT
    if not (source / "pyproject.toml").is_file():
        raise BundleError(
            f"{source} is not the appliance's source tree (no pyproject.toml)", "give the source tree with --source, or a built wheel with --appliance-wheel"
        )
    # Built from a clean copy: an in-tree build reuses build/, where a module since deleted lingers.
    tree = work / "source"
    tree.mkdir()
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tree / name)
    for name in SOURCE_PACKAGES:
        if not (source / name).is_dir():
            raise BundleError(
                f"{source} lacks the package folder {name}/", "give the appliance's source tree with --source, or a built wheel with --appliance-wheel"
            )
        shutil.copytree(source / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = work / "appliance"
    try:
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]  # build with this environment's setuptools: no index needed
    except ImportError:
        isolation = pip_args
    _pip(["wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(tree)], "building the appliance's wheel")
    built = sorted(out.glob("sovereign_appliance-*.whl"))
    if len(built) != 1:
        raise BundleError(f"building the appliance's wheel from {source} gave {len(built)} wheels", "build it by hand and pass it with --appliance-wheel")
    return built[0]


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def build_bundle(
    out: Path,
    key: NodeKey,
    lock: Lock,
    *,
    pip_args: list[str] | None = None,
    source: Path | None = None,
    appliance_wheel: Path | None = None,
    only: list[str] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Gather the lock's wheels and the appliance's, write and sign the manifest; all or nothing at ``out``."""
    pip_args = list(pip_args or [])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} already exists", "name a new folder with --out (a bundle is never written over another)")
    chosen: list[Locked] = list(lock.packages)
    with_appliance = True
    if only:
        wanted = {normalise(n) for n in only}
        unknown = sorted(wanted - {p.name for p in lock.packages} - {APPLIANCE})
        if unknown:
            raise BundleError(f"--only names {', '.join(unknown)}, not in the lock {lock.path.name}", f"name distributions of the lock (or {APPLIANCE})")
        chosen = [p for p in chosen if p.name in wanted]
        with_appliance = APPLIANCE in wanted
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    wheels_dir = staging / WHEELS
    wheels_dir.mkdir(parents=True)
    try:
        if chosen:
            progress(f"fetching {len(chosen)} wheels for {lock.target.name} (pip download, hash-pinned)")
            reqs = staging / "requirements.txt"
            reqs.write_text("".join(p.requirement() + "\n" for p in chosen), encoding="utf-8")
            _pip(
                [
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--require-hashes",
                    "-d",
                    str(wheels_dir),
                    "-r",
                    str(reqs),
                    *lock.target.pip_args(),
                    *pip_args,
                ],
                "pip download",
            )
            reqs.unlink()
        entries = []
        for p in chosen:
            path = wheels_dir / p.wheel
            if not path.is_file():
                got = ", ".join(sorted(f.name for f in wheels_dir.glob(f"{p.wheel.split('-')[0]}-*")))
                raise BundleError(
                    f"pip fetched no {p.wheel} for {p.name} {p.version} (got: {got or 'nothing'})",
                    "the lock's wheel must be the one fetched: regenerate the lock or give the wheel's folder",
                )
            entries.append({"file": p.wheel, "name": p.name, "version": p.version, "sha256": sha256_file(path), "size": path.stat().st_size})
        appliance_info = None
        if with_appliance:
            progress("building the appliance's wheel")
            wheel = _appliance_wheel(staging, source, appliance_wheel, pip_args)
            shutil.copy2(wheel, wheels_dir / wheel.name)
            shutil.rmtree(staging / "appliance", ignore_errors=True)
            shutil.rmtree(staging / "source", ignore_errors=True)
            path = wheels_dir / wheel.name
            appliance_info = {"name": APPLIANCE, "version": _wheel_version(wheel)}
            entries.append({"file": wheel.name, "name": APPLIANCE, "version": _wheel_version(wheel), "sha256": sha256_file(path), "size": path.stat().st_size})
        extra = sorted({f.name for f in wheels_dir.iterdir()} - {e["file"] for e in entries})
        if extra:
            raise BundleError(f"pip left files the lock does not name: {', '.join(extra)}", "regenerate the lock (`appliance airgap lock`)")
        files = []
        for src, name in ((HERE / "install.sh", "install.sh"), (HERE / "bundle_check.py", "check.py"), (lock.path, lock.path.name)):
            shutil.copy2(src, staging / name)
            files.append({"path": name, "sha256": sha256_file(staging / name), "size": (staging / name).stat().st_size})
        (staging / "install.sh").chmod(0o755)
        manifest = {
            "format": FORMAT,
            "appliance": appliance_info,
            "target": {
                "name": lock.target.name,
                "python": lock.target.python,
                "implementation": lock.target.implementation,
                "abi": lock.target.abi,
                "platforms": list(lock.target.platforms),
                "torch": lock.target.torch,
            },
            "lock": {"file": lock.path.name, "sha256": lock.sha256()},
            "partial": bool(only),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "built_with": {"python": platform.python_version(), "platform": platform.platform()},
            "signer_key_id": key.key_id,
            "wheels": sorted(entries, key=lambda e: str(e["name"])),
            "files": files,
        }
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8")
        (staging / MANIFEST).write_bytes(data)
        (staging / SIGNATURE).write_bytes(key.sign(data))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"bundle written: {out}")
    return manifest


def verify_bundle(bundle: Path, public_key: ec.EllipticCurvePublicKey, *, key_source: str = "the given key") -> dict[str, Any]:
    """The manifest's signature by ``public_key``, then every file's sha256, and nothing extra; the manifest."""
    try:
        manifest = bundle_check.load_manifest(bundle)
        data = (bundle / MANIFEST).read_bytes()
        try:
            signature = (bundle / SIGNATURE).read_bytes()
        except FileNotFoundError:
            raise BundleProblem(f"{bundle} holds no {SIGNATURE}: the bundle is unsigned", "get the signed bundle from the build machine") from None
        try:
            verify_signature(public_key, signature, data)
        except SigningError:
            signer = str(manifest.get("signer_key_id") or "?")
            ours = key_id_of(public_key)
            why = f"the manifest names signer {signer[:16]}…, this key is {ours[:16]}…" if signer != ours else "the manifest was changed after signing"
            raise BundleProblem(
                f"{bundle / MANIFEST}: the signature does not verify with {key_source} ({why})",
                "check that you hold the release key of the site that built it (`appliance keys export-public --role release` there); never install a bundle that fails this",
            ) from None
        bundle_check.check_files(bundle, manifest)
    except BundleProblem as exc:
        raise BundleError(str(exc), exc.fix) from None
    return manifest
