"""The token loader: epoch coverage, seed-only order, exact resume, rank slicing, shard joins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError
from pipeline.shard_format import ShardSet, open_shards, write_manifest, write_shard
from pipeline.training.loader import TokenLoader

# Token ids are their own positions (arange), so a window's first id says where it starts.
VOCAB = 1 << 16


def shard_set(root: Path, sizes: list[int]) -> ShardSet:
    """A train split of consecutive ids 0..sum(sizes)-1 cut into shards of the given sizes."""
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(sum(sizes), dtype=np.int64)
    entries, at = [], 0
    for i, n in enumerate(sizes):
        name = f"train_{i:03d}.bin"
        write_shard(root / name, ids[at : at + n], VOCAB)
        entries.append({"file": name, "split": "train", "tokens": n})
        at += n
    write_manifest(root, vocab_size=VOCAB, bos_id=1, eos_id=2, shards=entries, extra={})
    return open_shards(root)


def loader(shards: ShardSet, **kw: int) -> TokenLoader:
    args = {"seq_len": 8, "batch_size": 4, "seed": 3, **kw}
    return TokenLoader(shards, "train", **args)  # type: ignore[arg-type]


def starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    return shard_set(tmp_path_factory.mktemp("one"), [1001])


def check_epoch(ld: TokenLoader) -> list[int]:
    """Consume one epoch window by window; check coverage and contiguity; return the starts."""
    seen = []
    for _ in range(ld.windows):
        x, y = ld.next_batch()
        assert x.shape == (1, ld.seq_len) and y.shape == (1, ld.seq_len)
        row = torch.cat([x[0], y[0, -1:]])
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + ld.seq_len + 1)), row
        seen.append(int(row[0]))
    offset = seen[0] % ld.seq_len
    assert sorted(seen) == [offset + k * ld.seq_len for k in range(ld.windows)]
    assert all(s + ld.seq_len + 1 <= ld.total for s in seen)
    return seen


def test_every_window_is_seen_exactly_once_per_epoch(one_shard: ShardSet) -> None:
    ld = loader(one_shard, batch_size=1)
    assert ld.windows == (1001 - 1) // 8 - 1
    first = check_epoch(ld)
    assert ld.epoch == pytest.approx(1.0)
    second = check_epoch(ld)
    # A new epoch draws a new order (and offset) from (seed, epoch).
    assert first != second
    assert ld.epoch == pytest.approx(2.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(20, 400), seq_len=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 3))
def test_epoch_coverage_holds_for_any_size(tmp_path_factory: pytest.TempPathFactory, n: int, seq_len: int, seed: int, epoch: int) -> None:
    shards = shard_set(tmp_path_factory.mktemp("prop"), [n])
    try:
        ld = loader(shards, batch_size=1, seq_len=seq_len, seed=seed)
    except ConfigError:
        assert (n - 1) // seq_len - 1 < 1
        return
    ld.load_state_dict({**ld.state_dict(), "position": epoch * ld.windows})
    check_epoch(ld)


def test_order_depends_only_on_the_seed(one_shard: ShardSet) -> None:
    a, b, other = loader(one_shard), loader(one_shard), loader(one_shard, seed=4)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not torch.equal(torch.cat(batches_a), torch.cat([other.next_batch()[0] for _ in range(5)]))
    # Nor on the batch size: batches of 2 walk the same window sequence as batches of 4.
    small = loader(one_shard, batch_size=2)
    assert torch.equal(torch.cat([small.next_batch()[0] for _ in range(10)]), torch.cat(batches_a))


def test_targets_are_inputs_shifted_by_one(one_shard: ShardSet) -> None:
    x, y = loader(one_shard).next_batch()
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # ids are positions here


def test_resume_from_state_dict_gives_the_same_next_batches(one_shard: ShardSet) -> None:
    a = loader(one_shard)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    assert state == {"position": 28, "seed": 3, "seq_len": 8}
    b = loader(one_shard)
    b.load_state_dict(dict(state))
    # Far enough to cross into the next epoch (123 windows).
    for _ in range(40):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict()


def test_two_ranks_together_see_the_one_rank_batch(one_shard: ShardSet) -> None:
    whole = loader(one_shard, batch_size=8)
    ranks = [loader(one_shard, batch_size=4, rank=r, world=2) for r in (0, 1)]
    for _ in range(20):
        x, y = whole.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert {r.position for r in ranks} == {whole.position}


def window_sequence(shards: ShardSet, count: int) -> list[int]:
    ref = loader(shards, batch_size=1)
    return [starts(ref.next_batch()[0])[0] for _ in range(count)]


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 4)])
def test_world_size_change_on_resume_continues_with_the_next_unseen_window(one_shard: ShardSet, before: int, after: int) -> None:
    global_batch = 8
    reference = window_sequence(one_shard, 6 * global_batch)
    old = [loader(one_shard, batch_size=global_batch // before, rank=r, world=before) for r in range(before)]
    seen = []
    for _ in range(3):
        seen += [s for ld in old for s in starts(ld.next_batch()[0])]
    state = old[0].state_dict()
    new = [loader(one_shard, batch_size=global_batch // after, rank=r, world=after) for r in range(after)]
    for ld in new:
        ld.load_state_dict(dict(state))
    for _ in range(3):
        seen += [s for ld in new for s in starts(ld.next_batch()[0])]
    assert seen == reference


def test_windows_spanning_shards_are_joined(tmp_path: Path) -> None:
    # 8 + 1 tokens per window; the 3-token middle shard forces a window across three shards.
    shards = shard_set(tmp_path, [45, 3, 60, 13])
    ld = loader(shards, batch_size=1, seq_len=8)
    boundaries = [45, 48, 108]
    crossed = 0
    for _ in range(3 * ld.windows):
        x, y = ld.next_batch()
        row = torch.cat([x[0], y[0, -1:]])
        begin = int(row[0])
        assert torch.equal(row, torch.arange(begin, begin + 9)), row
        crossed += any(begin < b < begin + 9 for b in boundaries)
    assert crossed > 0


def test_resume_with_another_seed_or_seq_len_names_the_key(one_shard: ShardSet) -> None:
    state = loader(one_shard).state_dict()
    with pytest.raises(ConfigError, match=r"train\.seed") as err:
        loader(one_shard, seed=4).load_state_dict(dict(state))
    assert "fresh output directory" in err.value.hint
    with pytest.raises(ConfigError, match=r"train\.seq_len"):
        loader(one_shard, seq_len=16).load_state_dict(dict(state))


def test_too_few_tokens_is_a_config_error(tmp_path: Path) -> None:
    shards = shard_set(tmp_path, [16])
    with pytest.raises(ConfigError, match=r"train\.seq_len") as err:
        loader(shards, seq_len=8)
    assert "16 tokens" in err.value.message and err.value.hint
    assert loader(shards, seq_len=5).windows == 2
