"""The floors of DESIGN.md: pipeline stays pure, the core imports without textual."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"appliance", "registry", "pipeline", "policies", "keys", "airgap"}
# Which project packages each package may import (arrows point down only).
ALLOWED = {
    "keys": set(),
    "pipeline": {"keys"},
    "registry": {"keys"},
    "policies": {"keys"},
    "airgap": {"keys"},
    "appliance": PROJECT,
}


def _imports(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.add((str(path.relative_to(ROOT)), name.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_floors(package: str) -> None:
    bad = sorted((f, m) for f, m in _imports(package) if m in PROJECT - {package} - ALLOWED[package])
    assert not bad, f"{package} imports packages above or beside it: {bad}"


def test_only_appliance_mentions_textual() -> None:
    bad = sorted((f, m) for pkg in PROJECT - {"appliance"} for f, m in _imports(pkg) if m == "textual")
    assert not bad


def _modules_after_import(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_core_imports_without_textual_in_a_fresh_interpreter() -> None:
    mods = _modules_after_import(
        "import pipeline, registry, keys, policies, airgap\n"
        "import pipeline.ingest, pipeline.clean, pipeline.tokenizer, pipeline.shard, pipeline.train, pipeline.package\n"
        "import registry.ledger, registry.store, registry.query, registry.modelsig, keys.keystore"
    )
    assert "textual" not in mods
    assert "appliance" not in mods


def test_pipeline_does_not_pull_in_upper_floors() -> None:
    mods = _modules_after_import(
        "import pipeline.ingest, pipeline.clean, pipeline.tokenizer, pipeline.shard, pipeline.train, pipeline.evaluate, pipeline.package"
    )
    assert not {"registry", "appliance", "policies", "textual"} & mods


def test_ledger_and_keys_do_not_need_torch() -> None:
    mods = _modules_after_import("import registry.ledger, registry.store, registry.query, keys.keystore, policies, airgap.attest")
    assert "torch" not in mods and "textual" not in mods


def test_recipe_loads_without_the_heavy_libraries() -> None:
    # The service and the CLI read recipes; the stage configs they need live in torch-free modules.
    mods = _modules_after_import("import appliance.recipe")
    assert not {"torch", "sentencepiece", "pyarrow", "safetensors", "textual", "numpy"} & mods


def test_the_service_and_its_server_import_no_torch_sentencepiece_or_pyarrow() -> None:
    mods = _modules_after_import(
        "import appliance.service.core, appliance.service.runs, appliance.service.reads, appliance.service.models, appliance.service.api\n"
        "import appliance.server.app, appliance.server.client, appliance.jobs.runner, appliance.cli\n"
        "appliance.cli.build_parser()"
    )
    assert not {"torch", "sentencepiece", "pyarrow", "safetensors", "textual"} & mods


def test_a_client_command_loads_neither_the_ledger_nor_numpy() -> None:
    # What `appliance --socket S …` imports before it talks to the service: it must start fast.
    mods = _modules_after_import("import appliance.cli, appliance.server.client, appliance.cli.common\nappliance.cli.build_parser()")
    assert not {"torch", "numpy", "duckdb", "pyarrow", "registry.ledger", "cryptography"} & mods
