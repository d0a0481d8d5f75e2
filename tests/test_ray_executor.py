"""Data stages on Ray: a two-node cluster on loopback, in a network namespace holding only ``lo``.

Ray binds to the host's interface address in a normal network namespace, whatever
``--node-ip-address`` says; inside ``unshare -n`` it stays on 127.0.0.1. So the cluster and the
stage jobs that drive it run in a namespace of their own (a holder process keeps it; every
command enters it with ``nsenter``), and nothing can reach outside. At the end every process
in that namespace is killed by PID (``ray stop`` would stop every Ray process of the machine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.recipe import parse_recipe
from pipeline.errors import ClusterError, ConfigError
from pipeline.ray_auth import read_token, token_path
from pipeline.ray_executor import _run_task, initialisations, require_cluster
from pipeline.settings.cluster import ClusterConfig
from tests.ray_cluster import ADDRESS, ClusterUnavailable, loopback_cluster, netns_members
from tests.stage_jobs import ROOT, digests, events, job_command, job_env, kill_mid_stage, raw_corpus, run_job, write_spec
from tests.unix_users import User, unix_people

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'sovereign-appliance[ray]')")
BATCHES = 12
RAY_RECIPE = f'[cluster]\nexecutor = "ray"\nray_address = "{ADDRESS}"\n'


# -- recipe table and errors (no cluster needed) ---------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('executor = "spark"', "cluster.executor"),
        ('executor = "ray"', "cluster.ray_address"),
        ('executor = "ray"\nray_address = "head-node"', "cluster.ray_address"),
        ("window = -1", "cluster.window"),
        ("window = 10000000000", "cluster.window"),
        ("workers = 4", "cluster.workers"),
    ],
)
def test_cluster_errors_name_the_key(table: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(f'[recipe]\nname = "x"\n[cluster]\n{table}\n', source="r.toml")
    assert key in str(err.value)


def test_the_default_is_local_and_ray_needs_an_address() -> None:
    recipe = parse_recipe('[recipe]\nname = "x"\n', source="r.toml")
    assert recipe.cluster == ClusterConfig()
    assert parse_recipe(f'[recipe]\nname = "x"\n{RAY_RECIPE}', source="r.toml").cluster.ray_address == ADDRESS


def _count_init(tag: str) -> None:
    global INITS
    INITS.append(tag)


INITS: list[str] = []


def test_the_initializer_runs_once_per_worker_process_not_per_batch() -> None:
    INITS.clear()
    for item in range(3):
        assert _run_task(abs, _count_init, "k1", pickle.dumps(("a",)), -item) == item
    assert INITS == ["a"]
    _run_task(abs, _count_init, "k2", pickle.dumps(("b",)), 1)  # another map's arguments in the same worker
    assert INITS == ["a", "b"] and initialisations()[f"{__name__}._count_init"] == "k2"


@needs_ray
def test_an_unreachable_cluster_says_how_to_start_one(tmp_path: Path) -> None:
    from pipeline.ray_executor import RayBackend

    with socket_port() as port:
        address = f"127.0.0.1:{port}"
    with pytest.raises(ClusterError) as err:
        RayBackend(abs, ClusterConfig(executor="ray", ray_address=address), None, ())
    assert address in str(err.value) and "ray start --head" in err.value.diagnostics()


@needs_ray
def test_a_run_naming_an_unreachable_cluster_is_refused_before_it_starts(tmp_path: Path, tiny_recipe: Path) -> None:
    from tests.conftest import new_home, run_to_end

    with socket_port() as port:
        address = f"127.0.0.1:{port}"
    recipe = tiny_recipe.with_name("ray.toml")
    recipe.write_text(tiny_recipe.read_text() + f'\n[cluster]\nexecutor = "ray"\nray_address = "{address}"\n')
    with new_home(tmp_path / "home") as svc:
        with pytest.raises(ClusterError, match="cannot be reached") as err:
            run_to_end(svc, recipe)
        assert "ray start --head" in err.value.diagnostics()
        assert svc.ledger.select("SELECT count(*) FROM events WHERE kind = 'run.started'") == [(0,)]


class socket_port:
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# -- the cluster's token (pipeline/ray_auth.py; no cluster needed) ----------------------------


def write_token(path: Path) -> Path:
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "auth_token"))
    return write_token(tmp_path / "auth_token")


def test_the_token_must_be_the_users_alone(token_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_token() == (token_file.read_text(), token_file)
    token_file.chmod(0o640)
    with pytest.raises(ClusterError, match="can be read or changed by other users") as err:
        read_token()
    assert f"chmod 600 {token_file}" in err.value.diagnostics()
    token_file.chmod(0o600)
    with token_file.open("r+b") as f:
        f.truncate(10 * 2**30)  # ten gigabytes, sparse: refused without being read
    with pytest.raises(ClusterError, match="not a token"):
        read_token()
    token_file.write_text(" \n")
    with pytest.raises(ClusterError, match="is empty"):
        read_token()
    token_file.unlink()
    with pytest.raises(ClusterError, match=f"no Ray token at {token_file}") as err:
        read_token()
    assert "ray get-auth-token --generate" in err.value.diagnostics() and "RAY_AUTH_MODE=token" in err.value.diagnostics()
    # Without RAY_AUTH_TOKEN_PATH: Ray's default place, in the home of the user running the stage.
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(token_file.parent))
    assert token_path() == token_file.parent / ".ray" / "auth_token"


def test_a_fifo_or_a_folder_in_the_tokens_place_is_refused_without_waiting(token_file: Path) -> None:
    # A FIFO opened for reading blocks until a writer comes; the token is opened non-blocking and
    # checked on the open file, so the stage is told at once instead of hanging.
    token_file.unlink()
    os.mkfifo(token_file, 0o600)
    with pytest.raises(ClusterError, match="is not a regular file"):
        read_token()
    token_file.unlink()
    token_file.mkdir(mode=0o700)
    with pytest.raises(ClusterError, match="is not a regular file"):
        read_token()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_token_of_another_user_is_refused(token_file: Path) -> None:
    os.chown(token_file, 65534, 65534)
    with pytest.raises(ClusterError, match="belongs to uid 65534"):
        read_token()


def test_the_service_passes_the_token_path_to_its_jobs_not_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.jobs.launch import LaunchOptions
    from appliance.jobs.runner import job_env as service_job_env

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/srv/appliance/.ray/auth_token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-secret")
    env = service_job_env(LaunchOptions())
    assert env["RAY_AUTH_TOKEN_PATH"] == "/srv/appliance/.ray/auth_token" and "RAY_AUTH_TOKEN" not in env


class closing_listener:
    """A loopback port that accepts and hangs up: something listens there, but not a Ray head."""

    def __enter__(self) -> str:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@needs_ray
def test_before_a_run_the_token_and_the_head_are_checked(token_file: Path) -> None:
    with closing_listener() as address:
        cluster = ClusterConfig(executor="ray", ray_address=address)
        with pytest.raises(ClusterError, match="did not answer as a Ray head") as err:
            require_cluster(cluster)
        assert address in str(err.value)
        token_file.chmod(0o644)
        with pytest.raises(ClusterError, match="can be read or changed by other users"):
            require_cluster(cluster)


# -- a two-node cluster in a network namespace (tests/ray_cluster.py) --------------------------


@pytest.fixture(scope="module")
def ray_netns() -> Iterator[list[str]]:
    """A head and a worker node (2 CPUs each) on 127.0.0.1; yields the prefix that enters their namespace."""
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install 'sovereign-appliance[ray]')")
    try:
        with loopback_cluster(ROOT, num_cpus=2) as ns:
            yield ns
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], float]:
    """The raw corpus and its curation on local workers: the reference digests and wall time."""
    folder = tmp_path_factory.mktemp("corpus")
    raw = raw_corpus(folder / "raw.parquet", BATCHES * 256)
    tasks, wall = run_job(write_spec(folder, "local", raw, "[clean]\nworkers = 2\n"))
    assert tasks["computed"] == BATCHES
    return raw, digests(folder / "local"), wall


@needs_ray
def test_curation_on_two_ray_nodes_is_byte_identical(ray_netns: list[str], corpus: tuple[Path, dict[str, str], float], tmp_path: Path) -> None:
    raw, expected, local_wall = corpus
    nodes = subprocess.run(
        [
            *ray_netns,
            sys.executable,
            "-c",
            f"import ray; ray.init(address='{ADDRESS}', _node_ip_address='127.0.0.1'); print(sum(n['Alive'] for n in ray.nodes()))",
        ],
        cwd=ROOT,
        env={**job_env(), "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]
    tasks, ray_wall = run_job(write_spec(tmp_path, "ray", raw, RAY_RECIPE), prefix=ray_netns)
    assert tasks == {"event": "tasks", "executor": "ray", "batches": BATCHES, "computed": BATCHES, "reused": 0}
    assert digests(tmp_path / "ray") == expected
    assert not (tmp_path / "ray" / "task-journal").exists()
    print(f"\ncuration of {BATCHES * 256} documents: local workers (2) {local_wall:.1f} s, two Ray nodes (2+2 CPUs) {ray_wall:.1f} s (job start included)")


@needs_ray
def test_a_driver_killed_mid_stage_reruns_only_unfinished_tasks(ray_netns: list[str], corpus: tuple[Path, dict[str, str], float], tmp_path: Path) -> None:
    raw, expected, _ = corpus
    spec = write_spec(tmp_path, "ray", raw, RAY_RECIPE)
    done = kill_mid_stage(spec, at_least=3, prefix=ray_netns)
    assert 3 <= done < BATCHES, done
    tasks, _ = run_job(spec, prefix=ray_netns)
    assert (tasks["reused"], tasks["computed"]) == (done, BATCHES - done)
    assert digests(tmp_path / "ray") == expected


@needs_ray
def test_a_ray_worker_killed_mid_stage_is_retried(ray_netns: list[str], corpus: tuple[Path, dict[str, str], float], tmp_path: Path) -> None:
    # Ray retries a task whose worker died; the stage finishes, byte-identical.
    raw, expected, _ = corpus
    spec = write_spec(tmp_path, "ray", raw, RAY_RECIPE)
    proc = subprocess.Popen([*ray_netns, sys.executable, "-m", "airgap.run", "appliance.jobs.stage_job", str(spec)], cwd=ROOT, env=job_env())
    killed = 0
    deadline = time.monotonic() + 120
    while not killed and proc.poll() is None and time.monotonic() < deadline:
        for pid in netns_members(os.readlink(ray_netns[1].removeprefix("--net="))):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::_run_task"):
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.05)
    assert proc.wait(timeout=300) == 0
    assert killed, "no Ray worker was seen running a batch"
    assert digests(tmp_path / "ray") == expected


# -- who may use the cluster: the token, against a second account on the node -----------------


def token_of(prefix: list[str]) -> str:
    return next(a for a in prefix if a.startswith("RAY_AUTH_TOKEN_PATH=")).partition("=")[2]


PROBE = """
import json, pathlib, sys
from pipeline.ray_auth import gcs_answer
seen = {{"without a token": gcs_answer({address!r}, None)[0], "with a guessed token": gcs_answer({address!r}, "0" * 64)[0]}}
try:
    pathlib.Path({token!r}).read_text()
    seen["reading the token file"] = "read"
except OSError as exc:
    seen["reading the token file"] = type(exc).__name__
print(json.dumps(seen))
"""


def answers_as(user: User, prefix: list[str], token: str) -> dict[str, str]:
    """What ``user`` (another account on the node) gets from the cluster's head, by a raw gRPC call, and from its token file."""
    from tests.test_server_users import python_for

    python = python_for(user)
    if python is None:
        pytest.skip(f"no Python that {user.name} can run with this project importable")
    argv, env = python
    done = subprocess.run(
        [*prefix[:3], "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *argv, "-c", PROBE.format(address=ADDRESS, token=token)],
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", **env},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture
def other_account() -> Iterator[User]:
    name = f"aplt_{secrets.token_hex(3)}"
    with unix_people([], [(name, [])]) as made:
        yield made[name]


@needs_ray
def test_another_account_on_the_node_cannot_use_the_cluster(ray_netns: list[str], other_account: User) -> None:
    seen = answers_as(other_account, ray_netns, token_of(ray_netns))
    assert seen == {"without a token": "refused", "with a guessed token": "refused", "reading the token file": "PermissionError"}
    # The stage's own token is taken (the curation tests above ran with it).
    mine = subprocess.run(
        [*ray_netns, sys.executable, "-c", f"from pipeline.ray_auth import gcs_answer, read_token; print(gcs_answer({ADDRESS!r}, read_token()[0])[0])"],
        cwd=ROOT,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert mine.stdout.strip() == "ok", mine.stderr[-2000:]


@needs_ray
def test_a_cluster_started_with_another_token_is_named(ray_netns: list[str], corpus: tuple[Path, dict[str, str], float], tmp_path: Path) -> None:
    raw, _, _ = corpus
    other = write_token(tmp_path / "other_token")
    spec = write_spec(tmp_path, "ray", raw, RAY_RECIPE)
    # `env` takes the last assignment: the job holds a token the cluster was not started with.
    done = subprocess.run(job_command(spec, [*ray_netns, f"RAY_AUTH_TOKEN_PATH={other}"]), cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    error = next(e for e in events(spec) if e["event"] == "error")["message"]
    assert f"refuses the token in {other}" in error, error
    assert not (tmp_path / "ray" / "dataset.parquet").exists()


@needs_ray
def test_an_open_cluster_is_refused_before_a_batch_is_sent(corpus: tuple[Path, dict[str, str], float], other_account: User, tmp_path: Path) -> None:
    raw, _, _ = corpus
    token = write_token(tmp_path / "auth_token")
    spec = write_spec(tmp_path, "ray", raw, RAY_RECIPE)
    try:
        with loopback_cluster(ROOT, num_cpus=1, token=False) as ns:
            # What an open cluster gives any account on the node: its head answers without a token.
            seen = answers_as(other_account, ns, str(token))
            done = subprocess.run(
                job_command(spec, [*ns, "env", f"RAY_AUTH_TOKEN_PATH={token}"]), cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300
            )
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    assert seen["without a token"] == "ok"
    assert done.returncode != 0
    error = next(e for e in events(spec) if e["event"] == "error")["message"]
    assert "accepts clients without a token" in error and "RAY_AUTH_MODE=token" in error, error
    assert not (tmp_path / "ray" / "dataset.parquet").exists()
