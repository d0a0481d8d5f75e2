"""The task journal: a data stage killed mid-way and relaunched recomputes only unfinished batches."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from keys import sealed
from pipeline.clean import CleanConfig
from pipeline.curate import CurateSettings, run_curate
from pipeline.parallel import TaskStats, ordered_map, stage_tasks
from pipeline.task_journal import canonical, journal_key
from tests.stage_jobs import ROOT, digests, journal_entries, kill_mid_stage, raw_corpus, run_job, write_spec

BATCHES = 14  # 14 × 256 documents: long enough to kill the job half-way


class Interrupt(Exception):
    pass


def _interrupt_after(batches: int) -> Callable[[int, int, dict[str, object]], None]:
    def progress(done: int, total: int, fields: dict[str, object]) -> None:
        if done >= batches * 256:
            raise Interrupt

    return progress


def _curate(raw: Path, out: Path, settings: CurateSettings, *, stop_after: int = 0) -> TaskStats:
    """Curate in this process under a journal; ``stop_after`` batches: interrupted there, as a kill would."""
    if not stop_after:
        with stage_tasks(journal=out / "task-journal", inputs=[raw]) as stats:
            run_curate(raw, out, settings)
        return stats
    # The error leaves the block, as a kill would: the journal stays.
    with pytest.raises(Interrupt), stage_tasks(journal=out / "task-journal", inputs=[raw]) as stats:
        run_curate(raw, out, settings, _interrupt_after(stop_after))
    return stats


def test_a_killed_stage_job_recomputes_only_unfinished_batches(tmp_path: Path) -> None:
    raw = raw_corpus(tmp_path / "raw.parquet", BATCHES * 256)
    reference = write_spec(tmp_path, "reference", raw, "[clean]\nworkers = 2\n")
    tasks, _ = run_job(reference)
    assert tasks == {"event": "tasks", "executor": "local", "batches": BATCHES, "computed": BATCHES, "reused": 0}
    expected = digests(tmp_path / "reference")
    assert not (tmp_path / "reference" / "task-journal").exists(), "a finished stage leaves no journal"

    spec = write_spec(tmp_path, "killed", raw, "[clean]\nworkers = 2\n")
    done = kill_mid_stage(spec, at_least=3)
    assert 3 <= done < BATCHES, done
    tasks, _ = run_job(spec)
    assert (tasks["reused"], tasks["computed"]) == (done, BATCHES - done)
    assert digests(tmp_path / "killed") == expected
    assert not journal_entries(tmp_path / "killed")
    assert not (tmp_path / "killed" / "task-journal").exists()


def test_an_interrupted_stage_resumes_byte_identical(tmp_path: Path) -> None:
    raw = raw_corpus(tmp_path / "raw.parquet", 6 * 256)
    settings = CurateSettings(clean=CleanConfig(workers=1))
    full = _curate(raw, tmp_path / "full", settings)
    assert (full.computed, full.reused) == (6, 0)
    part = _curate(raw, tmp_path / "part", settings, stop_after=2)
    assert part.computed == 2 and len(journal_entries(tmp_path / "part")) == 2
    again = _curate(raw, tmp_path / "part", settings)
    assert (again.reused, again.computed) == (2, 4)
    assert digests(tmp_path / "part") == digests(tmp_path / "full")


def test_a_changed_config_or_input_never_reuses_a_journal(tmp_path: Path) -> None:
    raw = raw_corpus(tmp_path / "raw.parquet", 4 * 256)
    settings = CurateSettings(clean=CleanConfig(workers=1))
    out = tmp_path / "out"
    _curate(raw, out, settings, stop_after=2)
    first = {p.parent.name for p in journal_entries(out)}
    # Another setting: the journal is not read, and is removed as stale.
    changed = _curate(raw, out, CurateSettings(clean=CleanConfig(workers=1, min_chars=10)), stop_after=2)
    assert changed.reused == 0
    assert first.isdisjoint({p.parent.name for p in journal_entries(out)})
    # Other input under the same name (a new mtime, another size): not read either.
    raw_corpus(raw, 4 * 256, seed=2)
    other = _curate(raw, out, CurateSettings(clean=CleanConfig(workers=1, min_chars=10)))
    assert (other.reused, other.computed) == (0, 4)
    assert not (out / "task-journal").exists()


def test_the_worker_count_does_not_change_the_journal_key() -> None:
    # The journal a 2-worker attempt left is read by a 4-worker relaunch: the output does not depend on it...
    a = journal_key(run_curate, None, (CurateSettings(),), [])
    assert a == journal_key(run_curate, None, (CurateSettings(),), [])
    # ...but every other setting does (a set encodes the same in every process).
    assert a != journal_key(run_curate, None, (CurateSettings(clean=CleanConfig(min_chars=1)),), [])
    assert canonical({"b", "a"}) == canonical({"a", "b"}) == {"@set": ["a", "b"]}


def test_a_batch_other_than_the_one_journaled_is_recomputed(tmp_path: Path) -> None:
    with stage_tasks(journal=tmp_path / "j") as stats:
        assert list(ordered_map(_double, [1, 2, 3], workers=1)) == [2, 4, 6]
    assert (stats.batches, stats.computed) == (3, 3) and not (tmp_path / "j").exists()
    # A journal left by an interrupted map, then a relaunch whose second batch differs.
    with pytest.raises(Interrupt), stage_tasks(journal=tmp_path / "j"):
        for value in ordered_map(_double, [1, 2, 3], workers=1):
            if value == 4:
                raise Interrupt
    with stage_tasks(journal=tmp_path / "j") as stats:
        assert list(ordered_map(_double, [1, 5, 3], workers=1)) == [2, 10, 6]
    assert (stats.reused, stats.computed) == (1, 2)


def _double(x: int) -> int:
    return 2 * x


def test_journal_entries_are_sealed_and_unreadable_once_the_key_is_gone(tmp_path: Path) -> None:
    sealed.reset_for_tests()
    key_id, key = sealed.new_key()
    sealed.add_key(key_id, key)
    sealed.seal_path(tmp_path, key_id)  # as the service seals a stage's scratch files
    try:
        with pytest.raises(Interrupt), stage_tasks(journal=tmp_path / "j"):
            for value in ordered_map(_double, [1, 2, 3], workers=1):
                if value == 4:
                    raise Interrupt
        entries = sorted((tmp_path / "j").rglob("*.task"))
        assert len(entries) == 2 and all(sealed.is_sealed(p) for p in entries)
        assert b"APTASK01" not in entries[0].read_bytes()
        # The attempt's scratch key is forgotten: its entries are noise; the relaunch seals under its own.
        sealed.forget_key(key_id)
        next_id, next_key = sealed.new_key()
        sealed.add_key(next_id, next_key)
        sealed.seal_path(tmp_path, next_id)
        with stage_tasks(journal=tmp_path / "j") as stats:
            assert list(ordered_map(_double, [1, 2, 3], workers=1)) == [2, 4, 6]
        assert (stats.reused, stats.computed) == (0, 3)
    finally:
        sealed.reset_for_tests()


def test_local_runs_never_import_ray() -> None:
    code = (
        "import sys\nfrom pipeline.parallel import ordered_map\n"
        "assert list(ordered_map(abs, [-1, -2], workers=1)) == [1, 2]\n"
        "import appliance.jobs.stage_job, pipeline.curate\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
