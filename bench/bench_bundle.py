"""Export (sign) and `appliance verify` of a bundle holding a large model, against `openssl dgst -sha256`.

The peer is the physical limit of hashing here: `openssl dgst -sha256` over the same model
files, in the same run. Three figures, printed, never asserted:

1. export: the service writes the signed bundle (copy, model-signing by the release key,
   manifest, provenance, ledger excerpt) and streams it as a tar, which is written to disk;
2. verify: `verify_bundle` on the bundle folder (trust store, manifest, every file's digest,
   the model digest, model-signing, provenance, ledger excerpt);
3. openssl: the files' sha256, which both of the above must compute at least once.

Each as MB/s of model bytes, and as a ratio to openssl's MB/s. The model is random bytes
(a safetensors-sized file plus a config), recorded in a fresh home as a run's model.

    .venv/bin/python bench/bench_bundle.py [--size-gb 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.service import Caller, Service  # noqa: E402
from appliance.service.api import dispatch  # noqa: E402
from appliance.service.release import release_init  # noqa: E402
from keys.keystore import load_public_key  # noqa: E402
from registry.bundle import unpack_bundle, verify_bundle  # noqa: E402
from registry.modelsig import sign_model_dir  # noqa: E402

PASSPHRASE = b"bench passphrase, not a secret"
CHUNK = 64 << 20


def write_model(folder: Path, size: int) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama", "note": "benchmark: random weights"}\n')
    with open(folder / "model.safetensors", "wb") as f:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def record_model(svc: Service, folder: Path) -> str:
    sign_model_dir(folder, svc.key)
    stored = svc.store.import_path(folder, kind="model", name="bench-run/model", signer=svc.key, move=True)
    run_id = "bench-run"
    env = {"python": sys.version.split()[0], "note": "benchmark"}
    svc.ledger.append_many(
        [
            ("run.started", "bench", {"run_id": run_id, "recipe_name": "bench-model", "recipe_digest": "0" * 64, "recipe": {}, "environment": env}),
            (
                "artifact.recorded",
                "bench",
                {
                    "digest": stored.digest,
                    "kind": "model",
                    "name": f"{run_id}/model",
                    "size_bytes": stored.size_bytes,
                    "files": stored.files,
                    "store_path": str(stored.path.relative_to(svc.home.store_dir)),
                    "run_id": run_id,
                    "stage": "package",
                    "parents": [],
                    "meta": {},
                },
            ),
            ("run.finished", "bench", {"run_id": run_id, "status": "succeeded", "error": None, "summary": {}}),
        ]
    )
    return stored.digest


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="model size (default 1.0 GB)")
    ap.add_argument("--keep", help="work here and keep it (default: a temporary folder, removed)")
    args = ap.parse_args()
    size = int(args.size_gb * 1e9)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        home = work / "home"
        Service.initialise(home, PASSPHRASE, Caller.current(), two_person=False).close()
        release_init(home, PASSPHRASE, home / "keys" / "root.key", PASSPHRASE)
        print(f"writing a {size / 1e9:.2f} GB random model …", flush=True)
        write_model(work / "model", size)
        with Service.open(home, PASSPHRASE) as svc:
            digest = record_model(svc, work / "model")
            model_files = [p for p in svc.store.path_of(digest).rglob("*") if p.is_file()]
            tar = work / "bundle.tar"

            def export() -> None:
                with open(tar, "wb") as sink:
                    for chunk in dispatch(svc, Caller.current(), "bundle.export", {"model": "bench-model:1"}):
                        sink.write(chunk)

            t_export = timed(export)
        folder = unpack_bundle(tar, work / "bundle")
        root = load_public_key(home / "keys" / "root.pub.pem")
        t_verify = timed(lambda: verify_bundle(folder, root))
        t_openssl = timed(lambda: subprocess.run(["openssl", "dgst", "-sha256", *map(str, model_files)], check=True, capture_output=True))
        mb = sum(p.stat().st_size for p in model_files) / 1e6
        rows = [("openssl dgst -sha256 (peer)", t_openssl), ("appliance export (sign, tar, write)", t_export), ("appliance verify (bundle folder)", t_verify)]
        peer = mb / t_openssl
        print(f"\nmodel: {mb:.0f} MB in {len(model_files)} files; {os.cpu_count()} CPUs")
        print(f"{'':40} {'seconds':>8} {'MB/s':>8} {'× openssl':>10}")
        for name, t in rows:
            print(f"{name:40} {t:8.2f} {mb / t:8.0f} {mb / t / peer:10.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
