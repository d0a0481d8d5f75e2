"""Errors of the pipeline's stages: configuration, input data, shards, training."""

from __future__ import annotations

from keys.errors import ApplianceError


class ConfigError(ApplianceError):
    """A recipe or stage configuration is invalid (unknown key, wrong type, bad value)."""


class DataError(ApplianceError):
    """Input data cannot be used (bad encoding, binary file, malformed line, no files)."""


class ShardIntegrityError(DataError):
    """A token shard does not match the digest in its manifest or has a bad header."""


class TrainingError(ApplianceError):
    """Training or evaluation cannot proceed (bad checkpoint, diverged loss, bad config)."""
