"""Hash-pinned locks per install target, in PEP 751's ``pylock.toml`` format.

A lock names every distribution an appliance install needs for one target (Python version,
platform, CPU or CUDA torch), one wheel each, with the wheel's file name and sha256. The
offline wheel bundle is built from it (`airgap.bundle`), so what a head node installs is what
CI tested, byte for byte.

``pip lock`` (pip >= 25.1) writes the lock on a machine of the target's kind; `make_lock`
then keeps it portable: wheel URLs are dropped (they name the build machine's index and
folders; the bundle fetches by name, version and hash through whatever index that machine
uses), the appliance's own source-tree entry is dropped (the bundle builds its wheel), and a
``[tool.appliance]`` table records the target and a digest of the requirements it was made
from. `drift` compares that with ``pyproject.toml``: CI fails when they part.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airgap.errors import AirgapError

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "locks"
DEFAULT_TARGET = "cpu-py311-manylinux_x86_64"
# What a head node runs: the appliance with fine-tuning, the console and Ray for data stages on a
# cluster (deepspeed is left out: it publishes no wheel, and CPU head nodes do not use it), plus pip
# itself, so a bundle's install needs no pip of the host's and every distribution in the
# environment comes from the bundle.
EXTRAS = ("finetune", "console", "ray")
INSTALLER = ("pip",)
LOCK_HINT = "regenerate it on a connected machine of the target's kind: `appliance airgap lock` (needs pip >= 25.1)"


class LockError(AirgapError):
    """A lock file is missing, malformed, or no longer matches pyproject.toml."""


@dataclass(frozen=True)
class Target:
    """Where a lock's wheels run: pip's --python-version/--implementation/--abi/--platform."""

    name: str
    python: str  # "3.11"
    implementation: str  # "cp"
    abi: str  # "cp311"
    platforms: tuple[str, ...]  # every platform tag of a locked wheel
    torch: str  # "cpu" | "cuda"

    def pip_args(self) -> list[str]:
        args = ["--python-version", self.python, "--implementation", self.implementation, "--abi", self.abi]
        for tag in self.platforms:
            args += ["--platform", tag]
        return args


@dataclass(frozen=True)
class Locked:
    """One locked distribution: its wheel's file name and sha256."""

    name: str
    version: str
    wheel: str
    sha256: str

    def requirement(self) -> str:
        # "===": exactly this version; "==2.13.0" would also take a local build such as 2.13.0+cpu.
        return f"{self.name}==={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Lock:
    path: Path
    target: Target
    packages: tuple[Locked, ...]
    requirements_sha256: str

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def normalise(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path(target: str) -> Path:
    return LOCKS / f"pylock.{target}.toml"


def _field(table: dict[str, Any], key: str, path: Path, where: str, kind: type) -> Any:
    value = table.get(key)
    if not isinstance(value, kind):
        raise LockError(f"lock {path}: {where}{key} is missing or not a {kind.__name__}", LOCK_HINT)
    return value


def load_lock(path: Path) -> Lock:
    """Read a lock this module wrote; every problem names the file and the key."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockError(f"no lock at {path}", LOCK_HINT) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"lock {path} cannot be read: {exc}", LOCK_HINT) from None
    if data.get("lock-version") != "1.0":
        raise LockError(f"lock {path}: lock-version is {data.get('lock-version')!r}, not '1.0' (PEP 751)", LOCK_HINT)
    tool = _field(data.get("tool", {}), "appliance", path, "tool.", dict)
    target = Target(
        name=_field(tool, "target", path, "tool.appliance.", str),
        python=_field(tool, "python", path, "tool.appliance.", str),
        implementation=_field(tool, "implementation", path, "tool.appliance.", str),
        abi=_field(tool, "abi", path, "tool.appliance.", str),
        platforms=tuple(_field(tool, "platforms", path, "tool.appliance.", list)),
        torch=_field(tool, "torch", path, "tool.appliance.", str),
    )
    packages = []
    for i, pkg in enumerate(_field(data, "packages", path, "", list)):
        where = f"packages[{i}]."
        wheels = _field(pkg, "wheels", path, where, list)
        if len(wheels) != 1:
            raise LockError(f"lock {path}: {where}wheels holds {len(wheels)} wheels; a target's lock holds exactly one per package", LOCK_HINT)
        wheel = wheels[0]
        sha = _field(_field(wheel, "hashes", path, f"{where}wheels[0].", dict), "sha256", path, f"{where}wheels[0].hashes.", str)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise LockError(f"lock {path}: {where}wheels[0].hashes.sha256 is not a sha256 hex digest", LOCK_HINT)
        packages.append(
            Locked(
                name=normalise(_field(pkg, "name", path, where, str)),
                version=_field(pkg, "version", path, where, str),
                wheel=_field(wheel, "name", path, f"{where}wheels[0].", str),
                sha256=sha,
            )
        )
    return Lock(path, target, tuple(packages), _field(tool, "requirements-sha256", path, "tool.appliance.", str))


# -- drift against pyproject.toml ------------------------------------------------------------


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement strings a lock is made from: the dependencies, the locked extras', the installer."""
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"{pyproject} cannot be read for its [project] table: {exc}", "run from a source checkout of the appliance") from None
    reqs = list(project.get("dependencies", []))
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs + list(INSTALLER)


def requirements_digest(reqs: list[str], constraints: list[str]) -> str:
    return hashlib.sha256(json.dumps({"requirements": reqs, "constraints": constraints}, separators=(",", ":")).encode()).hexdigest()


def cpu_constraints(path: Path = ROOT / "constraints" / "cpu.txt") -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def drift(lock: Lock, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What in ``pyproject.toml`` (and the CPU constraints) the lock no longer matches; empty when in step."""
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement

    env: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()}
    env |= {"python_version": lock.target.python, "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    env |= {"python_full_version": f"{lock.target.python}.0", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    locked = {p.name: p for p in lock.packages}
    reqs = project_requirements(pyproject)
    constraints = cpu_constraints()
    problems = []
    for text in reqs + constraints:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            problems.append(f"{text!r} is not a requirement: {exc}")
            continue
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        got = locked.get(normalise(req.name))
        if got is None:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(got.version, prereleases=True) and not req.specifier.contains(got.version.split("+")[0], prereleases=True):
            problems.append(f"{req} is not met by the locked {got.name} {got.version}")
    if requirements_digest(reqs, constraints) != lock.requirements_sha256:
        problems.append("pyproject.toml's requirements (or constraints/cpu.txt) changed since the lock was made")
    return problems


# -- making a lock --------------------------------------------------------------------------


def _platform_tags(wheel: str) -> list[str]:
    # name-version(-build)?-python-abi-platform.whl; a platform may be several, dot-joined.
    return [t for t in wheel[: -len(".whl")].split("-")[-1].split(".") if t != "any"]


def make_lock(target: str = DEFAULT_TARGET, *, pip_args: list[str] | None = None, out: Path | None = None, python: str | None = None) -> Path:
    """Run ``pip lock`` for this machine's environment and write the portable lock for ``target``.

    ``python``: the interpreter whose pip locks (default: this one); it needs pip >= 25.1.
    """
    import platform

    impl = sys.implementation.name
    if impl != "cpython" or platform.machine() != "x86_64" or sys.platform != "linux":
        raise LockError(f"this machine is {impl} on {sys.platform}/{platform.machine()}", "make a lock on a Linux x86_64 CPython machine of the target's kind")
    torch = "cpu" if "cpu" in target.split("-") else "cuda"
    # The torch version CI tested, for both builds; which build is the package sources' choice
    # (a CPU wheel folder or index for cpu-*, the default index's CUDA build for cuda-*).
    constraints = cpu_constraints()
    reqs = project_requirements()
    out = out or lock_path(target)
    # pip lock writes the source tree's entry relative to the lock, so the raw lock sits in the tree.
    raw = ROOT / f"pylock.raw{os.getpid()}.toml"
    cmd = [python or sys.executable, "-m", "pip", "lock", "-q", "-o", str(raw), f".[{','.join(EXTRAS)}]", *INSTALLER, *(pip_args or [])]
    if constraints:
        cmd += ["-c", str(ROOT / "constraints" / "cpu.txt")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise LockError(
                f"pip lock failed: {' / '.join(tail)}", "pip >= 25.1 is needed (`python -m pip install -U pip`); the rest of the message names the requirement"
            )
        data = tomllib.loads(raw.read_text(encoding="utf-8"))
    finally:
        raw.unlink(missing_ok=True)
    text = portable(data, target, torch=torch, requirements=reqs, constraints=constraints, python=platform.python_version().rsplit(".", 1)[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_lock(out)  # what we wrote must read back
    return out


def portable(data: dict[str, Any], target: str, *, torch: str, requirements: list[str], constraints: list[str], python: str) -> str:
    """``pip lock``'s output as the lock we keep: no URLs, no source-tree entry, the target in [tool.appliance]."""
    if not isinstance(data.get("packages"), list):
        raise LockError("pip lock wrote no packages", "run `pip lock` by hand to see why")
    packages = [p for p in data["packages"] if "wheels" in p]
    skipped = [p["name"] for p in data["packages"] if "wheels" not in p and normalise(p["name"]) != "sovereign-appliance"]
    if skipped:
        raise LockError(
            f"pip lock found no wheel for {', '.join(skipped)}",
            "a bundle installs wheels only: build them (`pip wheel`) into a folder and pass it with --find-links",
        )
    platforms = sorted({tag for p in packages for w in p["wheels"] for tag in _platform_tags(w["name"])})
    lines = [
        "# The appliance's install for one target, hash-pinned (PEP 751). Written by `appliance airgap lock`;",
        "# do not edit by hand. CI checks it against pyproject.toml (`appliance airgap lock --check`).",
        'lock-version = "1.0"',
        'created-by = "appliance airgap lock (pip lock)"',
        f"requires-python = {json.dumps('==' + python + '.*')}",
        "",
    ]
    for p in sorted(packages, key=lambda p: normalise(p["name"])):
        wheel = p["wheels"][0]
        lines += [
            "[[packages]]",
            f"name = {json.dumps(normalise(p['name']))}",
            f"version = {json.dumps(p['version'])}",
            "",
            "[[packages.wheels]]",
            f"name = {json.dumps(wheel['name'])}",
            f"hashes = {{ sha256 = {json.dumps(wheel['hashes']['sha256'])} }}",
            "",
        ]
    lines += [
        "[tool.appliance]",
        f"target = {json.dumps(target)}",
        f"python = {json.dumps(python)}",
        'implementation = "cp"',
        f"abi = {json.dumps('cp' + python.replace('.', ''))}",
        f"platforms = {json.dumps(platforms)}",
        f"torch = {json.dumps(torch)}",
        f"requirements = {json.dumps(requirements)}",
        f"constraints = {json.dumps(constraints)}",
        f"requirements-sha256 = {json.dumps(requirements_digest(requirements, constraints))}",
        "",
    ]
    return "\n".join(lines)
