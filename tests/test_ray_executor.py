"""Data stages on Ray: a two-node cluster on loopback, in a network namespace holding only ``lo``.

Ray binds to the host's interface address in a normal network namespace, whatever
``--node-ip-address`` says; inside ``unshare -n`` it stays on 127.0.0.1. So the cluster and the
stage jobs that drive it run in a namespace of their own (a holder process keeps it; every
command enters it with ``nsenter``), and nothing can reach outside. At the end every process
in that namespace is killed by PID (``ray stop`` would stop every Ray process of the machine).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.recipe import parse_recipe
from pipeline.errors import ClusterError, ConfigError
from pipeline.ray_executor import _run_task, initialisations
from pipeline.settings.cluster import ClusterConfig
from tests.ray_cluster import ADDRESS, ClusterUnavailable, loopback_cluster, netns_members
from tests.stage_jobs import ROOT, digests, job_env, kill_mid_stage, raw_corpus, run_job, write_spec

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
        assert _run_task(abs, _count_init, "k1", ("a",), -item) == item
    assert INITS == ["a"]
    _run_task(abs, _count_init, "k2", ("b",), 1)  # another map's arguments in the same worker
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
        env=job_env(),
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
