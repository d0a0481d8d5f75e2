"""Errors of the pipeline's stages: configuration, input data, shards, training."""

from __future__ import annotations

from dataclasses import dataclass

from keys.errors import ApplianceError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: the dotted key, what is wrong (naming the value), what works."""

    key: str
    message: str
    fix: str

    def text(self) -> str:
        """The message with the full dotted key in front: "train.lr is inf, not a finite number"."""
        short = self.key.rsplit(".", 1)[-1]
        if self.key and self.message.startswith(short) and not self.message.startswith(self.key):
            return self.key + self.message[len(short) :]
        if self.message.startswith(("is ", "must ")):
            return f"{self.key} {self.message}"
        return self.message if not self.key or self.key in self.message else f"{self.key}: {self.message}"

    def line(self) -> str:
        return f"{self.text()}; {self.fix}" if self.fix else self.text()


class ConfigError(ApplianceError):
    """A recipe or stage configuration is invalid (unknown key, wrong type, bad value).

    ``problems`` lists every problem found, when the whole recipe was checked at once.
    """

    def __init__(self, message: str, hint: str = "", problems: list[Problem] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = list(problems or [])

    @classmethod
    def of(cls, source: str, problems: list[Problem]) -> ConfigError:
        """One error for all of ``problems`` in the file (or table) ``source``."""
        if not problems:
            return cls(f"{source}: the configuration is not valid", "check it against the documented settings")
        if len(problems) == 1:
            return cls(f"{source}: {problems[0].text()}", problems[0].fix, problems)
        lines = "\n".join(f"  - {p.line()}" for p in problems)
        return cls(f"{source}: {len(problems)} problems:\n{lines}", f"fix each value named above in {source}, then start the run again", problems)


class DataError(ApplianceError):
    """Input data cannot be used (bad encoding, binary file, malformed line, no files)."""


class ClusterError(DataError):
    """The cluster named to run a data stage's batches (``[cluster]``) cannot be used:
    not reachable, Ray not installed, or a worker lost."""


class ShardIntegrityError(DataError):
    """A token shard does not match the digest in its manifest or has a bad header."""


class TrainingError(ApplianceError):
    """Training or evaluation cannot proceed (bad checkpoint, diverged loss, bad config)."""
