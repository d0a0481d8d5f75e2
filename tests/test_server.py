"""The service behind its Unix socket: a real `appliance serve` process, real clients (httpx, curl).

Each test starts `python -m appliance --home H serve --socket S` on a fresh home and talks to
it the way the CLI and an operator would. Who the service believes is calling comes from
the kernel; the tests check that what a client *claims* changes nothing in the ledger.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PASSPHRASE

# Bounds on waiting for a process, not timings under test: a slow CI host only waits longer.
START_WAIT_S = 120.0
STOP_WAIT_S = 300.0

# Identity rows: the decisions view, with the uid from the same signed event.
DECISIONS_SQL = (
    "SELECT d.seq, d.identity, CAST(s.data ->> '$.uid' AS BIGINT) AS uid, d.action, d.allowed FROM decisions d JOIN signed_events s USING (seq) ORDER BY d.seq"
)


class Served:
    """One `appliance serve` process and how to reach it."""

    def __init__(self, home: Path, socket: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.home, self.socket, self.proc, self.log = home, socket, proc, log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> Any:
        from appliance.server.client import ServiceClient

        return ServiceClient(self.socket)

    def stop(self, signum: int | None = signal.SIGTERM) -> tuple[int, str]:
        """Signal the service (unless ``signum`` is None) and wait for it; (exit code, its stderr)."""
        if signum is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the service did not stop within {STOP_WAIT_S:.0f} s of signal {signum}:\n{self.stderr()}")
        return rc, self.stderr()


def serve_command(home: Path, socket: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "appliance", "--home", str(home), "serve", "--socket", str(socket), *extra]


def start_serve(home: Path, socket: Path, *extra: str, log: Path | None = None) -> Served:
    """Start the service and wait until it says it listens (or fail with what it printed)."""
    log = log or socket.parent.parent / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(serve_command(home, socket, *extra), stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    served = Served(home, socket, proc, log)
    deadline = time.monotonic() + START_WAIT_S
    while "appliance service: home" not in served.stderr():
        if proc.poll() is not None:
            pytest.fail(f"appliance serve exited with {proc.returncode} before listening:\n{served.stderr()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"appliance serve did not listen within {START_WAIT_S:.0f} s:\n{served.stderr()}")
        time.sleep(0.05)
    return served


def new_home(path: Path) -> Path:
    """A fresh home owned by this process's user, closed again (the service will open it)."""
    from appliance.service import Caller, Service

    Service.initialise(path, PASSPHRASE.encode(), Caller.current()).close()
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a Unix socket's path must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="apl", dir="/tmp"))
    os.chmod(d, 0o755)  # other users (test_server_users) must reach the socket below it
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def served(short_dir: Path) -> Iterator[Served]:
    s = start_serve(new_home(short_dir / "home"), short_dir / "run" / "appliance.sock")
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def curl(socket: Path, path: str, *args: str) -> tuple[int, Any]:
    """curl over the socket: (HTTP status, JSON body)."""
    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(socket), "-w", "\n%{http_code}", *args, f"http://appliance{path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)


def decisions(client: Any) -> list[dict[str, Any]]:
    result = client.call("ledger.query", sql=DECISIONS_SQL)
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


# -- tests ------------------------------------------------------------------------------------


def test_info_over_the_client(served: Served) -> None:
    client = served.client()
    try:
        info = client.call("service.info")
    finally:
        client.close()
    assert info["api"] == "v1"
    assert Path(info["home"]) == served.home.resolve()
    assert info["caller"]["uid"] == os.getuid() and info["caller"]["user"] == me()
    assert info["caller"]["pid"] not in (None, served.proc.pid)  # the client's pid, from the kernel
    assert info["owner"] == me()


def test_curl_info_and_ledger_query(served: Served) -> None:
    status, body = curl(served.socket, "/v1/info")
    assert status == 200 and body["result"]["caller"]["uid"] == os.getuid()
    status, body = curl(served.socket, "/v1/ledger/query", "-G", "--data-urlencode", "sql=SELECT 41 + 1 AS answer")
    assert status == 200, body
    assert body["result"] == {"columns": ["answer"], "rows": [[42]]}
    # The same operation as POST with a JSON body.
    status, body = curl(served.socket, "/v1/ledger/query", "-H", "Content-Type: application/json", "-d", '{"sql": "SELECT 7 AS n"}')
    assert status == 200 and body["result"]["rows"] == [[7]]


def test_bad_requests_are_clear_400s(served: Served) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)), base_url="http://appliance") as http:
        r = http.get("/v1/ledger/query", params={"sql": "SELECT 1", "limit": "5"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "ConfigError" and "'limit'" in err["message"] and "sql" in err["hint"]

        r = http.post("/v1/ledger/query", content=b'{"sql": "SELECT 1",')
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "ConfigError" and "not valid JSON" in r.json()["error"]["message"]

        r = http.post("/v1/ledger/query", content=b'["SELECT 1"]')
        assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]

        r = http.get("/v1/ledger/query")
        assert r.status_code == 400 and "needs the parameter 'sql'" in r.json()["error"]["message"]

        r = http.get("/v1/runs/x/events", params={"since": "soon"})
        assert r.status_code == 400 and "'since'" in r.json()["error"]["message"]

        r = http.get("/v1/no-such-thing")
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("GET /v1/no-such-thing")

        r = http.delete("/v1/info")
        assert r.status_code == 405 and "GET" in r.json()["error"]["hint"]

        r = http.post("/v1/ledger/query", content=b"{" + b" " * (17 * 1024 * 1024) + b"}")
        assert r.status_code == 413 and "MiB" in r.json()["error"]["hint"]
    # The service lived through all of it.
    assert curl(served.socket, "/v1/info")[0] == 200


def test_claims_of_identity_change_nothing(served: Served) -> None:
    claims = {"X-User": "root", "X-Remote-User": "alice", "X-Forwarded-User": "alice", "Authorization": "Basic YWxpY2U6eA==", "X-Uid": "4242"}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)), base_url="http://appliance", headers=claims) as http:
        r = http.get("/v1/info")
        assert r.status_code == 200 and r.json()["result"]["caller"]["uid"] == os.getuid()
        assert http.post("/v1/ledger/verify", json={}).status_code == 200
        # Identity in the parameters is an unknown parameter, refused before anything is done.
        for body in ({"caller": "alice"}, {"user": "alice"}, {"sql": "SELECT 1", "caller": {"uid": 4242, "user": "alice"}}):
            r = http.post("/v1/ledger/query", json=body)
            assert r.status_code == 400, body
            assert "takes no parameter" in r.json()["error"]["message"]
        r = http.get("/v1/info", params={"caller": "alice"})
        assert r.status_code == 400
    client = served.client()
    try:
        rows = decisions(client)
    finally:
        client.close()
    assert {(r["identity"], r["uid"]) for r in rows} == {(me(), os.getuid())}
    assert [r["action"] for r in rows[:2]] == ["service.info", "ledger.verify"]


def test_sigterm_stops_cleanly(served: Served) -> None:
    # An idle keep-alive connection and a finished request must not hold the service up.
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)), base_url="http://appliance")
    try:
        assert http.get("/v1/info").status_code == 200
        rc, err = served.stop(signal.SIGTERM)
    finally:
        http.close()
    assert rc == 0, err
    assert "Traceback" not in err
    assert "SIGTERM: stopping" in err and err.rstrip().endswith("appliance service: stopped")
    assert not served.socket.exists()
    # The home is free again: the service released its lock, and the ledger still verifies.
    from appliance.service import Service

    with Service.open(served.home, PASSPHRASE.encode()) as svc:
        svc.ledger.verify(svc.trusted, svc.home.head_file)


def test_sigint_stops_cleanly(served: Served) -> None:
    rc, err = served.stop(signal.SIGINT)
    assert rc == 0 and "Traceback" not in err and "SIGINT: stopping" in err
    assert not served.socket.exists()


def test_sigint_stops_it_when_the_reader_of_its_stderr_is_gone(short_dir: Path) -> None:
    # Ctrl-C on `appliance serve | tee log` kills tee too: saying "stopping" then fails, and
    # the service must stop all the same.
    home, socket = new_home(short_dir / "home"), short_dir / "run" / "appliance.sock"
    proc = subprocess.Popen(serve_command(home, socket), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        assert b"appliance service: home" in proc.stderr.readline()
        proc.stderr.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=STOP_WAIT_S) == 0
        assert not socket.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_service_is_refused(served: Served, short_dir: Path) -> None:
    env = {**os.environ, "APPLIANCE_PASSPHRASE": PASSPHRASE}
    # Same socket, another home: refused before anything is opened.
    other = new_home(short_dir / "other")
    out = subprocess.run(serve_command(other, served.socket), capture_output=True, text=True, env=env, timeout=START_WAIT_S)
    assert out.returncode == 2, out.stderr
    assert f"another appliance service already serves on {served.socket}" in out.stderr and "Traceback" not in out.stderr
    # Same home, another socket: the home's lock refuses it.
    out = subprocess.run(serve_command(served.home, short_dir / "run" / "b.sock"), capture_output=True, text=True, env=env, timeout=START_WAIT_S)
    assert out.returncode == 2 and "holds the home" in out.stderr and "Traceback" not in out.stderr
    assert not (short_dir / "run" / "b.sock").exists()
    # The first one still answers.
    assert curl(served.socket, "/v1/info")[0] == 200


def test_listener_without_the_lock_is_refused(short_dir: Path) -> None:
    # A process that listens on the path but holds no lock (an older service, say).
    import socket as socketlib

    sock_path = short_dir / "run" / "appliance.sock"
    sock_path.parent.mkdir()
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen()
    try:
        out = subprocess.run(serve_command(new_home(short_dir / "home"), sock_path), capture_output=True, text=True, timeout=START_WAIT_S)
    finally:
        listener.close()
    assert out.returncode == 2 and f"another service already listens on {sock_path}" in out.stderr


def test_stale_socket_of_a_killed_service_is_replaced(served: Served) -> None:
    served.proc.kill()
    served.proc.wait()
    assert served.socket.exists()  # SIGKILL leaves the socket file behind
    again = start_serve(served.home, served.socket, "--socket-mode", "0600")
    try:
        assert oct(served.socket.stat().st_mode & 0o777) == oct(0o600)
        assert curl(served.socket, "/v1/info")[0] == 200
    finally:
        rc, err = again.stop()
    assert rc == 0 and "Traceback" not in err and "mode 0600" in err


def test_unknown_socket_group_is_a_clear_error(short_dir: Path) -> None:
    out = subprocess.run(
        serve_command(new_home(short_dir / "home"), short_dir / "run" / "s.sock", "--socket-group", "no-such-group-apl"),
        capture_output=True,
        text=True,
        timeout=START_WAIT_S,
    )
    assert out.returncode == 2 and "no group named 'no-such-group-apl'" in out.stderr and "Traceback" not in out.stderr


def test_follower_that_disconnects_leaves_no_trace(served: Served, tiny_recipe: Path) -> None:
    client = served.client()
    try:
        run_id = client.call("run.start", recipe=str(tiny_recipe))["run_id"]
        for i, _event in enumerate(client.stream("run.events", run=run_id)):
            if i == 2:
                break  # the generator closes its response: the follower hangs up mid-run
        client.close()
        client = served.client()
        client.call("run.cancel", run=run_id)
        final = [e for e in client.stream("run.events", run=run_id) if e["event"] == "run_finished"]
        assert final and final[0]["status"] == "stopped"
    finally:
        client.close()
    rc, err = served.stop()
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_model_export_streams_a_tar(short_dir: Path, home_copy: tuple[Path, Any]) -> None:
    """A signed model leaves as a tar stream: through the CLI (unpacked, signature verifies) and curl."""
    from registry.modelsig import verify_model_dir
    from tests.conftest import single_operator

    home, summary = home_copy
    served = start_serve(single_operator(home), short_dir / "run" / "appliance.sock")
    try:
        out = short_dir / "exported"
        cli = subprocess.run(
            [sys.executable, "-m", "appliance", "--socket", str(served.socket), "model", "export", summary.model_digest[:16], "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=STOP_WAIT_S,
        )
        assert cli.returncode == 0, cli.stderr
        verify_model_dir(out / "model", out / "signer.pub.pem")
        tar = short_dir / "model.tar"
        got = subprocess.run(
            ["curl", "-sS", "-f", "--unix-socket", str(served.socket), "-o", str(tar), f"http://appliance/v1/models/{summary.model_digest}/export"],
            capture_output=True,
            text=True,
            timeout=STOP_WAIT_S,
        )
        assert got.returncode == 0, got.stderr
        names = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
        assert "model/model.sig" in names and "signer.pub.pem" in names
    finally:
        rc, err = served.stop()
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_sigterm_mid_training_stops_the_run_with_a_checkpoint(served: Served, tiny_recipe: Path) -> None:
    """SIGTERM while a follower watches training: the run is interrupted (its job saves a
    checkpoint), the follower sees the end, the service exits 0."""
    client = served.client()
    seen: list[dict[str, Any]] = []
    stage = None
    signalled = False
    try:
        run_id = client.call("run.start", recipe=str(tiny_recipe))["run_id"]
        for event in client.stream("run.events", run=run_id):
            seen.append(event)
            stage = event.get("stage", stage) if event["event"] == "stage_started" else stage
            if not signalled and stage == "train" and event["event"] == "progress":
                served.proc.send_signal(signal.SIGTERM)
                signalled = True
            if event["event"] == "run_finished":
                break
    finally:
        client.close()
    assert signalled, [e["event"] for e in seen]
    rc, err = served.stop(None)
    assert rc == 0 and "Traceback" not in err, err
    # Not the operator's choice: recorded as interrupted, so the next service start resumes it.
    assert seen[-1]["event"] == "run_finished" and seen[-1]["status"] == "interrupted", seen[-1]
    assert "the service stopping" in seen[-1]["error"]
    from appliance.service import Service

    with Service.open(served.home, PASSPHRASE.encode()) as svc:
        assert svc.ledger.select("SELECT status FROM runs WHERE run_id = ?", [run_id]) == [("interrupted",)]
        saved = svc.ledger.select("SELECT count(*) FROM checkpoints WHERE run_id = ? AND status = 'saved'", [run_id])
        assert saved[0][0] >= 1
        svc.ledger.verify(svc.trusted, svc.home.head_file)


@pytest.mark.slow
def test_concurrent_clients_while_a_run_streams(served: Served, tiny_recipe: Path) -> None:
    """4 clients query and verify 50 times each while a tiny run appends and streams metrics."""
    errors: list[BaseException] = []
    events: list[dict[str, Any]] = []
    follower_client = served.client()
    run_id = follower_client.call("run.start", recipe=str(tiny_recipe))["run_id"]

    def follow() -> None:
        try:
            events.extend(follower_client.stream("run.events", run=run_id))
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)

    def hammer(n: int) -> None:
        client = served.client()
        try:
            for i in range(50):
                result = client.call("ledger.query", sql=f"SELECT {n} AS worker, {i} AS i, count(*) AS events FROM events")
                assert result["rows"][0][:2] == [n, i]
                report = client.call("ledger.verify")
                assert report["ok"] is True
        except BaseException as exc:  # collected and re-raised below
            errors.append(exc)
        finally:
            client.close()

    follower = threading.Thread(target=follow)
    workers = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    follower.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=STOP_WAIT_S)
    follower.join(timeout=STOP_WAIT_S)
    follower_client.close()
    assert not errors, errors[0]
    assert not follower.is_alive() and not any(w.is_alive() for w in workers)
    final = [e for e in events if e["event"] == "run_finished"]
    assert final and final[0]["status"] == "succeeded", final
    client = served.client()
    try:
        report = client.call("ledger.verify")
        rows = decisions(client)
    finally:
        client.close()
    assert report["ok"] and report["head_checked"]
    # Each request's decision was recorded, the final verify and the query reading them included.
    assert sum(r["action"] == "ledger.query" for r in rows) == 4 * 50 + 1
    assert sum(r["action"] == "ledger.verify" for r in rows) == 4 * 50 + 1
    assert all(r["allowed"] for r in rows)
    rc, err = served.stop()
    assert rc == 0 and "Traceback" not in err, err


def test_a_bad_recipe_comes_back_with_each_problem(served: Served, tiny_recipe: Path) -> None:
    # The console shows each problem beside its key: the list survives the socket.
    from pipeline.errors import ConfigError

    tiny_recipe.write_text(tiny_recipe.read_text().replace("lr = 3e-3", "lr = inf").replace("seq_len = 32", "seq_len = 4096"))
    client = served.client()
    try:
        with pytest.raises(ConfigError) as err:
            client.call("run.start", recipe=str(tiny_recipe))
    finally:
        client.close()
    assert {p.key for p in err.value.problems} == {"train.lr", "train.seq_len"}
    assert "2 problems" in err.value.message and all(p.fix for p in err.value.problems)
