"""An sbatch script that runs one recipe's training across the nodes of a SLURM allocation.

The first node runs ``appliance train`` against the home (it owns the ledger and writes a
job file on shared storage); every other node joins with ``appliance train --join`` once
that file exists, and torchrun's c10d rendezvous on the first node ties the ranks together.

Values that reach shell commands are quoted with ``shlex.quote``. ``#SBATCH`` lines are not
parsed by a shell, so their values are restricted to characters that need no quoting.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from appliance.recipe import LoadedRecipe, load_recipe
from pipeline.errors import ConfigError

# [D-]HH:MM:SS, one of the forms sbatch's --time accepts.
_TIME = re.compile(r"(?:(\d+)-)?(\d{1,3}):([0-5]\d):([0-5]\d)")
# Partition and account names as SLURM sites write them; a comma separates alternatives.
_NAME = re.compile(r"[A-Za-z0-9_.+-]+(?:,[A-Za-z0-9_.+-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(kw_only=True, slots=True)
class SlurmConfig:
    # Nodes in the allocation; node 0 also hosts the rendezvous.
    nodes: int
    # One training rank per GPU.
    gpus_per_node: int
    # 8 cores per GPU feeds the data loader and the host side of a rank on common GPU nodes.
    cpus_per_task: int = 0
    # A bound keeps a hung rendezvous from holding the nodes forever, and lets the scheduler backfill.
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    # Train on the shards of this earlier run instead of preparing the data again.
    data: str | None = None
    # 29500 is torchrun's default rendezvous port.
    port: int = 29500

    def __post_init__(self) -> None:
        _require(self.nodes >= 1, "--nodes", f"must be at least 1, got {self.nodes}", "pass --nodes 2 (or more) for a multi-node run")
        _require(self.gpus_per_node >= 1, "--gpus-per-node", f"must be at least 1, got {self.gpus_per_node}", "pass the number of GPUs on each node")
        _require(self.cpus_per_task >= 0, "--cpus-per-task", f"must be >= 0 (0 = 8 per GPU), got {self.cpus_per_task}", "pass e.g. --cpus-per-task 32")
        _require(
            _TIME.fullmatch(self.time) is not None, "--time", f"'{self.time}' is not HH:MM:SS or D-HH:MM:SS", "pass e.g. --time 12:00:00 or --time 2-00:00:00"
        )
        _require(
            1024 <= self.port <= 65535,
            "--port",
            f"must be in 1024..65535, got {self.port}",
            "pass an unprivileged port free on the first node, e.g. --port 29500",
        )
        for flag, value in (("--partition", self.partition), ("--account", self.account)):
            _require(
                value is None or _NAME.fullmatch(value) is not None,
                flag,
                f"'{value}' is not a SLURM name (letters, digits, _ . + -)",
                f"pass {flag} as `sinfo` / `sacctmgr` show it",
            )
        _require(
            self.data is None or (bool(self.data.strip()) and not _CONTROL.search(self.data)),
            "--data",
            f"{self.data!r} is not a run id",
            "pass a run id from `appliance ledger query 'SELECT run_id FROM runs'`",
        )

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or 8 * self.gpus_per_node


def _require(ok: bool, flag: str, problem: str, hint: str) -> None:
    if not ok:
        raise ConfigError(f"{flag} {problem}", hint)


def _job_name(recipe_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe_name).strip("-.")[:48]
    return f"train-{name}" if name else "train"


def render_script(loaded: LoadedRecipe, cfg: SlurmConfig, *, home: Path) -> str:
    """The sbatch script text for ``loaded`` on ``cfg.nodes`` nodes; ``home`` is opened by node 0."""
    g, digest = cfg.gpus_per_node, loaded.digest
    threads = max(1, cfg.cpus // g)
    sbatch = [
        f"#SBATCH --job-name={_job_name(loaded.recipe.recipe.name)}",
        f"#SBATCH --nodes={cfg.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={g}",
        f"#SBATCH --cpus-per-task={cfg.cpus}",
        f"#SBATCH --time={cfg.time}",
        *([f"#SBATCH --partition={cfg.partition}"] if cfg.partition else []),
        *([f"#SBATCH --account={cfg.account}"] if cfg.account else []),
        # %x = job name, %j = job id: one pair of logs per submission, in the submit directory.
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --error=%x-%j.err",
    ]
    # Every user-given string is assigned once, quoted, out here; the srun block below is in single
    # quotes and only expands these variables, so no value is ever quoted twice.
    values = [f"RECIPE={_shell_value(str(loaded.path), 'RECIPE')}", f"APP_HOME={_shell_value(str(home), '--home')}"]
    if cfg.data:
        values.append(f"DATA_RUN={_shell_value(cfg.data, '--data')}")
    data = ' --data "$DATA_RUN"' if cfg.data else ""
    rdzv = f'--nproc-per-node {g} --rdzv-endpoint "$HEAD_NODE:{cfg.port}"'
    lines = [
        "#!/bin/bash",
        "# Multi-node training written by `appliance slurm`.",
        f"#   recipe:        {loaded.path}",
        f"#   recipe sha256: {digest}",
        f"#   home:          {home} (opened by node 0, which records the run in its ledger)",
        f"#   {cfg.nodes} node(s) x {g} GPU(s) = {cfg.nodes * g} ranks",
        "# Submit from a directory on storage every node shares (the job file goes there), with",
        "# `appliance` on PATH and APPLIANCE_PASSPHRASE (or APPLIANCE_PASSPHRASE_FILE) set: sbatch",
        "# passes your environment on, and the passphrase is never written into this file.",
        *sbatch,
        "",
        "set -euo pipefail",
        "",
        'if [ -z "${APPLIANCE_PASSPHRASE:-}" ] && [ -z "${APPLIANCE_PASSPHRASE_FILE:-}" ]; then',
        '  echo "error: neither APPLIANCE_PASSPHRASE nor APPLIANCE_PASSPHRASE_FILE is set; node 0 needs one to unlock the node key" >&2',
        '  echo "  hint: export one of them, then sbatch this script again" >&2',
        "  exit 1",
        "fi",
        "",
        *values,
        "# Refuse a recipe that changed after this script was written: the digest above and the one",
        "# the ledger records must name the same file.",
        f'if [ "$(sha256sum < "$RECIPE" | cut -d " " -f1)" != {digest} ]; then',
        f'  echo "error: recipe $RECIPE is missing or no longer has sha256 {digest}" >&2',
        '  echo "  hint: run appliance slurm again to write a script for the recipe as it is now" >&2',
        "  exit 1",
        "fi",
        "",
        "# sed reads to the end; head -n1 would exit first and, under pipefail, scontrol's SIGPIPE",
        "# would fail the job at random.",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
        ': "${HEAD_NODE:?scontrol named no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST}"',
        "# Node 0 writes it, the others wait for it: it must be on storage every node shares.",
        'JOBFILE="$SLURM_SUBMIT_DIR/appliance-job-$SLURM_JOB_ID.json"',
        f"export RECIPE APP_HOME{' DATA_RUN' if cfg.data else ''} HEAD_NODE JOBFILE",
        "",
        "# One OpenMP thread per core a rank owns: torchrun starts one rank per GPU, and each rank",
        "# would otherwise start a thread per core of the node, oversubscribing the CPUs many times.",
        f'export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{threads}}}"',
        "# WARN prints NCCL's errors and little else; set INFO to see which network it picked.",
        'export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"',
        "# Left at torch's default, TORCH_NCCL_ASYNC_ERROR_HANDLING=3 tears every rank down on an NCCL",
        "# error or timeout, so a failed run ends instead of hanging until --time runs out.",
        "# If NCCL picks the wrong network interface, name it, e.g.:",
        "# export NCCL_SOCKET_IFNAME=ib0",
        "",
        "# One task per node. --kill-on-bad-exit ends every node when one fails, so the others do",
        "# not wait at the rendezvous forever; --export=ALL passes the variables above to each node.",
        f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task={cfg.cpus} --kill-on-bad-exit=1 --export=ALL bash -c \'',
        "set -euo pipefail",
        'if [ "$SLURM_NODEID" -eq 0 ]; then',
        f'  exec appliance --home "$APP_HOME" train "$RECIPE"{data} --nnodes "$SLURM_NNODES" --node-rank 0 {rdzv} --job-file "$JOBFILE"',
        "else",
        f'  exec appliance train --join "$JOBFILE" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" {rdzv}',
        "fi",
        "'",
        "",
    ]
    return "\n".join(lines)


def _shell_value(text: str, flag: str) -> str:
    # A newline would end the header comment it is also shown in, and could start a command there.
    if _CONTROL.search(text):
        raise ConfigError(f"{flag} {text!r} contains a control character", "use a path or name without newlines or tabs")
    return shlex.quote(text)


def write_script(recipe: Path, cfg: SlurmConfig, *, home: Path, out: Path | None) -> tuple[LoadedRecipe, str]:
    """Validate the recipe, render the script and write it to ``out`` (executable) if given."""
    recipe = Path(recipe)
    if not recipe.is_file():
        raise ConfigError(f"RECIPE {recipe} does not exist or is not a file", "pass the path of a recipe TOML file")
    loaded = load_recipe(recipe)
    text = render_script(loaded, cfg, home=home)
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory", "pass a file name, e.g. --out train.sbatch")
        try:
            out.write_text(text, encoding="utf-8")
            out.chmod(0o755)
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write the script ({exc.strerror})", "pass a path in a writable directory") from None
    return loaded, text
