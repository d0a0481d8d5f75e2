"""Errors of access decisions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from keys.errors import ApplianceError

if TYPE_CHECKING:
    from policies.policy import PolicyProblem


class PolicyError(ApplianceError):
    """An action was refused by the access policy."""


class PolicyFileError(PolicyError):
    """A policy file is not valid; ``problems`` holds every problem found, each naming its key and line."""

    def __init__(self, message: str, hint: str = "", problems: Sequence[PolicyProblem] = ()) -> None:
        super().__init__(message, hint)
        self.problems = tuple(problems)


class PolicySignatureError(PolicyError):
    """A policy file is unsigned, its signature is malformed or forged, or it was not signed by a root key."""


class ApprovalError(PolicyError):
    """A request under a two-person rule cannot be made, decided or used as asked (refused, 403)."""
