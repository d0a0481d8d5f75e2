"""The sbatch script writer: its content, bash's parse of it, and a run against fake SLURM tools."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.jobs.slurm import SlurmConfig, render_script, write_script
from appliance.recipe import load_recipe
from pipeline.errors import ConfigError
from tests.conftest import PASSPHRASE, cli

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None or shutil.which("sha256sum") is None, reason="needs bash and sha256sum")

FAKE_SRUN = """#!/bin/bash
# Record srun's own arguments, then run the command once per node as SLURM would.
printf '%s\\0' "$@" > "$FAKE_LOG/srun.args"
while [ "$#" -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i "$@" || exit $?
done
"""
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2 $3" = "show hostnames $SLURM_JOB_NODELIST" ] || exit 3
# The pause lets a reader that stops after one line close the pipe first, as on a busy node.
echo gpu-a01
sleep 0.2
echo gpu-a02
"""
FAKE_APPLIANCE = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG/appliance.$SLURM_NODEID"
echo "$OMP_NUM_THREADS $NCCL_DEBUG ${APPLIANCE_PASSPHRASE:+passphrase-set}" > "$FAKE_LOG/env.$SLURM_NODEID"
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    # Spaces in every path: the script must quote them.
    folder = tmp_path / "my recipes"
    folder.mkdir()
    path = folder / "tiny recipe.toml"
    path.write_text('[recipe]\nname = "slurm test"\n\n[train]\nsteps = 5\n')
    return path


def _fakes(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir, log = tmp_path / "fake bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("appliance", FAKE_APPLIANCE)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "FAKE_LOG": str(log),
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(tmp_path / "submit dir"),
        "APPLIANCE_PASSPHRASE": PASSPHRASE,
    }
    return env, log


def _argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _run(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH or "bash", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_script_for_two_nodes_of_four_gpus(recipe: Path, tmp_path: Path) -> None:
    loaded = load_recipe(recipe)
    cfg = SlurmConfig(nodes=2, gpus_per_node=4, partition="gpu", account="proj-42", time="2-00:00:00", data="run-20250101T000000Z-abc123", port=29600)
    text = render_script(loaded, cfg, home=tmp_path / "home")
    for line in (
        "#SBATCH --job-name=train-slurm-test",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --error=%x-%j.err",
        "set -euo pipefail",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        'JOBFILE="$SLURM_SUBMIT_DIR/appliance-job-$SLURM_JOB_ID.json"',
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"',
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        'if [ "$SLURM_NODEID" -eq 0 ]; then',
        '  exec appliance --home "$APP_HOME" train "$RECIPE" --data "$DATA_RUN" --nnodes "$SLURM_NNODES" --node-rank 0'
        ' --nproc-per-node 4 --rdzv-endpoint "$HEAD_NODE:29600" --job-file "$JOBFILE"',
        '  exec appliance train --join "$JOBFILE" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --nproc-per-node 4 --rdzv-endpoint "$HEAD_NODE:29600"',
    ):
        assert line in text.splitlines(), line
    assert text.startswith("#!/bin/bash\n")
    assert f"#   recipe:        {recipe.resolve()}" in text
    assert f"#   recipe sha256: {hashlib.sha256(recipe.read_bytes()).hexdigest()}" in text
    assert text.count("\nsrun ") == 1 and "--kill-on-bad-exit=1" in text
    assert PASSPHRASE not in text  # the environment has it; the script must not
    # Every #SBATCH line comes before the first command, or sbatch ignores it.
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    plain = render_script(loaded, SlurmConfig(nodes=1, gpus_per_node=1), home=tmp_path)
    assert "--partition" not in plain and "--account" not in plain and "--data" not in plain and "DATA_RUN" not in plain


@needs_bash
def test_bash_accepts_the_script(recipe: Path, tmp_path: Path) -> None:
    for cfg in (SlurmConfig(nodes=2, gpus_per_node=4, data="run x 'quoted'"), SlurmConfig(nodes=1, gpus_per_node=8)):
        out = tmp_path / "job.sbatch"
        write_script(recipe, cfg, home=tmp_path / "home dir", out=out)
        assert out.stat().st_mode & stat.S_IXUSR
        check = subprocess.run([BASH or "bash", "-n", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


@needs_bash
def test_fake_cluster_runs_node_zero_and_the_worker(recipe: Path, tmp_path: Path) -> None:
    home = tmp_path / "the home"
    script = tmp_path / "job.sbatch"
    write_script(recipe, SlurmConfig(nodes=2, gpus_per_node=4, data="run 'a b'", port=29501), home=home, out=script)
    env, log = _fakes(tmp_path)
    done = _run(script, env)
    assert done.returncode == 0, done.stderr
    jobfile = f"{tmp_path}/submit dir/appliance-job-4242.json"
    endpoint = ["--nproc-per-node", "4", "--rdzv-endpoint", "gpu-a01:29501"]
    assert _argv(log / "appliance.0") == [
        "--home",
        str(home),
        "train",
        str(recipe.resolve()),
        "--data",
        "run 'a b'",
        "--nnodes",
        "2",
        "--node-rank",
        "0",
        *endpoint,
        "--job-file",
        jobfile,
    ]
    assert _argv(log / "appliance.1") == ["train", "--join", jobfile, "--nnodes", "2", "--node-rank", "1", *endpoint]
    srun = _argv(log / "srun.args")
    assert srun[:5] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=1", "--export=ALL"]
    assert srun[5:7] == ["bash", "-c"]
    for node in (0, 1):
        assert (log / f"env.{node}").read_text().split() == ["8", "WARN", "passphrase-set"]
    # A value the user set wins over the script's default.
    (log / "env.0").unlink()
    assert _run(script, {**env, "OMP_NUM_THREADS": "3", "NCCL_DEBUG": "INFO"}).returncode == 0
    assert (log / "env.0").read_text().split()[:2] == ["3", "INFO"]


@needs_bash
def test_script_fails_early_without_a_passphrase_or_with_a_changed_recipe(recipe: Path, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    write_script(recipe, SlurmConfig(nodes=2, gpus_per_node=4), home=tmp_path / "home", out=script)
    env, log = _fakes(tmp_path)
    del env["APPLIANCE_PASSPHRASE"]
    done = _run(script, env)
    assert done.returncode == 1 and "APPLIANCE_PASSPHRASE" in done.stderr
    assert not (log / "srun.args").exists()
    assert _run(script, {**env, "APPLIANCE_PASSPHRASE_FILE": str(tmp_path / "secret")}).returncode == 0
    (log / "srun.args").unlink()
    recipe.write_text(recipe.read_text().replace("steps = 5", "steps = 6"))
    done = _run(script, {**env, "APPLIANCE_PASSPHRASE": PASSPHRASE})
    assert done.returncode == 1 and "no longer has sha256" in done.stderr
    assert not (log / "srun.args").exists()


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"gpus_per_node": 0}, "--gpus-per-node"),
        ({"cpus_per_task": -1}, "--cpus-per-task"),
        ({"time": "24:00"}, "--time"),
        ({"time": "10:61:00"}, "--time"),
        ({"time": "1d"}, "--time"),
        ({"port": 0}, "--port"),
        ({"port": 80}, "--port"),
        ({"port": 70000}, "--port"),
        ({"partition": "gpu part"}, "--partition"),
        ({"account": "a\n#SBATCH --x"}, "--account"),
        ({"data": ""}, "--data"),
        ({"data": "run\nrm -rf /"}, "--data"),
    ],
)
def test_bad_options_name_the_option(options: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError) as err:
        SlurmConfig(**{"nodes": 2, "gpus_per_node": 4, **options})  # type: ignore[arg-type]
    assert err.value.message.startswith(flag + " ") and err.value.hint


def test_missing_or_invalid_recipe_and_bad_paths(tmp_path: Path, recipe: Path) -> None:
    cfg = SlurmConfig(nodes=2, gpus_per_node=4)
    with pytest.raises(ConfigError, match="RECIPE .*does not exist"):
        write_script(tmp_path / "nope.toml", cfg, home=tmp_path, out=None)
    bad = tmp_path / "bad.toml"
    bad.write_text('[recipe]\nname = "x"\n[train]\nstepz = 3\n')
    with pytest.raises(ConfigError, match="train.stepz"):
        write_script(bad, cfg, home=tmp_path, out=None)
    with pytest.raises(ConfigError, match="--home"):
        write_script(recipe, cfg, home=tmp_path / "a\nb", out=None)
    with pytest.raises(ConfigError, match="--out .* is a directory"):
        write_script(recipe, cfg, home=tmp_path, out=tmp_path)


def test_cli_writes_prints_and_refuses(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, out = tmp_path / "home", tmp_path / "train.sbatch"
    code, stdout, err = cli(capsys, "--home", str(home), "slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "4", "--out", str(out), "--json")
    assert code == 0, err
    payload = json.loads(stdout)
    assert payload["script"] == str(out) and payload["ranks"] == 8 and payload["recipe_sha256"] == load_recipe(recipe).digest
    assert out.read_text() == render_script(load_recipe(recipe), SlurmConfig(nodes=2, gpus_per_node=4), home=home)
    assert "not an initialised appliance home" in err
    code, stdout, _ = cli(capsys, "--home", str(home), "slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "4")
    assert code == 0 and stdout == out.read_text()  # no --out: the script on stdout, for `| sbatch`
    code, _, err = cli(capsys, "--home", str(home), "slurm", str(recipe), "--nodes", "2", "--gpus-per-node", "4", "--time", "forever")
    assert code == 2 and "--time 'forever'" in err and "hint:" in err
    code, _, err = cli(capsys, "slurm", str(tmp_path / "missing.toml"), "--nodes", "2", "--gpus-per-node", "4")
    assert code == 2 and "missing.toml does not exist" in err
