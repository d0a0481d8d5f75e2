"""The error family every package raises.

It lives in `keys`, the lowest floor, so that every package can derive from it without
importing upwards. Each error says what happened and what to do; only the CLI's top level
turns one into an exit code and a short message.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose.

    ``message`` says what happened (naming the file, key or artifact); ``hint`` says what
    the user should do about it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def diagnostics(self) -> str:
        """The message and the fix, as shown to a person."""
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(ApplianceError):
    """A recipe or stage configuration is invalid (unknown key, wrong type, bad value)."""


class KeyStoreError(ApplianceError):
    """A key could not be created, unlocked or used (wrong passphrase, missing key file)."""


class SigningError(ApplianceError):
    """A signature could not be made or did not verify."""


class LedgerError(ApplianceError):
    """The provenance ledger could not be read or written, or a query was refused."""


class LedgerIntegrityError(LedgerError):
    """The ledger's hash chain, a signature or the signed head does not check out.

    ``seq`` is the first event that is broken (or missing).
    """

    def __init__(self, seq: int, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.seq = seq


class StoreError(ApplianceError):
    """An artifact in the content-addressed store is missing or does not match its digest."""


class DataError(ApplianceError):
    """Input data cannot be used (bad encoding, binary file, malformed line, no files)."""


class ShardIntegrityError(DataError):
    """A token shard does not match the digest in its manifest or has a bad header."""


class TrainingError(ApplianceError):
    """Training or evaluation cannot proceed (bad checkpoint, diverged loss, bad config)."""


class PolicyError(ApplianceError):
    """An action was refused by the access policy."""


class AirgapError(ApplianceError):
    """Something tried to reach the network or the environment is not air-gapped."""
