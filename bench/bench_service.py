"""The service over its Unix socket against the same service in-process.

Four figures, printed, never asserted:

1. acknowledged ledger appends per second from N concurrent producers: each request is
   `service.info`, whose only write is its recorded `authz.decision` (one signed, chained,
   committed ledger row). In-process (`dispatch` from N threads, the `--home` local mode)
   against the same requests through the socket (N `ServiceClient`s) to `appliance serve`;
2. p50/p99 latency of a small `ledger.query` over the socket: idle, while N producers
   append, and (``--run-load``) while a tiny training run streams its metrics;
3. client start-up: `python -m appliance --socket S ledger query "SELECT 1"` against the
   local-mode `python -m appliance --home H ledger query "SELECT 1"` (which unlocks the node
   key and opens the ledger itself), alternating, medians;
4. what importing the client path costs (`python -X importtime`), heaviest modules first.

    .venv/bin/python bench/bench_service.py [--producers 4] [--appends 200] [--queries 300] [--rounds 10] [--run-load]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.server.client import ServiceClient  # noqa: E402
from appliance.service import Caller, Service  # noqa: E402
from appliance.service.api import dispatch  # noqa: E402

PASSPHRASE = "bench passphrase, not a secret"
QUERY = "SELECT 1 AS one"


def new_home(path: Path) -> Path:
    Service.initialise(path, PASSPHRASE.encode(), Caller.current()).close()
    return path


def start_service(home: Path, socket: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--home", str(home), "serve", "--socket", str(socket)], stderr=err, stdout=subprocess.DEVNULL, cwd=ROOT
        )
    deadline = time.monotonic() + 120
    while "appliance service: home" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"appliance serve did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def concurrent(producers: int, per_producer: int, make: Callable[[], Callable[[], Any]]) -> float:
    """Seconds for ``producers`` threads to each call their own callable ``per_producer`` times."""
    calls = [make() for _ in range(producers)]
    barrier = threading.Barrier(producers + 1)
    errors: list[BaseException] = []

    def work(call: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            for _ in range(per_producer):
                call()
        except BaseException as exc:  # reported after the threads end
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


def latencies(client: ServiceClient, n: int) -> tuple[float, float]:
    """p50, p99 of ``n`` sequential small queries, in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.call("ledger.query", sql=QUERY)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


class Background:
    """``producers`` threads calling service.info over the socket until stopped."""

    def __init__(self, socket: Path, producers: int) -> None:
        self.stop = threading.Event()
        self.count = 0
        self.threads = [threading.Thread(target=self._work, args=(socket,)) for _ in range(producers)]

    def _work(self, socket: Path) -> None:
        client = ServiceClient(socket)
        try:
            while not self.stop.is_set():
                client.call("service.info")
                self.count += 1
        finally:
            client.close()

    def __enter__(self) -> Background:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def cli_seconds(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "appliance", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{out.stderr}")
    return elapsed


def import_profile(statement: str, top: int = 5) -> tuple[float, list[tuple[float, str]]]:
    """``statement`` in fresh interpreters: its median wall time (ms, 5 runs) and, from
    ``-X importtime``, the heaviest modules it imported (cumulative ms; importtime's own
    bookkeeping inflates these, so read them as proportions)."""
    probe = f"import time; t = time.perf_counter()\n{statement}\nprint((time.perf_counter() - t) * 1000)"
    walls = [float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout) for _ in range(5)]
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True, cwd=ROOT)
    rows: list[tuple[int, float, str]] = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, raw = line[len("import time:") :].split("|")
        name = raw[1:]  # one space after the bar, then two per level of nesting
        rows.append(((len(name) - len(name.lstrip())) // 2, int(cumulative_us) / 1000, name.strip()))
    # Only what the statement added: the lines after the interpreter's own start-up (site).
    last_site = max((i for i, (depth, _ms, name) in enumerate(rows) if depth == 0 and name == "site"), default=-1)
    heavy = sorted(((ms, name) for depth, ms, name in rows[last_site + 1 :] if depth <= 1 and not name.startswith("appliance")), reverse=True)
    return statistics.median(walls), heavy[:top]


def tiny_run_recipe(work: Path) -> Path:
    from appliance.demo import build_stdlib_corpus

    build_stdlib_corpus(work / "corpus", max_bytes=150_000)
    recipe = work / "tiny.toml"
    shutil.copyfile(ROOT / "tests" / "assets" / "tiny.toml", recipe)
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--appends", type=int, default=200, help="requests per producer")
    ap.add_argument("--queries", type=int, default=300, help="queries per latency measurement")
    ap.add_argument("--rounds", type=int, default=10, help="CLI start-ups per side")
    ap.add_argument("--run-load", action="store_true", help="also measure query latency while a tiny training run streams")
    args = ap.parse_args()
    os.environ["APPLIANCE_PASSPHRASE"] = PASSPHRASE
    os.environ.pop("APPLIANCE_HOME", None)
    os.environ.pop("APPLIANCE_SOCKET", None)

    work = Path(tempfile.mkdtemp(prefix="apb", dir="/tmp"))  # short: a socket path has 108 bytes
    socket = work / "run" / "appliance.sock"
    served_home, local_home = new_home(work / "served"), new_home(work / "local")
    proc = start_service(served_home, socket, work / "serve.log")
    n, per = args.producers, args.appends
    try:
        # 1. acknowledged appends
        with Service.open(local_home, PASSPHRASE.encode()) as svc:
            caller = Caller.current()
            dispatch(svc, caller, "service.info", {})  # warm
            local_s = concurrent(n, per, lambda: lambda: dispatch(svc, caller, "service.info", {}))
        clients: list[ServiceClient] = []

        def make_remote() -> Callable[[], Any]:
            c = ServiceClient(socket)
            clients.append(c)
            c.call("service.info")  # connect and warm
            return lambda: c.call("service.info")

        remote_s = concurrent(n, per, make_remote)
        for c in clients:
            c.close()
        total = n * per
        print(f"acked appends, {n} producers x {per} service.info (one authz.decision row each)")
        print(f"  in-process (local mode)        {total / local_s:8.0f} appends/s")
        print(f"  through the socket             {total / remote_s:8.0f} appends/s   {local_s / remote_s:.2f}x of in-process")

        # 2. query latency
        client = ServiceClient(socket)
        latencies(client, 20)  # warm
        idle = latencies(client, args.queries)
        with Background(socket, n) as bg:
            t0 = time.perf_counter()
            loaded = latencies(client, args.queries)
            rate = bg.count / (time.perf_counter() - t0)
        print(f"ledger.query {QUERY!r} over the socket, {args.queries} sequential")
        print(f"  idle                           p50 {idle[0]:6.2f} ms   p99 {idle[1]:6.2f} ms")
        print(f"  {n} producers appending        p50 {loaded[0]:6.2f} ms   p99 {loaded[1]:6.2f} ms   (load: {rate:.0f} appends/s)")
        if args.run_load:
            run_id = client.call("run.start", recipe=str(tiny_run_recipe(work)))["run_id"]
            seen: list[str] = []
            follower = threading.Thread(target=lambda: seen.extend(e["event"] for e in ServiceClient(socket).stream("run.events", run=run_id)))
            follower.start()
            while "stage_started" not in seen:
                time.sleep(0.05)
            during = latencies(client, args.queries)
            follower.join()
            print(f"  during a tiny training run     p50 {during[0]:6.2f} ms   p99 {during[1]:6.2f} ms   ({len(seen)} run events streamed)")
        client.close()

        # 3. CLI start-up, alternating
        env = {**os.environ}
        remote_t, local_t = [], []
        query = ["ledger", "query", "--json", "SELECT 1"]
        cli_seconds(["--socket", str(socket), *query], env)  # warm the page cache
        cli_seconds(["--home", str(local_home), *query], env)
        for _ in range(args.rounds):
            remote_t.append(cli_seconds(["--socket", str(socket), *query], env))
            local_t.append(cli_seconds(["--home", str(local_home), *query], env))
        rm, lm = statistics.median(remote_t), statistics.median(local_t)
        print(f'`appliance … ledger query "SELECT 1"`, {args.rounds} runs each, alternating, medians')
        print(f"  --socket (client)              {rm * 1000:8.0f} ms")
        print(f"  --home (local mode)            {lm * 1000:8.0f} ms   socket client is {lm / rm:.1f}x faster")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
        if rc != 0:
            print(f"warning: the service exited with {rc}:\n{(work / 'serve.log').read_text(errors='replace')}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)

    # 4. import cost of the client path
    print("client path imports (fresh interpreter, median of 5; heaviest from python -X importtime)")
    for label, statement in (
        ("ServiceClient(S) built", "from appliance.server.client import ServiceClient; ServiceClient('/nonexistent.sock')"),
        ("  of which httpx (no CLI)", "from appliance.server.client import _import_httpx; _import_httpx()"),
        ("plain `import httpx`", "import httpx"),
        ("appliance.cli.ledger", "import appliance.cli.ledger"),
    ):
        total, top = import_profile(statement)
        heavy = ", ".join(f"{name} {ms:.0f}" for ms, name in top)
        print(f"  {label:<28} {total:6.0f} ms   heaviest: {heavy}")


if __name__ == "__main__":
    main()
