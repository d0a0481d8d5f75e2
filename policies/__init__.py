"""RBAC: roles, permissions, two-person rules, and the root-signed policy file."""

from policies.decision import ACTIONS, Decision, OwnerPolicy
from policies.policy import (
    ACTION_PERMISSION,
    EVERYONE,
    PERMISSIONS,
    Policy,
    PolicyDecision,
    PolicyProblem,
    TwoPersonRule,
    default_policy,
    parse_policy,
    policy_diff,
    policy_problems,
)
from policies.signature import read_policy, sign_policy, verify_policy

__all__ = [
    "ACTIONS",
    "ACTION_PERMISSION",
    "EVERYONE",
    "PERMISSIONS",
    "Decision",
    "OwnerPolicy",
    "Policy",
    "PolicyDecision",
    "PolicyProblem",
    "TwoPersonRule",
    "default_policy",
    "parse_policy",
    "policy_diff",
    "policy_problems",
    "read_policy",
    "sign_policy",
    "verify_policy",
]
