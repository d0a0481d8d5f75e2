"""Shared fixtures: a tiny real corpus and one finished tiny run that tests copy and tamper with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ASSETS = Path(__file__).with_name("assets")
PASSPHRASE = "correct horse battery staple"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit code, stdout, stderr)."""
    from appliance.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _passphrase_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("APPLIANCE_PASSPHRASE_FILE", raising=False)
    monkeypatch.delenv("APPLIANCE_HOME", raising=False)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~150 KB of the standard library's docs: real text, built in a second."""
    from appliance.demo import build_stdlib_corpus

    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "corpus", max_bytes=150_000).path


@pytest.fixture
def tiny_recipe(tmp_path: Path, stdlib_corpus: Path) -> Path:
    """The tiny test recipe, beside a private copy of the corpus (tests may break it)."""
    shutil.copytree(stdlib_corpus, tmp_path / "corpus")
    recipe = tmp_path / "tiny.toml"
    shutil.copyfile(ASSETS / "tiny.toml", recipe)
    return recipe


def summary_of(final: dict[str, Any]) -> SimpleNamespace:
    """A finished run's summary with attribute access (model_path as a Path)."""
    assert final["status"] == "succeeded", final
    s = dict(final["summary"])
    s["model_path"] = Path(s["model_path"])
    return SimpleNamespace(**s)


def run_to_end(svc: Any, recipe: Path, **params: Any) -> dict[str, Any]:
    """Start a run through the API as this process's user and wait for its final event."""
    from appliance.service import Caller
    from appliance.service.api import dispatch

    accepted = dispatch(svc, Caller.current(), "run.start", {"recipe": str(Path(recipe).resolve()), **params})
    return svc.runs.wait(accepted["run_id"])


def new_home(path: Path) -> Any:
    """A fresh home owned by this process's user (the CLI acts as that user too)."""
    from appliance.service import Caller, Service

    return Service.initialise(path, PASSPHRASE.encode(), Caller.current())


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, stdlib_corpus: Path) -> tuple[Path, object]:
    """One home with one finished tiny run (home path, summary). Copy before tampering."""
    base = tmp_path_factory.mktemp("finished")
    shutil.copytree(stdlib_corpus, base / "corpus")
    shutil.copyfile(ASSETS / "tiny.toml", base / "tiny.toml")
    with new_home(base / "home") as svc:
        summary = summary_of(run_to_end(svc, base / "tiny.toml"))
    return base / "home", summary


@pytest.fixture
def home_copy(tmp_path: Path, finished_run: tuple[Path, object]) -> tuple[Path, object]:
    """A private copy of the finished home, safe to tamper with."""
    home, summary = finished_run
    dest = tmp_path / "home"
    shutil.copytree(home, dest, symlinks=True)
    return dest, summary


def single_operator(home: Path) -> Path:
    """Turn a (stopped) home's policy into the single-operator one: the root key's holder signs a
    newer default policy without two-person rules, as `appliance init --single-operator` makes."""
    from appliance.service import Service
    from keys.keystore import load_key
    from policies.policy import default_policy
    from policies.signature import sign_policy

    with Service.open(home, PASSPHRASE.encode()) as svc:
        owner, version = svc.owner, svc.policy.version
    text = default_policy(owner, two_person=False).replace("version = 1", f"version = {version + 1}", 1)
    (home / "policy.toml").write_text(text)
    (home / "policy.toml.sig").write_bytes(sign_policy(text.encode(), load_key(home / "keys" / "root.key", PASSPHRASE.encode())))
    return home


@pytest.fixture(params=[0o000, 0o077], ids=["umask000", "umask077"])
def umask(request: pytest.FixtureRequest) -> Any:
    """Run the test under a permissive and a strict umask: modes must not depend on it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture
def umask000() -> Any:
    """The most permissive umask, where a forgotten explicit mode shows."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)
