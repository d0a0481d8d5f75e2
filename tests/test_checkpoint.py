"""Checkpoints: atomic saves, COMPLETE manifests, verification, fallback on resume, retention, record markers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keys.digest import dir_manifest, sha256_path
from pipeline.errors import TrainingError
from pipeline.training import checkpoint as ckpt
from pipeline.training.dist import DistContext

ONE = DistContext()
ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def save(out: Path, step: int, *, payload: bytes = b"weights", fail_main: bool = False, fail_rank: bool = False) -> ckpt.CheckpointInfo:
    """A checkpoint with the layout the loop writes: per-rank state and rng, rank 0's model files."""

    def rank_files(tmp: Path) -> list[Path]:
        if fail_rank:
            raise OSError(28, "No space left on device")
        return [write(tmp / "state" / "__0_0.distcp", payload * 50), write(tmp / "state" / ".metadata", b"meta"), write(tmp / "rng" / "rank_00000.pt", b"rng")]

    def main_files(tmp: Path) -> list[Path]:
        files = [write(tmp / "model.safetensors", payload), write(tmp / "trainer.json", b'{"step": %d}' % step)]
        if fail_main:
            raise OSError(28, "No space left on device")
        return files

    info = ckpt.save_checkpoint(ONE, out, step, write_rank_files=rank_files, write_main_files=main_files)
    assert info is not None
    return info


def flip_byte(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def steps_on_disk(out: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_checkpoints(out)]  # type: ignore[misc]


def test_save_writes_every_file_and_a_complete_manifest_of_them(tmp_path: Path) -> None:
    info = save(tmp_path, 10)
    assert info.path == tmp_path / "checkpoints" / "step_000010" and info.step == 10
    on_disk = {rel: digest for rel, digest, _ in dir_manifest(info.path) if rel != ckpt.COMPLETE}
    assert set(on_disk) == {"state/__0_0.distcp", "state/.metadata", "rng/rank_00000.pt", "model.safetensors", "trainer.json"}
    assert info.files == on_disk
    listed = {}
    for line in (info.path / ckpt.COMPLETE).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    assert listed == on_disk
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert ckpt.verify_checkpoint(info.path) == info


def test_complete_is_in_place_before_the_directory_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rename goes through keys.files.publish_dir (fsync of every file and folder, rename, fsync
    # of checkpoints/); COMPLETE is already written then, so a published step is always complete.
    from keys.files import publish_dir
    from pipeline.training import ckpt_files

    seen = []

    def spy(tmp: Path, final: Path, *, replace: bool = False) -> None:
        seen.append((tmp.name, sorted(p.name for p in tmp.iterdir()), final.name, replace))
        publish_dir(tmp, final, replace=replace)

    monkeypatch.setattr(ckpt_files, "publish_dir", spy)
    save(tmp_path, 10)
    assert seen == [(".tmp-step_000010", sorted([ckpt.COMPLETE, "model.safetensors", "rng", "state", "trainer.json"]), "step_000010", True)]


def test_checkpoint_digest_is_the_stores_directory_digest(tmp_path: Path) -> None:
    info = save(tmp_path, 3)
    assert ckpt.checkpoint_digest(info) == sha256_path(info.path)
    assert ckpt.checkpoint_digest(ckpt.verify_checkpoint(info.path)) == sha256_path(info.path)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_a_temp_dir_never_resumed(tmp_path: Path) -> None:
    good = save(tmp_path, 10)
    with pytest.raises(TrainingError, match="step_000020") as err:
        save(tmp_path, 20, fail_main=True)
    assert "No space left" in err.value.message and "intact" in err.value.hint
    stale = tmp_path / "checkpoints" / ".tmp-step_000020"
    assert stale.is_dir()
    assert steps_on_disk(tmp_path) == [10]
    # Even a temp dir that was complete but not yet renamed is not a checkpoint.
    shutil.rmtree(stale)
    shutil.copytree(save(tmp_path / "other", 20).path, stale)
    info, rejected = ckpt.find_resumable(tmp_path)
    assert info == good and rejected == []
    half_final = tmp_path / ".tmp-final"  # the loop writes final/ the same way
    half_final.mkdir()
    ckpt.clear_stale(tmp_path)
    assert not stale.exists() and not half_final.exists() and steps_on_disk(tmp_path) == [10]


def test_a_rank_that_cannot_write_fails_the_save_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="rank 0 could not write"):
        save(tmp_path, 5, fail_rank=True)
    assert steps_on_disk(tmp_path) == []


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 7, payload=b"first")
    info = save(tmp_path, 7, payload=b"second")
    assert (info.path / "model.safetensors").read_bytes() == b"second"
    ckpt.verify_checkpoint(info.path)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda p: flip_byte(p / "state" / "__0_0.distcp", 100), r"state/__0_0\.distcp does not match its recorded sha256"),
        (lambda p: (p / "model.safetensors").unlink(), r"model\.safetensors is missing"),
        (lambda p: write(p / "state" / "__1_0.distcp", b"planted"), r"state/__1_0\.distcp is not in its COMPLETE manifest"),
        (lambda p: (p / ckpt.COMPLETE).unlink(), r"no COMPLETE marker"),
        (lambda p: (p / ckpt.COMPLETE).write_text("not a manifest line\n"), r"line 1 of COMPLETE is malformed"),
        (lambda p: flip_byte(p / ckpt.COMPLETE, 3), r"does not match its recorded sha256"),
    ],
    ids=["bit-flip", "missing-file", "extra-file", "missing-complete", "malformed-complete", "altered-complete"],
)
def test_verify_names_what_is_wrong(tmp_path: Path, damage: object, named: str) -> None:
    info = save(tmp_path, 4)
    damage(info.path)  # type: ignore[operator]
    with pytest.raises(TrainingError, match=named) as err:
        ckpt.verify_checkpoint(info.path)
    assert str(info.path) in err.value.message and err.value.hint


def test_verify_refuses_a_directory_that_is_not_a_step(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not a checkpoint directory"):
        ckpt.verify_checkpoint(tmp_path)


def test_find_resumable_falls_back_past_corrupted_checkpoints(tmp_path: Path) -> None:
    first, second, third = (save(tmp_path, s) for s in (10, 20, 30))
    flip_byte(third.path / "state" / "__0_0.distcp", 7)
    info, rejected = ckpt.find_resumable(tmp_path)
    assert info == second
    assert [p.name for p, _ in rejected] == ["rejected-step_000030"]
    assert "state/__0_0.distcp" in rejected[0][1]
    assert (tmp_path / "checkpoints" / "rejected-step_000030").is_dir() and not third.path.exists()
    assert steps_on_disk(tmp_path) == [10, 20]
    # The next look does not meet the rejected one again.
    assert ckpt.find_resumable(tmp_path) == (second, [])

    (second.path / "trainer.json").unlink()
    info, rejected = ckpt.find_resumable(tmp_path)
    assert info == first and [p.name for p, _ in rejected] == ["rejected-step_000020"]
    assert "trainer.json is missing" in rejected[0][1]


def test_find_resumable_with_nothing_good_returns_none(tmp_path: Path) -> None:
    assert ckpt.find_resumable(tmp_path) == (None, [])
    info = save(tmp_path, 1)
    (info.path / ckpt.COMPLETE).unlink()
    found, rejected = ckpt.find_resumable(tmp_path)
    assert found is None and len(rejected) == 1 and "COMPLETE" in rejected[0][1]


def test_find_resumable_applies_the_extra_check(tmp_path: Path) -> None:
    old, new = save(tmp_path, 1), save(tmp_path, 2)

    def refuse_step_2(info: ckpt.CheckpointInfo) -> None:
        if info.step == 2:
            raise TrainingError("not this one", "")

    info, rejected = ckpt.find_resumable(tmp_path, refuse_step_2)
    assert info == old and [(p.name, why) for p, why in rejected] == [("rejected-step_000002", "not this one")]
    assert not new.path.exists()


def test_checkpoints_are_listed_in_numeric_order(tmp_path: Path) -> None:
    for step in (999_999, 2, 1_000_000, 10):
        (tmp_path / "checkpoints" / ckpt.step_name(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "rejected-step_000005").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step_000011").mkdir()
    assert steps_on_disk(tmp_path) == [2, 10, 999_999, 1_000_000]


def test_retention_keeps_the_newest_and_the_multiples(tmp_path: Path) -> None:
    assert ckpt.retained([2, 4, 6, 8, 10, 12], keep_last=2, keep_every=4) == {4, 8, 10, 12}
    assert ckpt.retained([2, 4, 6, 8, 10, 12], keep_last=2, keep_every=0) == {10, 12}
    assert ckpt.retained([5], keep_last=3, keep_every=0) == {5}
    for step in (2, 4, 6, 8, 10, 12):
        save(tmp_path, step)
    (tmp_path / "checkpoints" / "rejected-step_000013").mkdir()
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=4) == [2, 6]
    assert steps_on_disk(tmp_path) == [4, 8, 10, 12]
    assert (tmp_path / "checkpoints" / "rejected-step_000013").is_dir()  # kept for inspection


@given(st.sets(st.integers(1, 500), max_size=30), st.integers(1, 5), st.integers(0, 50))
def test_retention_is_exactly_newest_plus_multiples(steps: set[int], keep_last: int, keep_every: int) -> None:
    keep = ckpt.retained(sorted(steps), keep_last, keep_every)
    newest = set(sorted(steps)[-keep_last:])
    multiples = {s for s in steps if keep_every and s % keep_every == 0}
    assert keep == newest | multiples


# -- retention with the service's records ---------------------------------------------------


@given(st.sets(st.integers(1, 500), max_size=30), st.sets(st.integers(1, 500), max_size=30), st.integers(1, 5), st.integers(0, 50))
def test_only_recorded_checkpoints_are_ever_prunable(steps: set[int], recorded: set[int], keep_last: int, keep_every: int) -> None:
    gone = ckpt.prunable(steps, keep_last, keep_every, recorded)
    assert gone == sorted(gone) and set(gone) <= steps & recorded
    # Retention is applied among the recorded ones: the ledger always keeps its newest keep_last.
    assert set(gone) == (steps & recorded) - ckpt.retained(sorted(steps & recorded), keep_last, keep_every)
    # Without records (no service watching), and once everything is recorded, it is plain retention.
    plain = sorted(steps - ckpt.retained(sorted(steps), keep_last, keep_every))
    assert ckpt.prunable(steps, keep_last, keep_every) == plain == ckpt.prunable(steps, keep_last, keep_every, steps)


def test_the_service_killed_mid_run_leaves_its_recorded_checkpoints_in_place(tmp_path: Path) -> None:
    records = tmp_path / "records"
    for step in (2, 4, 6, 8):
        save(tmp_path, step)
    ckpt.mark_recorded(records, 2)
    ckpt.mark_recorded(records, 4)
    # 6 and 8 are newer but unrecorded: they do not push the recorded 2 and 4 out of keep_last = 2.
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=0, recorded=ckpt.recorded_steps(records)) == []
    assert steps_on_disk(tmp_path) == [2, 4, 6, 8]
    ckpt.mark_recorded(records, 6)
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=0, recorded=ckpt.recorded_steps(records)) == [2]
    # After the job, the service prunes with what its ledger holds.
    assert ckpt.prune(tmp_path, keep_last=2, keep_every=0, recorded={4, 6, 8}) == [4]
    assert steps_on_disk(tmp_path) == [6, 8]


def test_record_markers_are_named_like_the_checkpoint_and_read_back(tmp_path: Path) -> None:
    records = tmp_path / "records"
    assert ckpt.recorded_steps(records) == set()  # the service has not written any yet
    marker = ckpt.mark_recorded(records, 200)
    assert marker == ckpt.record_marker(records, 200) == records / "step_000200" and marker.name == ckpt.step_name(200)
    assert marker.is_file() and marker.read_bytes() == b""
    ckpt.mark_recorded(records, 200)  # idempotent
    ckpt.mark_recorded(str(records), 1_000_000)
    (records / "notes.txt").write_text("not a marker")
    (records / "step_12x").write_text("not a marker either")
    assert ckpt.recorded_steps(records) == {200, 1_000_000}
    ckpt.forget_record(records, 200)
    ckpt.forget_record(records, 300)  # nothing to forget
    assert ckpt.recorded_steps(records) == {1_000_000}


def test_checkpoint_files_import_without_torch() -> None:
    # The service verifies, records and prunes checkpoints, and must never import torch.
    code = "import pipeline.training, pipeline.training.ckpt_files; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_checkpoint_reexports_the_file_functions() -> None:
    from pipeline.training import ckpt_files

    for name in ckpt_files.__all__:
        assert getattr(ckpt, name) is getattr(ckpt_files, name), name
