"""What the training loop reports besides the loss: throughput, MFU, memory, TensorBoard events.

MFU (model FLOPs utilisation, PaLM appendix B) is the model's useful FLOP/s, from
``pipeline.model.model_flops_per_token`` × tokens/s, divided by the device's dense peak. The
peak comes from ``PEAK_FLOPS`` by GPU name, or from ``train.peak_tflops`` where the table has
no entry (CPUs, unlisted GPUs).
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

MIB = 1024 * 1024

# Dense (no 2:4 sparsity) peak FLOP/s per GPU, keyed by a part of torch.cuda.get_device_name()
# that must stand as whole words ("A10" does not match "A100" or "A10G", "L4" not "L40S"); the
# longest matching key wins, so "H100 PCIe" beats "H100". bf16/fp16 and tf32 are tensor-core figures, fp32 is the non-tensor-core
# one. Vendor datasheets halve the figures they print "with sparsity"; the numbers here are
# the dense ones: NVIDIA H100 datasheet (SXM5 / PCIe / NVL columns), H200 datasheet (SXM /
# NVL), A100 datasheet (SXM4 and PCIe are equal for these), A10, L4, L40 and L40S datasheets, the Ada
# Lovelace architecture whitepaper (RTX 4090: fp16/bf16 with fp32 accumulate), and the V100
# datasheet (SXM2; Volta has no bf16 or tf32 tensor cores).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # torch names the SXM part "NVIDIA H100 80GB HBM3", so bare "H100" stands for SXM.
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    # Grace Hopper ("NVIDIA GH200 480GB"): its GPU computes as an H100/H200 SXM (GH200 datasheet).
    "GH200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
}
PRECISIONS = ("auto", "bf16", "fp16", "tf32", "fp32")


def _names(key: str, device_name: str) -> bool:
    return re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower()) is not None


def lookup_peak_flops(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s, description) for a GPU name as torch reports it; None where not in the table."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    precision = "bf16" if precision == "auto" else precision
    matches = sorted((key for key in PEAK_FLOPS if _names(key, device_name)), key=len, reverse=True)
    if not matches:
        return None, f"{device_name}: not in the peak FLOP/s table, MFU not reported; set train.peak_tflops"
    peak = PEAK_FLOPS[matches[0]].get(precision)
    if peak is None:
        return None, f"{device_name}: no {precision} peak in the table, MFU not reported; set train.peak_tflops"
    kind = "dense" if precision in ("bf16", "fp16", "tf32") else "non-tensor-core"
    return peak, f"{device_name}, {precision} {kind} {peak / 1e12:g} TFLOP/s"


def device_peak_flops(device: torch.device, precision: str, override_tflops: float = 0) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, a human description); None where MFU cannot be reported.

    ``precision``: "bf16"/"fp16" (autocast), "tf32" (fp32 weights with TF32 matmuls), "fp32",
    or "auto" (bf16 on CUDA, the trainer's default). ``override_tflops`` > 0 (the recipe's
    ``train.peak_tflops``) wins over the table.
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if override_tflops > 0:
        return override_tflops * 1e12, f"{name}, {override_tflops:g} TFLOP/s from train.peak_tflops"
    if device.type != "cuda":
        return None, f"{name}: no peak FLOP/s table, MFU not reported; set train.peak_tflops"
    return lookup_peak_flops(name, precision)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (more if the peak is understated); None without a peak."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak


def _proc_status_mib(text: str) -> dict[str, float]:
    # /proc/self/status reports sizes as "VmRSS:\t  123456 kB".
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) * 1024 / MIB
    return {"rss_mib": fields["VmRSS"], "peak_mib": fields["VmHWM"]}


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory in MiB. CUDA: allocated_mib, reserved_mib (held by torch's caching allocator) and
    peak_mib (highest allocated since start or the last reset). Elsewhere: this process's
    rss_mib and peak_mib (its high-water resident set)."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "allocated_mib": torch.cuda.memory_allocated(device) / MIB,
            "reserved_mib": torch.cuda.memory_reserved(device) / MIB,
            "peak_mib": torch.cuda.max_memory_allocated(device) / MIB,
        }
    try:
        return _proc_status_mib(Path("/proc/self/status").read_text(encoding="utf-8"))
    except (OSError, KeyError, ValueError, IndexError):
        # No procfs (macOS) or an unexpected format: only the peak is available, in bytes on
        # macOS and KiB elsewhere.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mib": peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB}


class RateMeter:
    """Tokens per second over the interval since the previous reading.

    Times are passed in (``time.perf_counter()`` in the loop), so the meter is exact to test and
    the caller decides what an interval covers, e.g. excluding evaluation and checkpointing.
    """

    def __init__(self, now: float) -> None:
        self._since = now
        self._tokens = 0
        self.total_tokens = 0

    def add(self, tokens: int) -> None:
        """Count tokens processed since the last reading."""
        self._tokens += tokens
        self.total_tokens += tokens

    def rate(self, now: float) -> float:
        """Tokens/s since the previous ``rate`` call (or construction), and start a new interval.
        A zero-length interval returns 0.0 and keeps counting into the next."""
        elapsed = now - self._since
        if elapsed <= 0:
            return 0.0
        value = self._tokens / elapsed
        self._since, self._tokens = now, 0
        return value

    def restart(self, now: float) -> None:
        """Drop the open interval (after a pause the loop does not want counted)."""
        self._since, self._tokens = now, 0


class TensorBoardLog:
    """TensorBoard event files in ``directory``: scalars as "train/loss", "val/loss", …, and text."""

    def __init__(self, directory: Path) -> None:
        # Imported here so that the loop, and anything importing this module, does not load
        # tensorboard (and its protobuf stack) unless a run asks for event files.
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(directory)
        self._writer: Any = SummaryWriter(log_dir=str(self.directory))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
