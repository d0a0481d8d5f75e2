"""Access decisions: who may do what to which subject.

Until role-based policies land, the appliance runs under the owner policy: the identity
that initialised the home may do everything and nobody else may do anything. Every
decision, allowed or denied, is recorded by the service before it acts.
"""

from __future__ import annotations

from dataclasses import dataclass

# The actions the service knows; a policy deciding on anything else is a programming error.
ACTIONS = frozenset(
    {
        "service.info",
        "run.start",
        "run.resume",
        "run.cancel",
        "run.list",
        "run.show",
        "artifact.list",
        "artifact.verify",
        "model.export",
        "model.generate",
        "ledger.verify",
        "ledger.query",
        "ledger.head",
        "ledger.export",
        "keys.list",
        "policy.show",
        "policy.update",
        "keys.rotate",
        "keys.revoke",
        "approvals.list",
        "approvals.decide",
        "model.promote",
        "model.import",
        "data.card",
        "data.dropped",
        "data.skipped",
    }
)


@dataclass(frozen=True)
class Decision:
    """The outcome of one authorization check, as recorded in the ledger."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class OwnerPolicy:
    """Only the owner recorded when the home was initialised may act."""

    owner: str

    def decide(self, identity: str, action: str, subject: str) -> Decision:
        """Decide whether ``identity`` may perform ``action`` on ``subject``."""
        if action not in ACTIONS:
            return Decision(False, f"unknown action '{action}'")
        if identity == self.owner:
            return Decision(True, f"'{identity}' owns this appliance home")
        return Decision(False, f"'{identity}' is not the owner ('{self.owner}') and no role grants '{action}'")
