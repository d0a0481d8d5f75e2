"""Learning-rate schedules: warmup, then cosine / warmup-stable-decay / constant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.training.config import TrainConfig
from pipeline.training.schedule import lr_at


def lrs(cfg: TrainConfig) -> list[float]:
    return [lr_at(s, cfg) for s in range(cfg.steps)]


def test_cosine_warms_up_then_decays() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    values = lrs(cfg)
    assert all(a < b for a, b in zip(values[:10], values[1:11])), values[:11]
    assert values[0] > 0 and values[9] < 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    # A cosine crosses the mid-point of lr and min_lr half-way through the decay.
    crossing = next(s for s, v in enumerate(values) if s >= 10 and v < 0.55)
    assert 54 <= crossing <= 57, crossing


def test_cosine_reaches_min_lr_at_the_last_step() -> None:
    # TrainConfig.steps promises "the cosine schedule decays to min_lr exactly at the last one":
    # the last update is step steps - 1 (0-based), as it is for wsd.
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(cfg.steps - 1, cfg) == pytest.approx(0.1)


def test_wsd_is_flat_then_linear_to_min_lr_over_the_last_fraction() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    values = lrs(cfg)
    assert values[9] < 1.0
    assert values[10:80] == [1.0] * 70
    decay = values[80:]
    assert decay[0] < 1.0
    assert decay[-1] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([steps[0]] * len(steps))  # linear: equal decrements
    assert steps[0] == pytest.approx(0.9 / 20)


def test_constant_is_flat_after_warmup() -> None:
    cfg = TrainConfig(steps=50, lr=0.5, min_lr=0.1, warmup_steps=5, schedule="constant")
    values = lrs(cfg)
    assert values[:5] == sorted(values[:5]) and values[4] < 0.5
    assert values[5:] == [0.5] * 45


def test_no_warmup_starts_at_lr() -> None:
    for schedule in ("cosine", "wsd", "constant"):
        cfg = TrainConfig(steps=20, lr=1.0, min_lr=0.1, warmup_steps=0, schedule=schedule)  # type: ignore[arg-type]
        assert lr_at(0, cfg) == pytest.approx(1.0), schedule


configs = st.builds(
    lambda steps, warmup, lr, frac, schedule, fraction: TrainConfig(
        steps=steps, warmup_steps=warmup, lr=lr, min_lr=lr * frac, schedule=schedule, decay_fraction=fraction
    ),
    steps=st.integers(1, 400),
    warmup=st.integers(0, 100),
    lr=st.floats(1e-6, 1.0),
    frac=st.floats(0.0, 1.0),
    schedule=st.sampled_from(["cosine", "wsd", "constant"]),
    fraction=st.floats(0.01, 1.0),
)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_warmup_rises_then_never_rises_and_stays_in_range(cfg: TrainConfig) -> None:
    values = lrs(cfg)
    warm = values[: cfg.warmup_steps]
    after = values[cfg.warmup_steps :]
    assert all(0 < v < cfg.lr for v in warm)
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))
    assert all(cfg.min_lr - 1e-12 <= v <= cfg.lr + 1e-12 for v in after)
    if after and cfg.schedule == "cosine":
        assert after[0] == pytest.approx(cfg.lr)  # the peak comes right after warmup
    if cfg.schedule == "constant":
        assert all(v == cfg.lr for v in after)


@settings(max_examples=200, deadline=None)
@given(configs)
def test_wsd_ends_at_min_lr(cfg: TrainConfig) -> None:
    if cfg.schedule != "wsd" or cfg.warmup_steps >= cfg.steps:
        return
    assert lr_at(cfg.steps - 1, cfg) == pytest.approx(cfg.min_lr)
