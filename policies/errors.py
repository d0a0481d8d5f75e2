"""Errors of access decisions."""

from __future__ import annotations

from keys.errors import ApplianceError


class PolicyError(ApplianceError):
    """An action was refused by the access policy."""
