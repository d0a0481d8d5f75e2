"""Check an offline wheel bundle against its manifest, with the standard library alone.

The same code runs in two places: imported by `airgap.bundle` (``appliance airgap verify``),
and copied into every bundle as ``check.py``, which ``install.sh`` runs with the host's
``python3`` before anything is installed (the appliance is not there yet to import). So this
module imports nothing but the standard library, and nothing of the appliance's.

The manifest's signature is checked before this runs (openssl in install.sh, the release key
in `airgap.bundle`); this checks the rest: every listed file present with its size and
sha256, and nothing in the bundle that the manifest does not list.

    python3 check.py verify BUNDLE REQUIREMENTS_OUT   # check; write pip's --require-hashes file
    python3 check.py record BUNDLE VENV               # after pip: the environment's bundle record
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

FORMAT = "appliance-wheel-bundle/v1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
WHEELS = "wheels"
RECORD = "appliance-bundle.json"  # in the environment; read by airgap.attest
REBUILD = "the bundle was changed after it was signed: get it again from the build machine (or rebuild it there with `appliance airgap bundle`)"


class BundleProblem(ValueError):
    """The bundle does not match its manifest. ``fix`` says what to do."""

    def __init__(self, message: str, fix: str = REBUILD) -> None:
        super().__init__(message)
        self.fix = fix


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleProblem(
            f"{bundle} holds no {MANIFEST}", f"give the bundle's folder (the one `appliance airgap bundle --out` made) and check its path: {bundle}"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleProblem(f"{path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleProblem(f"{path} is not an appliance wheel bundle manifest (format {FORMAT})", "give the folder `appliance airgap bundle --out` made")
    for key in ("wheels", "files"):
        if not isinstance(manifest.get(key), list):
            raise BundleProblem(f"{path}: '{key}' is missing or not a list")
    return manifest


def _entries(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [(f"{WHEELS}/{w['file']}", w) for w in manifest["wheels"]]
    out += [(f["path"], f) for f in manifest["files"]]
    for rel, _ in out:
        # A manifest is signed, but a path that climbs out of the bundle is refused anyway.
        parts = Path(rel).parts
        if not parts or rel.startswith("/") or ".." in parts or (parts[0] == WHEELS and len(parts) != 2):
            raise BundleProblem(f"the manifest names a path outside the bundle: {rel!r}")
    return out


def check_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its size and sha256; no file the manifest does not list."""
    entries = _entries(manifest)
    listed = {rel for rel, _ in entries} | {MANIFEST, SIGNATURE}
    extra = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and str(p.relative_to(bundle)) not in listed)
    if extra:
        raise BundleProblem(
            f"{bundle} holds {len(extra)} file(s) its signed manifest does not list: {', '.join(extra[:5])}",
            "a file was added after signing: remove it, or get the bundle again from the build machine",
        )
    missing = sorted(rel for rel, _ in entries if not (bundle / rel).is_file())
    if missing:
        raise BundleProblem(f"{bundle} lacks {len(missing)} file(s) its signed manifest lists: {', '.join(missing[:5])}", "copy the whole bundle folder again")
    for rel, entry in entries:
        path = bundle / rel
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise BundleProblem(f"{path} does not match its signed sha256 in the manifest ({entry['sha256'][:16]}…)")


def requirements(manifest: dict[str, Any]) -> str:
    """pip's --require-hashes requirements: every wheel, pinned to its version and sha256."""
    return "".join(f"{w['name']}==={w['version']} --hash=sha256:{w['sha256']}\n" for w in manifest["wheels"])


def record(bundle: Path, venv: Path) -> dict[str, Any]:
    """Write (or update) the environment's record of what bundles installed it: wheel sha256 per distribution."""
    manifest_bytes = (bundle / MANIFEST).read_bytes()
    manifest = json.loads(manifest_bytes)
    path = venv / RECORD
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    ours = {w["name"] for w in manifest["wheels"]}
    wheels = [w for w in previous.get("wheels", []) if w.get("name") not in ours]
    wheels += [{"name": w["name"], "version": w["version"], "file": w["file"], "sha256": w["sha256"]} for w in manifest["wheels"]]
    entry = {
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signer_key_id": manifest.get("signer_key_id"),
        "appliance": manifest.get("appliance"),
        "target": manifest.get("target", {}).get("name"),
        "partial": manifest.get("partial", False),
        "installed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    data = {"wheels": sorted(wheels, key=lambda w: w["name"]), "bundles": [*previous.get("bundles", []), entry]}
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return data


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "verify":
            bundle = Path(argv[1])
            manifest = load_manifest(bundle)
            check_files(bundle, manifest)
            Path(argv[2]).write_text(requirements(manifest), encoding="utf-8")
            target = manifest.get("target", {})
            print(f"bundle files OK: {len(manifest['wheels'])} wheels for {target.get('name')}, sha256 each")
            want = target.get("python")
            have = f"{sys.version_info.major}.{sys.version_info.minor}"
            if want and want != have:
                raise BundleProblem(
                    f"the bundle is for Python {want}; this python3 is {have}", f"run install.sh with --python naming a Python {want} interpreter"
                )
            return 0
        if len(argv) == 3 and argv[0] == "record":
            data = record(Path(argv[1]), Path(argv[2]))
            print(f"recorded {len(data['wheels'])} wheel sha256 in {Path(argv[2]) / RECORD}")
            return 0
    except BundleProblem as exc:
        print(f"error: {exc}\n  fix: {exc.fix}", file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
