"""`appliance import BUNDLE --root-key PEM`: accept a model another site exported, only once it verifies.

The bundle is checked exactly as `appliance verify` checks it (registry/bundle.py), against the
origin's root key the importer gives (never one shipped inside the bundle), and the model's own
model-signing signature against the origin's node key from that root-signed trust store. A
version of a name from one origin that is not newer than one already imported is a replay and
is refused. An accepted model is stored (its digest is the origin's), recorded as an
``imported-model`` artifact, and the import as ``model.imported`` with the origin's keys; it is
then in the registry under its name, and a fine-tuning recipe may use it as its base.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.service.caller import Caller
from keys.errors import SigningError
from keys.keystore import public_key_from_pem
from registry.bundle import RELEASE_SIG, unpack_bundle, verify_bundle
from registry.errors import BundleError
from registry.modelsig import verify_model_dir


def model_import(svc: Any, caller: Caller, *, path: str, root_key: str, trust_store: str | None = None) -> dict[str, Any]:
    """Verify the bundle at ``path`` against the origin's root key (PEM text) and import its model."""
    svc.authorize(caller, "model.import", path)
    real = caller.require_readable(Path(path), what="the bundle", tree=True)
    root = public_key_from_pem(root_key.encode("utf-8"), source="the origin's root key")
    svc.home.work_dir.mkdir(mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="import-", dir=svc.home.work_dir) as tmp:
        work = Path(tmp)
        folder = unpack_bundle(real, work / "bundle") if real.is_file() else real
        newer = None
        if trust_store is not None:
            newer = work / "newer-truststore.json"
            newer.write_text(trust_store, encoding="utf-8")
        report = verify_bundle(folder, root, root_source="the origin's root key given to import", trust_store=newer)
        model = report["model"]
        name, version, digest = str(model["name"]), int(model["version"]), str(model["digest"])
        _refuse_replay(svc, name, version, report["root_key_id"])
        staged = work / "model"
        shutil.copytree(folder / "model", staged, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(RELEASE_SIG))
        node_pem = _check_node_signature(staged, report["node_keys"], work)
        manifest_sha256 = hashlib.sha256((folder / "bundle.json").read_bytes()).hexdigest()
        stored = svc.store.import_path(staged, kind="imported-model", name=name, signer=svc.key, move=True)
    if stored.digest != digest:
        raise BundleError(f"the imported model stored as {stored.digest[:16]}…, not the bundle's {digest[:16]}…", "report this: it is a bug")
    origin = {
        "root_key_id": report["root_key_id"],
        "release_key_id": report["release_key_id"],
        "node_key_id": node_pem[0],
        "exporter": report["exporter"],
        "exported_at": report["created_at"],
        "version": version,
    }
    svc.ledger.append_many(
        [
            (
                "artifact.recorded",
                caller.user,
                {
                    "digest": digest,
                    "kind": "imported-model",
                    "name": name,
                    "size_bytes": stored.size_bytes,
                    "files": stored.files,
                    "store_path": str(stored.path.relative_to(svc.home.store_dir)),
                    "run_id": None,
                    "stage": "import",
                    "parents": [],
                    "meta": {"origin": origin, "dependencies": report["dependencies"]},
                },
            ),
            (
                "model.imported",
                caller.user,
                {
                    "digest": digest,
                    "name": name,
                    "version": version,
                    "origin_root_key_id": report["root_key_id"],
                    "release_key_id": report["release_key_id"],
                    "origin_node_key_id": node_pem[0],
                    "origin_node_key_pem": node_pem[1],
                    "bundle_manifest_sha256": manifest_sha256,
                    "origin": f"bundle {real} from {caller.user} (uid {caller.uid})",
                },
            ),
        ]
    )
    return {"name": name, "origin_version": version, "digest": digest, "store_path": str(stored.path), "origin_root_key_id": report["root_key_id"]}


def _refuse_replay(svc: Any, name: str, version: int, root_key_id: str) -> None:
    rows = svc.ledger.select(
        "SELECT max(CAST(body ->> '$.data.version' AS BIGINT)) FROM events WHERE kind = 'model.imported' "
        "AND body ->> '$.data.name' = ? AND body ->> '$.data.origin_root_key_id' = ?",
        [name, root_key_id],
    )
    seen = rows[0][0] if rows and rows[0][0] is not None else None
    if seen is not None and version <= int(seen):
        raise BundleError(
            f"{name} version {version} from this origin is not newer than version {seen} already imported: an older or repeated bundle is a replay",
            "ask the origin for its newest export; `appliance registry list` shows what was imported",
        )


def _check_node_signature(model_dir: Path, node_keys: dict[str, str], work: Path) -> tuple[str, str]:
    """The origin's node key whose model-signing signature (model.sig) covers the model; (key id, PEM)."""
    for key_id, pem in node_keys.items():
        path = work / f"node-{key_id[:16]}.pub.pem"
        path.write_text(pem, encoding="ascii")
        try:
            verify_model_dir(model_dir, path)
        except SigningError:
            continue
        return key_id, pem
    raise BundleError(
        f"the model's own signature (model.sig) verifies with none of the origin's {len(node_keys)} node keys",
        "do not import it; ask the origin for a new export",
    )
