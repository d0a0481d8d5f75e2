"""Hostile auditor SQL against the audit sandbox: files, data-changing CTEs, time, memory, load.

Each test is named after the attack it reproduces. Nothing here asserts a wall-clock time;
the only clocks are generous bounds that turn a hang into a failure.
"""

from __future__ import annotations

import os
import threading
import time

import duckdb
import pytest

from keys.keystore import create_key
from registry.audit_sandbox import AuditLimits, _rss_bytes, parse_size, remove_stale_mirrors, run_select
from registry.errors import LedgerError
from registry.ledger import Ledger
from registry.query import query

SECRET = "the-service-user's-secret-5f1c"


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return create_key(tmp_path_factory.mktemp("k") / "node.key", b"audit sandbox passphrase")


@pytest.fixture
def trusted(key):
    return {key.key_id: key.public_key}


def _notes(n: int, start: int = 0) -> list[tuple[str, str, dict]]:
    return [("note", "svc", {"i": start + i}) for i in range(n)]


@pytest.fixture
def ledger(tmp_path, key):
    with Ledger.open(tmp_path / "ledger.duckdb", key, audit=AuditLimits(memory_limit=256 << 20, timeout_s=30)) as led:
        led.append_many(_notes(20))
        yield led


@pytest.fixture
def hostile_cwd(tmp_path_factory, monkeypatch):
    """A working directory whose ``.tmp`` is a link to a directory holding a secret, and ``root`` a link to /."""
    cwd = tmp_path_factory.mktemp("cwd")
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "secret.txt").write_text(SECRET)
    (secrets / "secret.csv").write_text(f"x\n{SECRET}\n")
    os.symlink(secrets, cwd / ".tmp")
    os.symlink("/", cwd / "root")
    monkeypatch.chdir(cwd)
    return cwd, secrets


def _file_probes(cwd, secrets) -> list[str]:
    return [
        f"SELECT content FROM read_text('{cwd}/.tmp/secret.txt')",
        "SELECT content FROM read_text('.tmp/secret.txt')",
        "SELECT content FROM read_blob('.tmp/secret.txt')",
        "SELECT * FROM '.tmp/secret.csv'",
        f"SELECT * FROM '{secrets}/secret.csv'",
        f"SELECT content FROM read_text('{secrets}/secret.txt')",
        "SELECT content FROM read_text('.tmp/../.tmp/secret.txt')",
        f"SELECT content FROM read_text('{cwd}/root/etc/hostname')",
        "SELECT * FROM glob('.tmp/*')",
        "SET temp_directory = '.tmp'",
        f"SET temp_directory = '{secrets}'",
        "SELECT current_setting('temp_directory') AS t, * FROM read_text('.tmp/secret.txt')",
    ]


def test_tmp_symlink_probe_is_real(hostile_cwd):
    # The attack works on a DuckDB instance with only external access off: the test is not vacuous.
    cwd, _ = hostile_cwd
    con = duckdb.connect(":memory:")
    con.execute("SET enable_external_access = false")
    assert con.execute(f"SELECT content FROM read_text('{cwd}/.tmp/secret.txt')").fetchone() == (SECRET,)
    con.close()


def test_tmp_symlink_cannot_read_files_in_service(hostile_cwd, ledger):
    cwd, secrets = hostile_cwd
    for sql in _file_probes(cwd, secrets):
        with pytest.raises(LedgerError) as err:
            ledger.query(sql)
        assert SECRET not in str(err.value.diagnostics() if hasattr(err.value, "diagnostics") else err.value), sql
    assert ledger.query("SELECT count(*) FROM events")[1] == [(20,)]


def test_tmp_symlink_cannot_read_files_by_path(hostile_cwd, tmp_path, key):
    cwd, secrets = hostile_cwd
    path = tmp_path / "ledger.duckdb"
    with Ledger.open(path, key) as led:
        led.append_many(_notes(3))
    for sql in _file_probes(cwd, secrets):
        with pytest.raises(LedgerError) as err:
            query(path, sql)
        assert SECRET not in err.value.message, sql
    assert query(path, "SELECT count(*) FROM events")[1] == [(3,)]


def test_instance_fence_holds_without_the_statement_check(hostile_cwd, ledger, tmp_path, key):
    # Were the statement check ever bypassed, the instance itself still reads no file.
    cwd, secrets = hostile_cwd
    sandbox = ledger._audit_sandbox()
    settings = dict(sandbox._con.execute("SELECT name, value FROM duckdb_settings()").fetchall())
    assert settings["temp_directory"] == ""
    assert settings["enable_external_access"] == "false"
    assert settings["lock_configuration"] == "true"
    assert settings["max_temp_directory_size"] == "0 bytes"
    assert settings["threads"] == "2"
    for sql in (
        f"SELECT content FROM read_text('{cwd}/.tmp/secret.txt')",
        "SELECT content FROM read_text('.tmp/secret.txt')",
        f"SELECT * FROM read_csv('{secrets}/secret.csv')",
    ):
        statement = duckdb.extract_statements(sql)[0]
        cur = sandbox._con.cursor()
        with pytest.raises(LedgerError, match="refused|Permission"):
            run_select(cur, statement, source="probe", max_rows=10, timeout_s=10, memory_limit=256 << 20)
        cur.close()


def test_delete_cte_is_refused_and_changes_nothing(ledger, trusted):
    before = ledger.query("SELECT seq, hash FROM events ORDER BY seq")[1]
    for sql in (
        "WITH d AS (DELETE FROM events RETURNING *) SELECT * FROM d",
        "WITH d AS MATERIALIZED (DELETE FROM events WHERE seq > 10 RETURNING seq) SELECT count(*) FROM d",
        "WITH d AS (UPDATE events SET actor = 'mallory' RETURNING *) SELECT * FROM d",
    ):
        with pytest.raises(LedgerError, match="data-changing part"):
            ledger.query(sql)
    assert ledger.query("SELECT seq, hash FROM events ORDER BY seq")[1] == before
    assert [e.actor for e in ledger.events()] == ["svc"] * 20
    assert ledger.verify(trusted).last_seq == 20


def test_delete_cte_that_slipped_through_is_rolled_back(ledger, trusted):
    # Defence in depth: run the DELETE CTE on the mirror past the check, the way a parser
    # gap would; the transaction is rolled back, so neither the mirror nor the ledger changes.
    from registry.audit_sandbox import _run_in_rollback

    assert ledger.query("SELECT count(*) FROM events")[1] == [(20,)]
    sandbox = ledger._audit_sandbox()
    statement = duckdb.extract_statements("WITH d AS (DELETE FROM events RETURNING *) SELECT count(*) FROM d")[0]
    cur = sandbox._con.cursor()
    assert _run_in_rollback(cur, statement, source="probe", max_rows=10, timeout_s=10, memory_limit=256 << 20)[1] == [(20,)]
    cur.close()
    assert ledger.query("SELECT count(*) FROM events")[1] == [(20,)]
    assert len(ledger.events()) == 20
    assert ledger.verify(trusted).last_seq == 20


def test_runaway_query_stops_while_others_append_and_query(ledger, trusted):
    done = threading.Event()
    outcome: dict = {}

    def runaway():
        try:
            ledger.query("SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3", timeout_s=3)
            outcome["result"] = "finished"
        except LedgerError as exc:
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=runaway)
    thread.start()
    time.sleep(0.3)  # let it start; what follows must not wait for it
    during = {"appends": 0, "queries": 0}
    for i in range(10):
        ledger.append_many(_notes(3, start=100 + 3 * i))
        if not done.is_set():
            during["appends"] += 1
        count = ledger.query("SELECT count(*) FROM events")[1][0][0]
        assert count == 20 + 3 * (i + 1)
        if not done.is_set():
            during["queries"] += 1
    thread.join(timeout=3 + 10)
    assert not thread.is_alive(), "the runaway query was not stopped"
    assert "result" not in outcome
    assert "ran longer than 3 s and was stopped" in outcome["error"].message
    assert "LIMIT" in outcome["error"].hint
    assert during["appends"] > 0 and during["queries"] > 0
    assert ledger.verify(trusted).last_seq == 50


class _PeakRSS:
    """Samples this process's resident memory every 5 ms while in use."""

    def __enter__(self):
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


HUNGRY = [
    pytest.param("SELECT list(i) FROM range(10000000000) t(i)", id="list-of-huge-range"),
    pytest.param("SELECT length(string_agg(i::VARCHAR, ',')) FROM range(10000000000) t(i)", id="string_agg"),
    pytest.param("SELECT i FROM range(2000000000) t(i) ORDER BY i DESC", id="big-sort"),
    pytest.param("SELECT count(DISTINCT i) FROM range(2000000000) t(i)", id="big-distinct"),
    # Strings a scalar function builds are outside DuckDB's own accounting; the watch stops it.
    pytest.param("SELECT max(length(repeat(body, 1000 + (i % 2)::INT))) FROM events, range(100000000) t(i)", id="untracked-strings"),
]


@pytest.mark.skipif(_rss_bytes() is None, reason="needs /proc/self/statm to measure memory")
@pytest.mark.parametrize("sql", HUNGRY)
def test_memory_hungry_query_stops_at_the_cap(tmp_path, key, sql):
    limit = 128 << 20
    with Ledger.open(tmp_path / "ledger.duckdb", key, audit=AuditLimits(memory_limit=limit, timeout_s=60)) as led:
        led.append_many(_notes(50))
        led.query("SELECT 1")  # the mirror exists before measuring
        with _PeakRSS() as rss:
            with pytest.raises(LedgerError) as err:
                led.query(sql)
        assert "ran past the memory limit of 128 MiB" in err.value.message
        assert "AuditLimits.memory_limit" in err.value.hint
        # Unfenced, each of these grows the process by many GiB; fenced, by a small multiple of the cap.
        assert rss.growth < 1536 << 20, f"RSS grew by {rss.growth >> 20} MiB"
        # The sandbox is usable afterwards.
        assert led.query("SELECT count(*) FROM events")[1] == [(50,)]


@pytest.mark.slow
def test_four_auditors_and_an_appender(tmp_path, key, trusted):
    errors: list[BaseException] = []
    appended = threading.Event()
    seen: dict[int, list[int]] = {i: [] for i in range(4)}
    total = 2000
    with Ledger.open(tmp_path / "ledger.duckdb", key) as led:

        def appender():
            try:
                done = 0
                size = 1
                while done < total:
                    batch = min(size, total - done)
                    events = led.append_many(_notes(batch, start=done))
                    done += batch
                    size = size % 20 + 1
                    if done % 97 < batch:
                        # What an append returned is visible to the next query.
                        assert led.query("SELECT max(seq) FROM events")[1][0][0] >= events[-1].seq
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            finally:
                appended.set()

        def auditor(n):
            try:
                while True:
                    last = appended.is_set()
                    ((lo, hi, count, broken),) = led.query(
                        "SELECT min(e.seq), max(e.seq), count(*), count(*) FILTER (WHERE p.seq IS NULL AND e.seq > 1 OR e.prev_hash <> p.hash) "
                        "FROM events e LEFT JOIN events p ON p.seq = e.seq - 1"
                    )[1]
                    # A gap-free prefix whose chain links hold, never going backwards.
                    assert lo == 1 and hi == count and broken == 0, (lo, hi, count, broken)
                    assert not seen[n] or hi >= seen[n][-1]
                    seen[n].append(hi)
                    if last:
                        break
                    time.sleep(0.005)  # auditors, not a flood: the appender gets the GIL too
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=auditor, args=(i,)) for i in range(4)] + [threading.Thread(target=appender)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
        assert errors == []
        assert all(s[-1] == total for s in seen.values())
        assert all(len(s) > 1 for s in seen.values())
        assert led.verify(trusted).last_seq == total


def test_close_stops_a_running_query(tmp_path, key):
    led = Ledger.open(tmp_path / "ledger.duckdb", key)
    led.append_many(_notes(1))
    led.query("SELECT 1")
    outcome: dict = {}

    def runaway():
        try:
            led.query("SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3", timeout_s=30)
        except LedgerError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=runaway)
    thread.start()
    time.sleep(0.3)
    led.close()
    thread.join(timeout=15)
    assert not thread.is_alive(), "closing the ledger did not stop the query"
    assert "interrupted" in outcome["error"].message


def test_limits_are_ceilings(ledger):
    with pytest.raises(LedgerError, match="more than the sandbox's limit of 30 s"):
        ledger.query("SELECT 1", timeout_s=31)
    with pytest.raises(LedgerError, match="more than the sandbox's limit of 100000"):
        ledger.query("SELECT 1", max_rows=100_001)
    with pytest.raises(LedgerError, match="more than 5 rows"):
        ledger.query("SELECT * FROM range(10)", max_rows=5)
    assert len(ledger.query("SELECT * FROM range(5)", max_rows=5)[1]) == 5
    assert parse_size("1GB") == 10**9 and parse_size("512 MiB") == 512 << 20 and parse_size("2.5gb") == 2_500_000_000
    for text in ("1", "-1", "none", "1 GBs", "", "1e9B"):
        with pytest.raises(LedgerError, match="not a memory size"):
            parse_size(text)
    for bad in ({"memory_limit": 1000}, {"threads": 0}, {"timeout_s": float("nan")}, {"max_rows": 0}, {"memory_limit": 1.5e9}):
        with pytest.raises(LedgerError, match="AuditLimits"):
            AuditLimits(**bad)


def test_mirror_is_private_and_removed(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    led = Ledger.open(path, key)
    led.append_many(_notes(2))
    led.query("SELECT 1")
    mirror = led._audit_sandbox().dir
    assert mirror.parent == tmp_path and mirror.name.startswith(".ledger.duckdb.audit-")
    assert mirror.stat().st_mode & 0o777 == 0o700
    led.close()
    assert not mirror.exists()
    with pytest.raises(LedgerError, match="closed"):
        led.query("SELECT 1")


def test_stale_mirror_is_removed_live_one_kept(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    stale = tmp_path / ".ledger.duckdb.audit-crashed"
    stale.mkdir()
    (stale / "in-use.lock").touch()
    (stale / "mirror.duckdb").write_bytes(b"left by a crash")
    with Ledger.open(path, key) as led:
        assert not stale.exists()
        led.query("SELECT 1")
        live = led._audit_sandbox().dir
        remove_stale_mirrors(tmp_path, ".ledger.duckdb.audit-")
        assert live.exists()
        assert led.query("SELECT count(*) FROM events")[1] == [(0,)]


def test_read_only_ledger_queries_through_its_own_mirror(tmp_path, key):
    path = tmp_path / "ledger.duckdb"
    with Ledger.open(path, key) as led:
        led.append_many(_notes(4))
    work = tmp_path / "work"
    work.mkdir()
    with Ledger.open(path, None, read_only=True, audit=AuditLimits(work_dir=work)) as ro:
        assert ro.query("SELECT max(seq) FROM events")[1] == [(4,)]
        assert [p.name[:6] for p in work.iterdir()] == [".ledge"]
    assert list(work.iterdir()) == []
