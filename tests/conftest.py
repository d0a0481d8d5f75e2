"""Shared fixtures: a tiny real corpus and one finished tiny run that tests copy and tamper with."""

from __future__ import annotations

import getpass
import shutil
from pathlib import Path

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


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, stdlib_corpus: Path) -> tuple[Path, object]:
    """One home with one finished tiny run (home path, RunSummary). Copy before tampering."""
    from appliance.recipe import load_recipe
    from appliance.service import Service

    base = tmp_path_factory.mktemp("finished")
    shutil.copytree(stdlib_corpus, base / "corpus")
    shutil.copyfile(ASSETS / "tiny.toml", base / "tiny.toml")
    # The CLI acts as the OS user, so the owner must be that user for CLI tests to act.
    with Service.initialise(base / "home", PASSPHRASE.encode(), getpass.getuser()) as svc:
        summary = svc.run_recipe(load_recipe(base / "tiny.toml"))
    return base / "home", summary


@pytest.fixture
def home_copy(tmp_path: Path, finished_run: tuple[Path, object]) -> tuple[Path, object]:
    """A private copy of the finished home, safe to tamper with."""
    home, summary = finished_run
    dest = tmp_path / "home"
    shutil.copytree(home, dest, symlinks=True)
    return dest, summary
