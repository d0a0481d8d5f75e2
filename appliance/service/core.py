"""The service: the one authority over the appliance home.

One process owns the home: the ledger (DuckDB allows one writer), the store and the unlocked
node key. `appliance serve` runs it behind a Unix socket; in local mode (``--home``) the CLI
runs the same object in-process. Every request goes identify → authorize → record the
decision → act, with the caller passed per request (`Caller`), and the decision taken
*before* any file, recipe or ledger row is read on the caller's behalf.

The operations live in rooms beside this one (runs, reads, models); this module holds the
life cycle, the lock on the home and the authorization step they all share.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.home import Home
from appliance.service import release
from appliance.service.caller import Caller
from appliance.service.datakeys import DataKeys
from keys.errors import ApplianceError, KeyStoreError
from keys.keystore import NodeKey, create_key, key_id_of, load_key, load_public_key, public_key_from_pem
from keys.truststore import TrustStore, TrustStoreError, entry_for, new_store, read_store, write_store
from policies.errors import PolicyError
from policies.policy import Policy, default_policy
from policies.signature import read_policy, sign_policy
from registry.audit_sandbox import AuditLimits, parse_size
from registry.ledger import Ledger
from registry.store import Store

# Every file the service creates is private to the service user, whatever umask it was
# started with (a world-writable ledger would let anyone forge its rows).
UMASK = 0o077


@dataclass(kw_only=True, frozen=True)
class ServiceConfig:
    """Limits of one service process (`appliance serve` flags)."""

    # Jobs (stages) running at once; more runs wait in a queue. One fits a small head node.
    max_jobs: int = 1
    # The auditor's SQL: time, memory and row limits per query.
    query_timeout_s: float = 30.0
    query_memory_limit: str = "1GB"
    query_max_rows: int = 100_000
    # serve: resume the runs a killed service left behind; local mode only records them.
    resume_interrupted: bool = False

    def __post_init__(self) -> None:
        if self.max_jobs < 1:
            raise ApplianceError(f"max_jobs must be at least 1, got {self.max_jobs}", "pass --max-jobs 1 or more")
        if not self.query_timeout_s > 0:
            raise ApplianceError(f"query_timeout_s must be positive, got {self.query_timeout_s}", "pass e.g. --query-timeout 30")
        if self.query_max_rows < 1:
            raise ApplianceError(f"query_max_rows must be at least 1, got {self.query_max_rows}", "pass e.g. --query-max-rows 100000")


class HomeLock:
    """One service per home: an exclusive ``flock`` on ``<home>/service.lock``."""

    def __init__(self, home: Home) -> None:
        self.path = home.root / "service.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ApplianceError(
                f"another appliance process (pid {holder}) holds the home {self.path.parent}",
                "talk to it through its socket (`appliance --socket PATH …`, or set APPLIANCE_SOCKET), or stop it first",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Service:
    """Owns the ledger, the store and the unlocked node key (and release key, if any) of one home."""

    def __init__(self, home: Home, key: NodeKey, lock: HomeLock, config: ServiceConfig, *, release_key: NodeKey | None = None) -> None:
        from appliance.service.runs import RunManager

        self.home, self.key, self.config, self._lock = home, key, config, lock
        # Unlocked at open, where the passphrase is; checked against the trust store below.
        self.release_key = release_key
        self.store = Store(home.store_dir)
        try:
            self._check_public_key()
            self._trust_lock = threading.Lock()
            self._trust_stat = _stat_of(home.trust_file)
            self.trust = self._read_trust()
            release.check(home, release_key, self.trust)
            limits = AuditLimits(memory_limit=parse_size(config.query_memory_limit), timeout_s=config.query_timeout_s, max_rows=config.query_max_rows)
            self.ledger = Ledger.open(home.ledger_file, key, head_path=home.head_file, audit=limits)
            # The data keys of sealed artifacts, unwrapped into this process's keyring only.
            self.datakeys = DataKeys(home.data_keys_dir, key)
            self.datakeys.load()
        except BaseException:
            lock.release()
            raise
        self.owner = self._owner()
        self._record_trust_version()
        self.policy = self._load_policy()
        from airgap import guard

        if guard.installed():  # `appliance serve`: this process's refusals are signed into the ledger
            guard.set_on_refuse(lambda r: self.ledger.append("egress.refused", "service", r))
        self.runs = RunManager(self)
        # A purge a kill -9 interrupted is finished before anything else: its keys may be half gone.
        from appliance.service.purge import recover as recover_purges

        self.purges_recovered = recover_purges(self)
        self.runs.recover(resume=config.resume_interrupted)

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def initialise(
        cls,
        root: Path,
        passphrase: bytes,
        owner: Caller,
        *,
        config: ServiceConfig | None = None,
        root_passphrase: bytes | None = None,
        two_person: bool = True,
    ) -> Service:
        """Create a home: folders, the encrypted root and node keys, the root-signed trust store,
        the default policy, the ledger and its first events.

        The root key (``keys/root.key``, under ``root_passphrase``, default the node's) signs the
        trust store and policies and is needed again only to change them: the operator moves it
        offline. ``two_person=False`` (`appliance init --single-operator`) leaves the policy's
        two-person rules out, for a home one person runs alone; the ledger says so.
        """
        os.umask(UMASK)
        home = Home(Path(root))
        if home.key_file.exists() or home.ledger_file.exists():
            raise ApplianceError(f"{home.root} is already an appliance home", "use it as it is, or choose another --home for a new one")
        home.create_dirs()
        lock = HomeLock(home)
        lock.acquire()
        try:
            root_key = create_key(home.root_key_file, root_passphrase or passphrase)
            key = create_key(home.key_file, passphrase)
            store = new_store(root_key, owner.user).with_entry(entry_for(key, "node", "node"))
            write_store(home.trust_file, store, root_key)
            _write_default_policy(home, owner.user, root_key, two_person=two_person)
            with Ledger.open(home.ledger_file, key, head_path=home.head_file) as ledger:
                ledger.append_many(
                    [
                        ("key.registered", owner.user, {"key_id": root_key.key_id, "public_key_pem": root_key.public_pem().decode(), "role": "root"}),
                        ("key.registered", owner.user, {"key_id": key.key_id, "public_key_pem": key.public_pem().decode(), "role": "node"}),
                        ("truststore.signed", owner.user, {"version": store.version, "root_key_id": root_key.key_id, "keys": len(store.entries)}),
                        ("home.initialised", owner.user, {"owner": owner.user, "owner_uid": owner.uid, "home": str(home.root), "two_person": two_person}),
                    ]
                )
        except BaseException:
            lock.release()
            raise
        return cls(home, key, lock, config or ServiceConfig())

    @staticmethod
    def adopt_trust_store(root: Path, passphrase: bytes, owner: Caller) -> str:
        """Give a home made before trust stores its root key and root-signed store, trusting its node key.

        The node key is unlocked first (whoever adopts it holds its passphrase); the root key is
        made under the same passphrase. Refused where a store exists. Returns the root key id.
        """
        os.umask(UMASK)
        home = Home(Path(root))
        home.require()
        if home.trust_file.exists() or home.root_key_file.exists():
            raise TrustStoreError(
                f"{home.root} already has a trust store or root key ({home.trust_file}, {home.root_key_file})",
                "keep it; a damaged store is restored from a backup, never replaced",
            )
        lock = HomeLock(home)
        lock.acquire()
        try:
            node = load_key(home.key_file, passphrase)
            # Trusted from the home's first event: it has signed everything since.
            since = _first_event_time(home.ledger_file)
            root_key = create_key(home.root_key_file, passphrase)
            write_store(home.trust_file, new_store(root_key, owner.user).with_entry(entry_for(node, "node", "node", not_before=since)), root_key)
            if not home.policy_file.exists():
                # Newer than any policy the home was under (the service refuses a rollback).
                _write_default_policy(home, owner.user, root_key, version=_last_policy_version(home.ledger_file) + 1)
        finally:
            lock.release()
        Service.open(root, passphrase).close()  # records the store's version and its keys
        return root_key.key_id

    @classmethod
    def open(cls, root: Path, passphrase: bytes, *, config: ServiceConfig | None = None) -> Service:
        """Unlock the node key (and the release key, if the home has one) of an existing home, lock
        the home, and take the ledger. A release key the trust store does not trust now stops it."""
        os.umask(UMASK)
        home = Home(Path(root))
        home.require()
        lock = HomeLock(home)
        lock.acquire()
        try:
            key = load_key(home.key_file, passphrase)
            release_key = release.unlock(home, passphrase)
        except BaseException:
            lock.release()
            raise
        return cls(home, key, lock, config or ServiceConfig(), release_key=release_key)

    def close(self) -> None:
        """Stop the runs (their jobs checkpoint and stop), then release the ledger and the home."""
        try:
            self.runs.shutdown()
        finally:
            self.ledger.close()
            self._lock.release()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_public_key(self) -> None:
        """The home's public key file is what exports and model checks hand out: it must be the
        unlocked key's own, or every signature checked against it proves nothing."""
        path = self.home.public_key_file
        try:
            on_disk = public_key_from_pem(path.read_bytes(), source=str(path))
        except OSError as exc:
            raise KeyStoreError(f"cannot read the node's public key {path}: {exc.strerror}", "restore it from a backup of the home") from None
        if key_id_of(on_disk) != self.key.key_id:
            raise KeyStoreError(
                f"{path} holds key {key_id_of(on_disk)[:16]}…, but the node key {self.home.key_file} is {self.key.key_id[:16]}…",
                "the public key file was replaced: restore it from a backup of the home; nothing was recorded",
            )

    def _read_trust(self) -> TrustStore:
        """The root-signed trust store, checked against the root anchor; the node key must be in it.

        A service whose own key is not trusted for the node role refuses to start: whatever it
        signed could not be told from a forgery.
        """
        anchor_path, anchor_source = self.home.root_anchor()
        if not self.home.trust_file.exists():
            read_store(self.home.trust_file, self.key.public_key)  # raises: says what a home without a store does
        try:
            anchor = load_public_key(anchor_path)
        except ApplianceError as exc:
            raise TrustStoreError(
                f"cannot read the root public key {anchor_path} ({anchor_source}): {exc.message}",
                "install the root public key there (it is printed by `appliance keys list`), or set APPLIANCE_ROOT_KEY to its path",
            ) from None
        store = read_store(self.home.trust_file, anchor, anchor_source=anchor_source)
        store.require(self.key.key_id, "node")
        return store

    def _record_trust_version(self) -> None:
        try:
            self._sync_trust(self.trust)
        except BaseException:
            self.ledger.close()
            self._lock.release()
            raise

    def _sync_trust(self, store: TrustStore) -> None:
        """A trust store older than one this home has used is a rollback (to a store that may
        still trust a since-revoked key): refused. A newer one is recorded, with every key it
        adds (``key.registered``), whoever wrote it (`keys add` while the service runs, a rotation)."""
        rows = self.ledger.select("SELECT max(CAST(body ->> '$.data.version' AS BIGINT)) FROM events WHERE kind = 'truststore.signed'")
        seen = rows[0][0] if rows and rows[0][0] is not None else 0
        if store.version < seen:
            raise TrustStoreError(
                f"the trust store {self.home.trust_file} is version {store.version}, older than version {seen} this home has already used",
                "a store was put back from before a change (a revocation may be undone by it): restore the newest signed trust store",
            )
        if store.version == seen:
            return
        known = {str(k) for (k,) in self.ledger.select("SELECT body ->> '$.data.key_id' FROM events WHERE kind = 'key.registered'")}
        by = f"root key {store.root_key_id[:16]}… (trust store version {store.version})"
        events: list[tuple[str, str, dict[str, Any]]] = [
            ("key.registered", e.owner, {"key_id": e.key_id, "public_key_pem": e.public_key_pem, "role": e.role, "owner": e.owner, "by": by})
            for e in store.entries
            if e.key_id not in known
        ]
        events.append(("truststore.signed", self.owner, {"version": store.version, "root_key_id": store.root_key_id, "keys": len(store.entries)}))
        self.ledger.append_many(events)

    def refresh_trust(self) -> None:
        """Take a trust store changed on disk since it was read (a key added under the root key
        while the service runs): verified against the root anchor, never older, and recorded."""
        current = _stat_of(self.home.trust_file)
        if current == self._trust_stat:
            return
        with self._trust_lock:
            if current == self._trust_stat:
                return
            store = self._read_trust()
            self._sync_trust(store)
            self.trust, self._trust_stat = store, current

    def _load_policy(self) -> Policy:
        """The root-signed policy; a missing, unsigned or tampered one stops the service from starting.

        Each policy the service starts under is recorded (name, version, digest) the first time.
        One older than a policy this home has been under is a rollback (to rules since tightened,
        say a two-person rule since added): refused, like a second policy under a version in use.
        """
        try:
            policy = read_policy(self.home.policy_file, self.trust, signature_path=self.home.policy_signature_file)
            rows = self.ledger.select(
                "SELECT CAST(body ->> '$.data.version' AS BIGINT) AS v, body ->> '$.data.digest' FROM events WHERE kind = 'policy.loaded' ORDER BY v DESC, seq DESC LIMIT 1"
            )
            if rows and (policy.version < rows[0][0] or (policy.version == rows[0][0] and policy.digest != rows[0][1])):
                raise PolicyError(
                    f"the policy {self.home.policy_file} is version {policy.version} (sha256 {policy.digest[:16]}…), but this home has been under version {rows[0][0]} (sha256 {rows[0][1][:16]}…)",
                    "a policy was put back from before a change, or two policies were signed with one version: install the newest, with a higher version",
                )
        except BaseException:
            self.ledger.close()
            self._lock.release()
            raise
        rows = self.ledger.select("SELECT body ->> '$.data.digest' FROM events WHERE kind = 'policy.loaded' ORDER BY seq DESC LIMIT 1")
        if not rows or rows[0][0] != policy.digest:
            self.ledger.append("policy.loaded", self.owner, {"name": policy.name, "version": policy.version, "digest": policy.digest})
        return policy

    def _owner(self) -> str:
        events = self.ledger.events("home.initialised")
        if not events:
            raise ApplianceError(f"ledger {self.home.ledger_file} has no home.initialised event", "initialise the home with `appliance init`")
        return str(events[0].data["owner"])

    def require_release_key(self) -> NodeKey:
        """The release key, valid now for the release role; KeyStoreError naming `appliance keys release-init` where there is none."""
        return release.require(self)

    @property
    def trusted(self) -> dict[str, Any]:
        """The keys trusted to have signed the ledger and the store: every node key of the root-signed
        trust store (a rotated-out key still verifies what it signed while valid)."""
        return self.trust.keys_for("node")

    # -- authorization --------------------------------------------------------------------

    def authorize(
        self, caller: Caller, action: str, subject: str, *, approval: str | None = None, requesting: bool = False, ready: Callable[[], None] | None = None
    ) -> None:
        """Decide under the signed policy, record the decision (allowed or denied), and raise PolicyError if denied.

        An action under a two-person rule is allowed only with ``approval``, the id of a request
        by this caller for this action and subject that a second person approved and that has not
        been used: its use is recorded with the decision, in one transaction. ``requesting``: the
        caller is asking for that approval, which needs the permission itself.

        ``ready`` checks, once the caller is allowed and before an approval is used, that the
        action can run at all (the model verifies, a release key exists): if it raises, its
        error is raised after the decision is recorded, and the approval stays unused.
        """
        from appliance.service import approvals

        self.refresh_trust()
        decision = self.policy.decide(caller.user, caller.groups, action, subject)
        allowed, reason, rule = decision.allowed, decision.reason, decision.rule
        hint = ""
        # Only a use of an approval is serialised (check it is unused, record its use); every
        # other decision goes straight to the ledger's group commit.
        redeeming = allowed and decision.needs_approval and not requesting and approval is not None
        cannot: ApplianceError | None = None
        if redeeming and ready is not None:
            # Outside the lock: ready may hash a model of many GB, and every other use of an
            # approval would wait for it. Whether this approval is still unused is checked under it.
            try:
                ready()
            except ApplianceError as exc:
                cannot = exc
        with approvals.LOCK if redeeming else contextlib.nullcontext():
            used = None
            if allowed and requesting:
                rule = f"{decision.rule}; asks for a second person's approval"
            elif allowed and decision.needs_approval:
                two = self.policy.two_person(decision.permission)
                approvers = " or ".join(two.approvers) if two else "an approver"
                if approval is None:
                    allowed = False
                    rule = f"two-person rule on {decision.permission}: no approved request given"
                    reason = f"{caller.user} may {action} {subject} only once a second person ({approvers}) approves it"
                    hint = f"request it with `{approvals.request_command(action, subject)}`; once approved, run this again with --approval ID"
                else:
                    try:
                        used = approvals.redeem(self, caller, approval, action, subject)
                    except PolicyError as exc:
                        allowed, reason, hint = False, exc.message, exc.hint
                        rule = f"two-person rule on {decision.permission}: request {approval} not usable"
                    else:
                        rule = f"{decision.rule}; two-person rule on {decision.permission}: request {approval} approved by {used['decided_by']}"
                        if cannot is not None:
                            # Allowed, but the action cannot run: the approval is kept for when it can.
                            used = None
                            rule += f", kept unused: {cannot.message}"
            events: list[tuple[str, str, dict[str, Any]]] = [
                (
                    "authz.decision",
                    caller.user,
                    {
                        "identity": caller.user,
                        "uid": caller.uid,
                        "groups": list(caller.groups),
                        "action": action,
                        "subject": subject,
                        "allowed": allowed,
                        "reason": reason,
                        "rule": rule,
                        "permission": decision.permission,
                        "roles": list(decision.roles),
                        "policy_digest": self.policy.digest,
                        "approval": approval,
                    },
                )
            ]
            if used is not None:
                events.append(("approval.executed", caller.user, {"id": approval, "action": action, "subject": subject}))
            self.ledger.append_many(events)
        if not allowed:
            if not hint:
                hint = f"ask an admin for role {' or '.join(decision.would_allow[:3])}" if decision.would_allow else "no role of the policy grants it"
                hint += " (`appliance policy show` lists the roles)"
            raise PolicyError(reason, hint)
        if cannot is not None:
            raise cannot


def _stat_of(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _write_default_policy(home: Home, owner: str, root_key: NodeKey, *, two_person: bool = True, version: int = 1) -> None:
    """The default policy with ``owner`` as admin, signed by the root key (0644: anyone may read the rules)."""
    import json

    from keys.files import atomic_write

    policy = default_policy(owner, two_person=two_person).replace("\nversion = 1\n", f"\nversion = {version}\n", 1)
    service_user = Caller.current().user
    if service_user != owner:
        # The service's own user (local mode: `keys rotate`, recovery) holds the home and its
        # passphrase, and so everything already; the policy says so rather than pretend otherwise.
        binding = f'{json.dumps(owner, ensure_ascii=False)} = ["admin"]\n'
        policy = policy.replace(binding, binding + f'{json.dumps(service_user, ensure_ascii=False)} = ["admin"]  # the service user\n', 1)
    text = policy.encode("utf-8")
    atomic_write(home.policy_file, text, mode=0o644)
    atomic_write(home.policy_signature_file, sign_policy(text, root_key), mode=0o644)


def _last_policy_version(ledger_file: Path) -> int:
    import duckdb

    from registry.ledger_verify import SAFE_CONFIG

    con = duckdb.connect(str(ledger_file), read_only=True, config=dict(SAFE_CONFIG))
    try:
        row = con.execute("SELECT max(CAST(body ->> '$.data.version' AS BIGINT)) FROM events WHERE kind = 'policy.loaded'").fetchone()
    finally:
        con.close()
    return int(row[0]) if row and row[0] is not None else 0


def _first_event_time(ledger_file: Path) -> str:
    import duckdb

    from registry.ledger_verify import SAFE_CONFIG

    con = duckdb.connect(str(ledger_file), read_only=True, config=dict(SAFE_CONFIG))
    try:
        (first,) = con.execute("SELECT min(ts) FROM events").fetchone() or (None,)
    finally:
        con.close()
    if not first:
        raise ApplianceError(f"the ledger {ledger_file} has no events", "initialise the home with `appliance init`")
    return str(first)


__all__ = ["Service", "ServiceConfig"]
