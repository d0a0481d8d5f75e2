"""Pre-training: the public face of ``pipeline.training``.

``run_train`` (in ``training/loop.py``) is the loop; the pieces it is made of live beside it:
``config`` (the ``[train]`` and ``[distributed]`` tables), ``loader`` (memory-mapped tokens with
a resumable position), ``schedule`` (cosine / warmup-stable-decay), ``engine_native`` (one
process, DDP, FSDP2) and ``engine_deepspeed`` (ZeRO), ``checkpoint`` (atomic, verified,
re-shardable, with retention), ``monitor`` (MFU, memory, TensorBoard) and ``job`` (the child
process the service launches, alone or under torchrun).
"""

from __future__ import annotations

from pipeline.training.checkpoint import CKPT_DIR
from pipeline.training.config import DistConfig, TrainConfig
from pipeline.training.loop import LOGS, METRICS, TRAIN_CONFIG, run_train
from pipeline.training.schedule import lr_at

__all__ = ["CKPT_DIR", "LOGS", "METRICS", "TRAIN_CONFIG", "DistConfig", "TrainConfig", "lr_at", "run_train"]
