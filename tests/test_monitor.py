"""Training monitor: peak FLOP/s lookup, MFU, memory, throughput, TensorBoard events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.model import ModelConfig, model_flops_per_token
from pipeline.training.monitor import (
    PEAK_FLOPS,
    RateMeter,
    TensorBoardLog,
    _proc_status_mib,
    device_peak_flops,
    lookup_peak_flops,
    memory_stats,
    mfu,
)


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # what torch calls the SXM part
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
    ],
)
def test_bf16_peak_by_gpu_name_most_specific_first(name: str, peak: float) -> None:
    value, text = lookup_peak_flops(name, "bf16")
    assert value == peak
    assert text == f"{name}, bf16 dense {peak / 1e12:g} TFLOP/s"


def test_precision_selects_the_column_and_gaps_are_none() -> None:
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", "auto")[0] == 989e12
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3", "tf32")[0] == 494e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 19.5e12
    assert lookup_peak_flops("Tesla V100-SXM2-16GB", "fp16")[0] == 125e12
    # Volta has no bf16 tensor cores: no number rather than a wrong one.
    value, text = lookup_peak_flops("Tesla V100-SXM2-16GB", "bf16")
    assert value is None and "train.peak_tflops" in text
    # Whole words only: an A10G is not an A10, an unknown GPU is not guessed.
    assert lookup_peak_flops("NVIDIA A10G", "bf16")[0] is None
    assert lookup_peak_flops("Some Future GPU", "bf16")[0] is None
    with pytest.raises(ValueError, match="precision"):
        lookup_peak_flops("NVIDIA H100 PCIe", "int8")


def test_every_table_entry_has_a_half_precision_peak_at_least_its_fp32() -> None:
    for name, row in PEAK_FLOPS.items():
        assert row["fp16"] >= row["fp32"] > 0, name


def test_cpu_has_no_peak_unless_overridden() -> None:
    assert device_peak_flops(torch.device("cpu"), "fp32") == (None, "cpu: no peak FLOP/s table, MFU not reported; set train.peak_tflops")
    peak, text = device_peak_flops(torch.device("cpu"), "fp32", override_tflops=1.5)
    assert peak == 1.5e12 and "1.5 TFLOP/s" in text and "train.peak_tflops" in text


@pytest.mark.gpu
def test_cuda_peak_names_the_device() -> None:
    device = torch.device("cuda")
    peak, text = device_peak_flops(device, "bf16")
    assert text.startswith(torch.cuda.get_device_name(device))
    assert device_peak_flops(device, "bf16", override_tflops=100)[0] == 100e12
    if peak is not None:
        assert peak > 1e13


def test_mfu_is_achieved_over_peak() -> None:
    cfg = ModelConfig(preset="124m").resolved(vocab_size=32000)
    per_token = model_flops_per_token(cfg, 1024)
    # 100k tokens/s on a 989 TFLOP/s part.
    value = mfu(100_000, per_token, 989e12)
    assert value == pytest.approx(100_000 * per_token / 989e12)
    assert 0.05 < value < 0.2
    assert mfu(100_000, per_token, None) is None
    assert mfu(100_000, per_token, 0.0) is None


def test_cpu_memory_follows_a_large_allocation() -> None:
    before = memory_stats(torch.device("cpu"))
    assert set(before) == {"rss_mib", "peak_mib"}
    assert 0 < before["rss_mib"] <= before["peak_mib"]
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
    after = memory_stats(torch.device("cpu"))
    assert after["rss_mib"] - before["rss_mib"] > 48
    assert after["peak_mib"] >= after["rss_mib"]
    del block


def test_proc_status_parsing() -> None:
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t3\n"
    assert _proc_status_mib(text) == {"rss_mib": 100.0, "peak_mib": 200.0}
    with pytest.raises(KeyError):
        _proc_status_mib("Name:\tpython\n")


@pytest.mark.gpu
def test_cuda_memory_counts_an_allocation() -> None:
    device = torch.device("cuda")
    before = memory_stats(device)
    block = torch.ones(16 * 1024 * 1024 // 4, device=device)
    after = memory_stats(device)
    assert after["allocated_mib"] - before["allocated_mib"] == pytest.approx(16, abs=1)
    assert after["reserved_mib"] >= after["allocated_mib"] and after["peak_mib"] >= after["allocated_mib"]
    del block


def test_rate_meter_over_injected_times() -> None:
    meter = RateMeter(now=100.0)
    meter.add(4096)
    meter.add(4096)
    assert meter.rate(now=102.0) == 4096.0
    # A new interval starts at each reading.
    meter.add(1000)
    assert meter.rate(now=102.5) == 2000.0
    # No time passed: nothing to report, and the tokens carry into the next interval.
    meter.add(300)
    assert meter.rate(now=102.5) == 0.0
    meter.add(700)
    assert meter.rate(now=103.5) == 1000.0
    # A pause the caller leaves out (evaluation, checkpointing).
    meter.add(50)
    meter.restart(now=200.0)
    meter.add(600)
    assert meter.rate(now=201.0) == 600.0
    assert meter.total_tokens == 4096 * 2 + 1000 + 300 + 700 + 50 + 600


def test_tensorboard_events_read_back_exactly(tmp_path: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = TensorBoardLog(tmp_path / "tb")
    # Values exact in float32, the precision event files store scalars in.
    log.scalars(10, {"train/loss": 5.5, "train/lr": 0.00048828125})
    log.scalars(20, {"train/loss": 4.25, "train/lr": 0.0009765625})
    log.scalars(20, {"val/loss": 4.5})
    log.text("run/config", "model = 124m", step=0)
    log.flush()
    log.close()
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "val/loss"}
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 5.5), (20, 4.25)]
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(10, 0.00048828125), (20, 0.0009765625)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(20, 4.5)]
    (text,) = events.Tensors("run/config/text_summary")
    assert text.step == 0 and text.tensor_proto.string_val == [b"model = 124m"]


def test_importing_monitor_does_not_load_tensorboard() -> None:
    code = "import sys, pipeline.training.monitor; print(sorted(m for m in sys.modules if 'tensorboard' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
