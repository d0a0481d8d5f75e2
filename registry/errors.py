"""Errors of the ledger and the artifact store."""

from __future__ import annotations

from keys.errors import ApplianceError


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


class AuditQueryError(ApplianceError):
    """A value given to a canned audit query is not what it must be (a digest, a date, plain text)."""


class BundleError(ApplianceError):
    """An export bundle cannot be written, or does not verify (a file, a signature, the provenance, the ledger excerpt)."""
