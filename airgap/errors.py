"""Errors of the air gap."""

from __future__ import annotations

from keys.errors import ApplianceError


class AirgapError(ApplianceError):
    """Something tried to reach the network or the environment is not air-gapped."""
