"""A corpus that is one big text file (a book, a manual, an export): split, trained on, validated.

Read whole, such a file is one document: Gopher's length rule drops it, and a run used to go on
to training without a validation split. With ``[ingest] split = "paragraphs"`` it is many
documents and runs end to end with a validation loss; with ``split = "file"`` the run stops in
curation, before any training, and the hint names the setting.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.demo import _module_text, _stdlib_modules
from tests.conftest import ASSETS, new_home, run_to_end

# Past Gopher's 100,000-word document limit, as a book is (~130k words of module docs).
BOOK_CHARS = 900_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One .txt file of the standard library's module docs, paragraphs apart: real text, no download."""
    folder = tmp_path_factory.mktemp("book") / "corpus"
    folder.mkdir()
    parts, size = [], 0
    for path, module in _stdlib_modules():
        text = _module_text(path, module)
        if text:
            parts.append(text.strip())
            size += len(text)
            if size >= BOOK_CHARS:
                break
    (folder / "library.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return folder


def _recipe(tmp_path: Path, book: Path, split: str) -> Path:
    shutil.copytree(book, tmp_path / "corpus")
    recipe = tmp_path / "book.toml"
    text = (ASSETS / "tiny.toml").read_text()
    recipe.write_text(text.replace("[clean]", f'[ingest]\nsplit = "{split}"\n\n[clean]', 1))
    return recipe


def _stages(svc: object, kind: str) -> list[str]:
    rows = svc.ledger.select("SELECT json_extract_string(body, '$.data.stage') FROM events WHERE kind = ? ORDER BY seq", [kind])  # type: ignore[attr-defined]
    return [r[0] for r in rows]


def test_split_by_paragraphs_runs_end_to_end_with_a_validation_set(tmp_path: Path, book: Path) -> None:
    recipe = _recipe(tmp_path, book, "paragraphs")
    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, recipe)
    assert final["status"] == "succeeded", final
    stats = final["summary"]["stats"]
    assert stats["ingest"]["documents"] > 100, stats["ingest"]
    shard = stats["shard"]
    assert shard["val_documents"] >= 1 and shard["val_tokens"] > 0 and shard["train_documents"] > 50, shard
    assert stats["evaluate"]["val_loss"] > 0, stats["evaluate"]


def test_split_by_file_stops_before_training_and_names_the_setting(tmp_path: Path, book: Path) -> None:
    recipe = _recipe(tmp_path, book, "file")
    with new_home(tmp_path / "home") as svc:
        final = run_to_end(svc, recipe)
        finished, failed = _stages(svc, "stage.finished"), _stages(svc, "stage.failed")
    assert final["status"] == "failed", final
    assert "no documents left" in final["error"] and "long_doc" in final["error"], final
    assert 'split = "paragraphs"' in final["error"], final["error"]
    assert "train" not in finished and "train" not in failed and failed, (finished, failed)
