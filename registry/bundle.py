"""Export bundles: a signed model with everything another site needs to check where it came from.

A bundle (a folder, or the same as one tar file for a USB stick)::

    bundle.json            the manifest: model name, version, kind, digest; sha256 of every other file
    bundle.dsse.json       the manifest, signed by the release key (DSSE)
    model/…                the model directory exactly as stored (its digest is the ledger's)
    model/release.sig      model-signing's signature of the model directory by the release key
    provenance.dsse.json   in-toto Statement v1 + SLSA v1 provenance, signed by the release key
    ledger/excerpt.jsonl   the ledger events of the model's lineage, whole
    ledger/chain.jsonl     every link (seq, prev_hash, hash, key, signature) from the first of them to the head
    ledger/head.json       the signed head the chain ends at
    keys/truststore.json   the exporting site's root-signed trust store

`verify_bundle` checks all of it offline against a root public key the verifier already
trusts: a key shipped in the bundle proves nothing alone. Every failure is a BundleError (or
the trust store's, the envelope's, model-signing's typed error) naming the file and what to do.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from keys.digest import dir_manifest, manifest_text, sha256_bytes, sha256_file
from keys.errors import SigningError
from keys.keystore import NodeKey, verify_signature
from keys.tarsafe import extract_plain, unsafe_reason
from keys.truststore import TrustStore, read_store
from registry.canonical import canonical_json
from registry.dsse import open_envelope, payload_json, sign_envelope
from registry.errors import BundleError
from registry.ledger_verify import chain_hash, head_message
from registry.modelsig import sign_model_dir, signed_file_digests, verify_signed_files
from registry.provenance import check_statement

FORMAT = "sovereign-appliance-bundle/v1"
BUNDLE_TYPE = "application/vnd.sovereign-appliance.bundle+json"
RELEASE_SIG = "release.sig"
SIGNED = ("bundle.json", "bundle.dsse.json")
_AGAIN = "do not import it; ask the exporting site for a new bundle"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(value, sort_keys=True, indent=1).encode("utf-8") + b"\n")


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in rows))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _manifest_outside_model(folder: Path) -> list[tuple[str, str, int]]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not rel.startswith("model/"):
            out.append((rel, sha256_file(path), path.stat().st_size))
    return out


def model_digest(model_dir: Path) -> str:
    """The stored model's digest: the directory's manifest digest, the release signature left out."""
    entries = [e for e in dir_manifest(model_dir) if e[0] != RELEASE_SIG]
    return sha256_bytes(manifest_text(entries).encode("utf-8"))


def write_bundle(
    out: Path,
    *,
    model_dir: Path,
    model: dict[str, Any],
    release_key: NodeKey,
    trust_store_file: Path,
    statement: dict[str, Any],
    excerpt: list[dict[str, Any]],
    chain: list[dict[str, Any]],
    head: dict[str, Any],
    exporter: dict[str, Any],
    created_at: str,
) -> Path:
    """Write the bundle folder ``out`` (new); ``model``: name, version, kind, digest."""
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} already exists", "export into a new folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # Hard links where the store is on the same file system: the bundle reads the stored bytes
        # without a second copy (nothing writes to them; the release signature is a new file).
        shutil.copytree(model_dir, tmp / "model", copy_function=_link_or_copy)
        sign_model_dir(tmp / "model", release_key, sig_name=RELEASE_SIG)
        _write_json(tmp / "provenance.dsse.json", sign_envelope(canonical_json(statement), release_key))
        _jsonl(tmp / "ledger" / "excerpt.jsonl", excerpt)
        _jsonl(tmp / "ledger" / "chain.jsonl", chain)
        _write_json(tmp / "ledger" / "head.json", head)
        (tmp / "keys").mkdir()
        shutil.copyfile(trust_store_file, tmp / "keys" / "truststore.json")
        # The model's files were just hashed by model-signing: their digests come from its signed
        # list (one pass fewer over the model); everything else is hashed here.
        files = {f"model/{rel}": d for rel, d in signed_file_digests(tmp / "model" / RELEASE_SIG).items()}
        files[f"model/{RELEASE_SIG}"] = sha256_file(tmp / "model" / RELEASE_SIG)
        files |= {rel: digest for rel, digest, _ in _manifest_outside_model(tmp)}
        # The copy is checked on the same pass that lists it: it must be the stored model.
        if _digest_of({rel.removeprefix("model/"): d for rel, d in files.items() if rel.startswith("model/")}) != model["digest"]:
            raise BundleError(
                f"the copy of the stored model {model_dir} does not match its digest {model['digest'][:16]}…", "run `appliance registry verify` on it"
            )
        manifest = {"format": FORMAT, "model": model, "files": files, "exporter": exporter, "created_at": created_at}
        body = canonical_json(manifest)
        (tmp / "bundle.json").write_bytes(body)
        _write_json(tmp / "bundle.dsse.json", sign_envelope(body, release_key, BUNDLE_TYPE))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tar_into(folder: Path, sink: Any) -> None:
    # 1 MiB blocks: tarfile's default (10 KiB) makes the stream mostly system calls.
    with tarfile.open(fileobj=sink, mode="w|", bufsize=1 << 20) as tar:
        tar.copybufsize = 1 << 20  # type: ignore[attr-defined]
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(path, arcname=path.relative_to(folder).as_posix())
            # Sorted, owner and times left out: the same bundle is the same tar.
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def write_tar(folder: Path, tar_path: Path) -> Path:
    """The bundle folder as one tar file."""
    folder, tar_path = Path(folder), Path(tar_path)
    if tar_path.exists():
        raise BundleError(f"{tar_path} already exists", "choose a new file name")
    with open(tar_path, "wb") as sink:
        _tar_into(folder, sink)
    return tar_path


def stream_tar(folder: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bundle folder as a tar stream, written by a thread into a pipe (never whole in memory or on disk)."""
    import threading

    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                _tar_into(Path(folder), sink)
        except BaseException as exc:  # noqa: BLE001 (handed to the reader)
            failure.append(exc)

    writer = threading.Thread(target=write, name="bundle-tar", daemon=True)
    writer.start()
    with os.fdopen(read_fd, "rb") as source:
        while data := source.read(chunk):
            yield data
    writer.join()
    if failure and not isinstance(failure[0], BrokenPipeError):
        raise BundleError(f"writing the bundle stream failed: {failure[0]}", "export again")


def unpack_bundle(tar_path: Path, dest: Path) -> Path:
    """Unpack a bundle tar, refusing anything but plain files and folders inside it."""
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar.getmembers():
                if unsafe_reason(member) is not None:
                    raise BundleError(f"{tar_path} holds {member.name!r}, which a bundle never does (a link, a device or a path outside it)", _AGAIN)
            extract_plain(tar, dest)
    except tarfile.TarError as exc:
        raise BundleError(f"{tar_path} is not a readable tar: {exc}", _AGAIN) from None
    return dest


def verify_bundle(
    path: Path, root_public_key: ec.EllipticCurvePublicKey, *, root_source: str = "the pinned root key", trust_store: Path | None = None
) -> dict[str, Any]:
    """Check a bundle (folder or tar) offline against a root key the verifier trusts; return what it proves.

    ``trust_store``: the exporting site's trust store as the verifier got it later (signed by the
    same root, not older than the bundle's): a key revoked since the export is refused.
    """
    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
            return _verify_folder(unpack_bundle(path, Path(tmp)), root_public_key, root_source, shown=path, newer=trust_store)
    if not path.is_dir():
        raise BundleError(f"{path} is neither a bundle folder nor a bundle tar", "pass the folder or .tar that `appliance export` wrote")
    return _verify_folder(path, root_public_key, root_source, shown=path, newer=trust_store)


def _read(path: Path, shown: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise BundleError(f"{shown}: {path.name} is missing", _AGAIN) from None


def _verify_folder(folder: Path, root: ec.EllipticCurvePublicKey, root_source: str, *, shown: Path, newer: Path | None) -> dict[str, Any]:
    trust = read_store(folder / "keys" / "truststore.json", root, anchor_source=root_source)
    if newer is not None:
        later = read_store(newer, root, anchor_source=root_source)
        if later.version < trust.version:
            raise BundleError(
                f"the trust store {newer} is version {later.version}, older than the bundle's version {trust.version}", "pass the site's newest trust store"
            )
        trust = later
    envelope = _json(folder / "bundle.dsse.json", shown)
    body, release_id = open_envelope(envelope, trust.keys_for("release"), source=f"{shown}/bundle.dsse.json", payload_type=BUNDLE_TYPE)
    if _read(folder / "bundle.json", shown) != body:
        raise BundleError(f"{shown}/bundle.json differs from the manifest the release key signed", _AGAIN)
    manifest = payload_json(body, source=f"{shown}/bundle.json")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{shown}/bundle.json is not a {FORMAT} manifest", _AGAIN)
    entry = trust.require(release_id, "release", at=str(manifest.get("created_at")))
    if entry.revoked_at is not None:
        raise BundleError(
            f"{shown} is signed by release key {release_id[:16]}…, revoked at {entry.revoked_at} ({entry.revoked_reason or 'no reason given'})",
            "a bundle signed by a revoked key cannot be told from a forgery made with it: ask for a new export",
        )
    model = manifest["model"]
    # One pass over the bytes: the file digests found here serve every check below.
    actual = _check_files(folder, manifest["files"], shown)
    in_model = {rel.removeprefix("model/"): d for rel, d in actual.items() if rel.startswith("model/")}
    if not in_model or _digest_of(in_model) != model["digest"]:
        raise BundleError(f"{shown}/model does not match the model digest {str(model['digest'])[:16]}… the bundle names", _AGAIN)
    verify_signed_files(folder / "model" / RELEASE_SIG, entry.public_key(), in_model, what=f"{shown}/model")
    statement_body, _ = open_envelope(_json(folder / "provenance.dsse.json", shown), {release_id: entry.public_key()}, source=f"{shown}/provenance.dsse.json")
    statement = payload_json(statement_body, source=f"{shown}/provenance.dsse.json")
    deps = check_statement(statement, digest=model["digest"], name=model["name"], version=int(model["version"]), source=f"{shown}/provenance.dsse.json")
    head_seq = _check_ledger(folder, trust, model["digest"], deps, shown)
    return {
        "model": model,
        "release_key_id": release_id,
        "root_key_id": trust.root_key_id,
        "exporter": manifest.get("exporter"),
        "created_at": manifest.get("created_at"),
        "files": len(manifest["files"]),
        "dependencies": len(deps),
        "head_seq": head_seq,
        "statement": statement,
        "node_keys": {e.key_id: e.public_key_pem for e in trust.entries if e.role == "node"},
    }


def _json(path: Path, shown: Path) -> Any:
    try:
        return json.loads(_read(path, shown))
    except ValueError:
        raise BundleError(f"{shown}: {path.relative_to(path.parents[1]) if len(path.parents) > 1 else path.name} is not JSON", _AGAIN) from None


def _digest_of(files: dict[str, str]) -> str:
    """The model directory digest from its files' digests (sha256sum's format, sorted; the release signature left out)."""
    entries = sorted(((rel, d, 0) for rel, d in files.items() if rel != RELEASE_SIG), key=lambda e: e[0].encode("utf-8"))
    return sha256_bytes(manifest_text(entries).encode("utf-8"))


def _check_files(folder: Path, listed: dict[str, str], shown: Path) -> dict[str, str]:
    odd = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir()))
    if odd:
        raise BundleError(f"{shown} holds {', '.join(odd[:5])}, which a bundle never does (links, devices, sockets)", _AGAIN)
    actual = {rel: digest for rel, digest, _ in dir_manifest(folder) if rel not in SIGNED}
    extra = sorted(set(actual) - set(listed))
    missing = sorted(set(listed) - set(actual))
    changed = sorted(rel for rel in set(actual) & set(listed) if actual[rel] != listed[rel])
    problems = [
        f"{what}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        for what, names in (("changed", changed), ("missing", missing), ("extra", extra))
        if names
    ]
    if problems:
        raise BundleError(f"{shown} is not the bundle that was signed — " + "; ".join(problems), _AGAIN)
    return actual


def _check_ledger(folder: Path, trust: TrustStore, digest: str, deps: list[str], shown: Path) -> int:
    """The excerpt's events are whole, signed by node keys valid then, and chained up to the signed head;
    they record the model and exactly the dependencies the provenance names."""
    nodes = trust.keys_for("node")
    head = _json(folder / "ledger" / "head.json", shown)
    links = [json.loads(line) for line in _read(folder / "ledger" / "chain.jsonl", shown).splitlines() if line.strip()]
    events = [json.loads(line) for line in _read(folder / "ledger" / "excerpt.jsonl", shown).splitlines() if line.strip()]
    where = f"{shown}/ledger"
    if not links or not events:
        raise BundleError(f"{where} holds no ledger excerpt", _AGAIN)
    _signed(nodes, head.get("key_id"), head.get("signature"), head_message(int(head.get("seq", -1)), str(head.get("hash"))), f"{where}/head.json")
    by_seq: dict[int, dict[str, Any]] = {}
    prev = links[0].get("prev_hash")
    for i, link in enumerate(links):
        seq = int(link["seq"])
        if seq != int(links[0]["seq"]) + i or link.get("prev_hash") != prev:
            raise BundleError(f"{where}/chain.jsonl breaks at seq {seq}: a link is missing, moved or changed", _AGAIN)
        _signed(nodes, link.get("key_id"), link.get("signature"), bytes.fromhex(str(link["hash"])), f"{where}/chain.jsonl seq {seq}")
        prev = link["hash"]
        by_seq[seq] = link
    last = links[-1]
    if (last["seq"], last["hash"]) != (head.get("seq"), head.get("hash")):
        raise BundleError(f"{where}/chain.jsonl ends at seq {last['seq']}, not at the signed head's seq {head.get('seq')}", _AGAIN)
    recorded: set[str] = set()
    for e in events:
        seq = int(e["seq"])
        link = by_seq.get(seq)
        body = canonical_json({"seq": seq, "ts": e["ts"], "kind": e["kind"], "actor": e["actor"], "data": e["data"]})
        if link is None or e.get("prev_hash") != link["prev_hash"] or chain_hash(str(e["prev_hash"]), body) != link["hash"]:
            raise BundleError(f"{where}/excerpt.jsonl event {seq} ({e.get('kind')}) does not match its link in the chain: it was changed", _AGAIN)
        trust.require(str(e["key_id"]), "node", at=str(e["ts"]))
        if e["kind"] == "artifact.recorded":
            recorded.add(str(e["data"].get("digest")))
    if digest not in recorded:
        raise BundleError(f"{where}/excerpt.jsonl does not record the model {digest[:16]}…", _AGAIN)
    if set(deps) != recorded - {digest}:
        raise BundleError(
            f"the provenance statement names {len(set(deps))} dependencies, the ledger excerpt records {len(recorded - {digest})} others: they disagree",
            _AGAIN,
        )
    return int(head["seq"])


def _signed(keys: dict[str, ec.EllipticCurvePublicKey], key_id: Any, signature: Any, message: bytes, what: str) -> None:
    public = keys.get(str(key_id))
    if public is None:
        raise BundleError(f"{what} is signed by key {str(key_id)[:16]}…, not a node key of the exporting site's trust store", _AGAIN)
    try:
        verify_signature(public, base64.b64decode(str(signature), validate=True), message)
    except (SigningError, binascii.Error, ValueError):
        raise BundleError(f"the signature of {what} does not verify", _AGAIN) from None
