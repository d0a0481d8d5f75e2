"""RBAC: roles, permissions and rules; for now the owner policy."""

from policies.decision import ACTIONS, Decision, OwnerPolicy

__all__ = ["ACTIONS", "Decision", "OwnerPolicy"]
