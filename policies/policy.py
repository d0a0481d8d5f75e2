"""Role-based access from a policy file signed by the root key.

A policy is a TOML file. Roles grant permissions; users and Unix groups are bound to roles;
``[everyone]`` grants permissions to every caller; two-person rules name permissions that
are used only after a second person approves::

    [policy]
    name = "default"
    version = 1                       # a positive integer; raise it with every change

    [roles.admin]
    description = "Everything"        # optional
    permissions = ["*"]               # "*" = every permission in PERMISSIONS

    [roles.auditor]
    permissions = ["ledger.query", "ledger.verify", "artifact.read", "run.read", "data.read", "keys.read"]

    [bindings.users]                  # Unix user name -> roles
    alice = ["admin"]

    [bindings.groups]                 # Unix group name (as the kernel reports it) -> roles
    appliance-ml = ["ml-engineer"]

    [everyone]                        # every caller, bound or not; "*" is refused here
    permissions = ["service.info"]

    [[two_person]]                    # one table per guarded permission
    permission = "model.export"
    approvers = ["release-manager", "admin"]

Who may approve: a person may approve a request under a two-person rule when they hold one
of the rule's approver roles *and* the permission ``approvals.decide`` (through any role).
Both locks are deliberate: the rule's roles say whose judgement counts for that permission
(a release manager does not judge purges), and withdrawing ``approvals.decide`` from a role
stops its holders approving anything without rewriting every rule. ``*`` holds
``approvals.decide``, but an admin approves a rule only where ``admin`` is listed. Nobody
approves their own request (the approvals code enforces that).

A policy is checked as a whole and every problem is reported at once, each naming its key
and line: unknown keys, permissions (with the closest known one) and roles; a version that
is not a positive integer; a two-person rule on a permission no role grants, with an
approver role lacking ``approvals.decide``, or with nobody bound to an approver role; a role
granting ``policy.update`` but not ``policy.read`` (its holders would change a policy they
cannot read, and could not see what their change escalates).

Signature (``<policy>.sig``, JSON)::

    {"format": "appliance-policy-signature/v1", "key_id": "<root key id>",
     "digest": "<sha256 hex of the policy file's bytes>", "signature": "<base64 DER ECDSA>"}

The signature covers ``b"appliance-policy/v1\\n" + digest`` (the digest as ASCII hex), so no
signature over anything else passes as a policy's, and it can be checked with openssl. It
must be by a key that the trust store holds as a root key and that is valid now: a policy
signed by a rotated-out root must be signed again. Refusing an older policy version (a
rollback) is for the service, as with trust store versions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from policies.errors import PolicyFileError

# What each permission lets its holder do; the keys are the vocabulary policies may use.
PERMISSION_HELP: dict[str, str] = {
    "service.info": "see the service's version and state",
    "data.ingest": "bring source files in as datasets",
    "data.read": "read dataset cards and what cleaning dropped or skipped",
    "data.purge": "purge data and what derives from it (cryptographic erase)",
    "run.start": "start runs from recipes",
    "run.cancel": "cancel running runs",
    "run.resume": "resume stopped runs",
    "run.read": "list runs and see their stages, metrics and events",
    "model.export": "export a signed model bundle for another site",
    "model.import": "import a signed model bundle from another site",
    "model.promote": "promote a model (e.g. a fine-tune past its gate)",
    "model.use": "generate text with a model",
    "keys.read": "list the trusted keys",
    "keys.manage": "add keys to the trust store",
    "keys.rotate": "rotate the node or release key",
    "keys.revoke": "revoke a key",
    "policy.read": "read the access policy",
    "policy.update": "install a new access policy",
    "ledger.query": "run read-only SQL on the ledger",
    "ledger.verify": "verify the ledger's chain and signed head",
    "artifact.read": "list and verify stored artifacts",
    "approvals.decide": "approve or refuse requests under two-person rules",
    "approvals.read": "see one's own requests and those one may decide",
}
PERMISSIONS: frozenset[str] = frozenset(PERMISSION_HELP)

# Every service action -> the permission it needs. An action missing here is denied.
ACTION_PERMISSION: dict[str, str] = {
    "service.info": "service.info",
    "run.start": "run.start",
    "run.resume": "run.resume",
    "run.cancel": "run.cancel",
    "run.list": "run.read",
    "run.show": "run.read",
    "artifact.list": "artifact.read",
    "artifact.verify": "artifact.read",
    "model.export": "model.export",
    "model.generate": "model.use",
    "ledger.verify": "ledger.verify",
    "ledger.query": "ledger.query",
    "ledger.head": "ledger.verify",
    # A copy holds every row `SELECT * FROM events` would show: reading, as a query does.
    "ledger.export": "ledger.query",
    "keys.list": "keys.read",
    "data.card": "data.read",
    "data.dropped": "data.read",
    "data.skipped": "data.read",
    "policy.show": "policy.read",
    "policy.update": "policy.update",
    "approvals.list": "approvals.read",
    # Seeing what a purge would reach, and reading purges' certificates, is reading artifacts.
    "purge.impact": "artifact.read",
    "purge.list": "artifact.read",
    "purge.show": "artifact.read",
    # Actions that are their own permission, for the service to add as it grows them.
    **{p: p for p in ("data.ingest", "data.purge", "model.import", "model.promote", "keys.manage", "keys.rotate", "keys.revoke", "approvals.decide")},
}

EVERYONE = "everyone"
MAX_VERSION = 10**9
ALL = "*"
APPROVE = "approvals.decide"
_ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOP_KEYS = ("policy", "roles", "bindings", "everyone", "two_person")


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy file: its dotted key, what is wrong, the fix, the line (if found)."""

    key: str
    message: str
    fix: str = ""
    line: int | None = None

    def text(self, source: str) -> str:
        """``source:line: key: message; fix``, the way compilers print, so editors can jump to it."""
        where = f"{source}:{self.line}" if self.line else source
        what = f"{self.key}: {self.message}" if self.key else self.message
        return f"{where}: {what}" + (f"; {self.fix}" if self.fix else "")


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The outcome of one authorization check under a policy, as recorded in the ledger."""

    allowed: bool
    reason: str  # a sentence for people
    rule: str  # what decided, e.g. "role ml-engineer grants run.start (user bob)"
    permission: str
    roles: tuple[str, ...]  # the caller's roles (EVERYONE last)
    would_allow: tuple[str, ...]  # roles that grant the permission: whom to ask for
    needs_approval: bool  # the permission is under a two-person rule


@dataclass(frozen=True, slots=True)
class TwoPersonRule:
    """``permission`` is used only after a holder of an ``approvers`` role (and approvals.decide), not the requester, approves."""

    permission: str
    approvers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    permissions: tuple[str, ...]  # as written, "*" kept
    description: str = ""

    @property
    def grants(self) -> frozenset[str]:
        """The permissions this role grants, "*" expanded."""
        return PERMISSIONS if ALL in self.permissions else frozenset(self.permissions)


@dataclass(frozen=True, eq=False)
class Policy:
    """A parsed, checked policy. Build it with parse_policy (or read_policy, which verifies the signature first)."""

    name: str
    version: int
    digest: str  # sha256 hex of the file's bytes
    roles: Mapping[str, Role]
    users: Mapping[str, tuple[str, ...]]
    groups: Mapping[str, tuple[str, ...]]
    everyone: frozenset[str]
    rules: Mapping[str, TwoPersonRule]

    def _held(self, user: str, groups: Sequence[str]) -> dict[str, str]:
        """Role -> how the caller holds it ("user bob" / "group appliance-ml"), direct bindings first."""
        if isinstance(groups, str):
            raise TypeError("groups is a sequence of group names, not one string")
        held: dict[str, str] = {}
        for role in self.users.get(user, ()):
            held.setdefault(role, f"user {user}")
        for group in groups:
            for role in self.groups.get(group, ()):
                held.setdefault(role, f"group {group}")
        return held

    def roles_of(self, user: str, groups: Sequence[str]) -> tuple[str, ...]:
        """The caller's roles, sorted, with EVERYONE last."""
        return (*sorted(self._held(user, groups)), EVERYONE)

    def permissions_of(self, user: str, groups: Sequence[str]) -> frozenset[str]:
        """Every permission the caller holds, through roles or [everyone]."""
        out = set(self.everyone)
        for role in self._held(user, groups):
            out |= self.roles[role].grants
        return frozenset(out)

    def granting(self, permission: str) -> tuple[str, ...]:
        """The roles that grant ``permission``: those naming it (sorted), then those granting "*"."""
        named = sorted(r.name for r in self.roles.values() if permission in r.permissions)
        return (*named, *sorted(r.name for r in self.roles.values() if ALL in r.permissions and r.name not in named))

    def decide(self, user: str, groups: Sequence[str], action: str, subject: str) -> PolicyDecision:
        """Whether ``user`` (in ``groups``, as the kernel reports them) may do ``action`` to ``subject``, and why."""
        held = self._held(user, groups)
        roles = (*sorted(held), EVERYONE)
        permission = ACTION_PERMISSION.get(action)
        if permission is None:
            reason = f"{action!r} is not an action this appliance knows, so no policy allows it"
            return PolicyDecision(False, reason, f"unknown action {action}", "", roles, (), False)
        rule = self.rules.get(permission)
        would = self.granting(permission)
        target = f" {subject}" if subject else ""
        approval = f"; it needs a second person's approval (approvers: {', '.join(rule.approvers)})" if rule else ""
        mine = [r for r in sorted(held) if permission in self.roles[r].grants]
        if mine:
            # A role naming the permission says more than one granting "*".
            role = next((r for r in mine if permission in self.roles[r].permissions), mine[0])
            via = "" if permission in self.roles[role].permissions else " through *"
            decided = f"role {role} grants {permission}{via} ({held[role]})"
            return PolicyDecision(True, f"{user} may {action}{target}: {decided}{approval}", decided, permission, roles, would, rule is not None)
        if permission in self.everyone:
            decided = f"everyone holds {permission}"
            return PolicyDecision(True, f"{user} may {action}{target}: {decided}{approval}", decided, permission, roles, would, rule is not None)
        decided = f"no role of {user} grants {permission}"
        ask = f"ask for role {' or '.join(would[:3])}" if would else f"no role of policy {self.name} v{self.version} grants it"
        mine_text = ", ".join(sorted(held)) or "none"
        reason = f"{user} may not {action}{target}: none of their roles ({mine_text}) grants {permission}; {ask}"
        return PolicyDecision(False, reason, decided, permission, roles, would, rule is not None)

    def two_person(self, permission: str) -> TwoPersonRule | None:
        """The two-person rule on ``permission``, if there is one."""
        return self.rules.get(permission)

    def may_approve(self, user: str, groups: Sequence[str], permission: str) -> bool:
        """Whether the caller may approve requests for ``permission``: one of its rule's approver roles and approvals.decide."""
        rule = self.rules.get(permission)
        if rule is None:
            return False
        held = self._held(user, groups)
        return APPROVE in self.permissions_of(user, groups) and any(r in held for r in rule.approvers)

    def table(self) -> list[tuple[str, list[str]]]:
        """Role -> sorted permissions ("*" expanded) in file order, then EVERYONE."""
        return [(r.name, sorted(r.grants)) for r in self.roles.values()] + [(EVERYONE, sorted(self.everyone))]

    def escalations(self, new: Policy, user: str, groups: Sequence[str]) -> list[str]:
        """What ``new`` would give the caller that this (current) policy does not: an update by them granting these is self-escalation."""
        now, then = self.permissions_of(user, groups), new.permissions_of(user, groups)
        # A new role is an escalation only if it grants something not held now (taking a lesser role is not).
        held = self.roles_of(user, groups)
        out = [f"role {r}" for r in new.roles_of(user, groups) if r not in held and not new.roles[r].grants <= now]
        out += [f"permission {p}" for p in sorted(then - now)]
        for p in sorted(PERMISSIONS):
            if new.may_approve(user, groups, p) and not self.may_approve(user, groups, p):
                out.append(f"approver of {p}")
            if p in then and p in self.rules and p not in new.rules:
                out.append(f"{p} without a second person's approval")
        return out


# -- reading and checking ----------------------------------------------------------------

_KEY_PART = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)')
_HEADER = re.compile(r"\s*(\[\[|\[)([^\[\]]+)\]")


class _Lines:
    """Finds the line of a key or value: tomllib keeps no positions, so this reads the text (best effort)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[str, int]] = []
        arrays: dict[str, int] = {}
        for n, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m is None:
                continue
            path = ".".join(a or b or c for a, b, c in _KEY_PART.findall(m.group(2)))
            if m.group(1) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                path = f"{path}[{arrays[path]}]"
            self.headers.append((path, n))

    def _span(self, section: str) -> tuple[int, int, int | None] | None:
        """(first line, line after the last, header line) of ``section``'s table; "" is the top, before any header."""
        if not section:
            return 1, (self.headers[0][1] if self.headers else len(self.lines) + 1), None
        for i, (path, n) in enumerate(self.headers):
            if path == section or path.startswith(section + "."):
                return n, (self.headers[i + 1][1] if i + 1 < len(self.headers) else len(self.lines) + 1), n
        return None

    def find(self, section: str, key: str | None = None, value: str | None = None) -> int | None:
        """The line of ``key`` (and of ``value`` after it) in ``section``'s table, else the table's header line."""
        span = self._span(section)
        while span is None and "." in section:  # written as an inline table or dotted keys: its parent's header
            section = section.rsplit(".", 1)[0]
            span = self._span(section)
        if span is None:
            return None
        start, end, header = span
        if key is not None:
            pattern = re.compile(r"\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
            hit = next((n for n in range(start, end) if pattern.match(self.lines[n - 1])), None)
            if hit is not None and value is None:
                return hit
            start = hit or start
        if value is not None:
            quoted = (f'"{value}"', f"'{value}'")
            for n in range(start, end):
                line = self.lines[n - 1]
                if not line.lstrip().startswith("#") and any(q in line for q in quoted):
                    return n
        return header

    def header(self, path: str) -> int | None:
        return next((n for p, n in self.headers if p == path or p.startswith(path + ".")), None)


def _close(word: str, choices: Sequence[str] | frozenset[str]) -> str:
    hit = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


class _Check:
    """Collects every problem of one policy text."""

    def __init__(self, text: str) -> None:
        self.where = _Lines(text)
        self.problems: list[PolicyProblem] = []

    def bad(self, key: str, message: str, fix: str = "", value: str | None = None, *, at: tuple[str, str] | None = None) -> None:
        """Record a problem at ``key`` ("roles.x.permissions"): its line is found from the key's table and name, or ``at``."""
        section, name = at or (key.rsplit(".", 1) if "." in key else ("", key))
        self.problems.append(PolicyProblem(key, message, fix, self.where.find(section, name, value)))

    def table(self, value: object, key: str, allowed: Sequence[str] | None) -> dict[str, Any]:
        """``value`` as a table; with ``allowed``, other keys are reported. Not a table: reported, {}."""
        if not isinstance(value, dict):
            self.bad(key, f"must be a table, not {type(value).__name__}")
            return {}
        for name in value:
            if allowed is not None and name not in allowed:
                full = f"{key}.{name}" if key else name
                line = self.where.header(full) or self.where.find(key, name)
                fix = f"the keys of {'[' + key + ']' if key else 'a policy'} are: {', '.join(allowed)}"
                self.problems.append(PolicyProblem(full, f"is not a key a policy knows{_close(name, allowed)}", fix, line))
        return value

    def strings(self, value: object, key: str, at: tuple[str, str] | None = None) -> list[str]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        self.bad(key, f"must be a list of strings, not {value!r}", at=at)
        return []

    def permission(self, p: str, key: str, *, star: bool) -> bool:
        if p == ALL and not star:
            self.bad(key, '"*" is not allowed here', "name the permissions one by one", p)
        elif p not in PERMISSIONS and p != ALL:
            hint = _close(p, PERMISSIONS)
            self.bad(key, f"{p!r} is not a permission{hint}", "" if hint else "the permissions are: " + ", ".join(sorted(PERMISSIONS)), p)
        else:
            return True
        return False

    def role_ref(self, r: str, roles: Mapping[str, Role], key: str, at: tuple[str, str] | None = None) -> bool:
        if r == EVERYONE:
            self.bad(key, f"{EVERYONE!r} is not a role to name here: every caller holds it", "put such permissions under [everyone]", r, at=at)
        elif r not in roles:
            fix = f"define [roles.{r}] or name one of: {', '.join(roles) or 'no roles are defined'}"
            self.bad(key, f"role {r!r} is not defined{_close(r, list(roles))}", fix, r, at=at)
        else:
            return True
        return False


def _header(c: _Check, data: dict[str, Any]) -> tuple[str, int]:
    if "policy" not in data:
        c.bad("policy", "the [policy] table is missing", 'add [policy] with name = "…" and version = 1')
        return "", 0
    if not isinstance(data["policy"], dict):
        c.table(data["policy"], "policy", None)
        return "", 0
    t = c.table(data["policy"], "policy", ("name", "version", "description"))
    name, version = t.get("name"), t.get("version")
    if not isinstance(name, str) or not name.strip():
        c.bad("policy.name", f"must be a non-empty string, not {name!r}", 'write name = "default" (or your own)')
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        c.bad("policy.version", f"must be a positive integer, not {version!r}", "write version = 1 and raise it with every change")
    elif version > MAX_VERSION:
        # An update must be newer: a version at the top of the range would be the last policy ever installed.
        c.bad("policy.version", f"{version} is above {MAX_VERSION:_}", "raise the version by one with each change")
    return (name if isinstance(name, str) else ""), (version if isinstance(version, int) else 0)


def _roles(c: _Check, data: dict[str, Any]) -> dict[str, Role]:
    if "roles" not in data:
        c.bad("roles", "no roles are defined", "add at least one [roles.NAME] table with permissions = [...]")
        return {}
    out: dict[str, Role] = {}
    for name, body in c.table(data["roles"], "roles", None).items():
        key = f"roles.{name}"
        if name == EVERYONE or not _ROLE_NAME.fullmatch(name):
            why = "is reserved: every caller holds it; use [everyone]" if name == EVERYONE else "is not a role name (letters, digits, _ . -; up to 64)"
            c.bad(key, f"{name!r} {why}", at=(key, ""))
            continue
        t = c.table(body, key, ("permissions", "description"))
        if "permissions" not in t:
            c.bad(f"{key}.permissions", "is missing", "write permissions = [...] (an empty list grants nothing)")
        perms = c.strings(t.get("permissions", []), f"{key}.permissions")
        description = t.get("description", "")
        if not isinstance(description, str):
            c.bad(f"{key}.description", f"must be a string, not {description!r}")
        role = Role(name, tuple(p for p in perms if c.permission(p, f"{key}.permissions", star=True)), description if isinstance(description, str) else "")
        if "policy.update" in role.grants and "policy.read" not in role.grants:
            c.bad(f"{key}.permissions", "grants policy.update but not policy.read: its holders would change a policy they cannot read", "add policy.read")
        out[name] = role
    return out


def _bindings(c: _Check, data: dict[str, Any], roles: Mapping[str, Role]) -> list[dict[str, tuple[str, ...]]]:
    t = c.table(data.get("bindings", {}), "bindings", ("users", "groups"))
    found = []
    for kind in ("users", "groups"):
        bound: dict[str, tuple[str, ...]] = {}
        for who, names in c.table(t.get(kind, {}), f"bindings.{kind}", None).items():
            key, at = f"bindings.{kind}.{who}", (f"bindings.{kind}", who)  # a name may hold dots
            if not who:
                c.bad(key, f"an empty {kind[:-1]} name binds nobody", at=at)
            bound[who] = tuple(r for r in c.strings(names, key, at) if c.role_ref(r, roles, key, at))
        found.append(bound)
    return found


def _everyone(c: _Check, data: dict[str, Any]) -> frozenset[str]:
    t = c.table(data.get("everyone", {}), "everyone", ("permissions",))
    perms = c.strings(t.get("permissions", []), "everyone.permissions")
    return frozenset(p for p in perms if c.permission(p, "everyone.permissions", star=False))


def _rules(c: _Check, data: dict[str, Any], roles: Mapping[str, Role], bound: set[str], everyone: frozenset[str]) -> dict[str, TwoPersonRule]:
    listed = data.get("two_person", [])
    if not isinstance(listed, list):
        c.bad("two_person", "must be an array of tables: write each rule under [[two_person]]")
        return {}
    out: dict[str, TwoPersonRule] = {}
    for i, body in enumerate(listed):
        key = f"two_person[{i}]"
        if not isinstance(body, dict):
            c.table(body, key, None)
            continue
        t = c.table(body, key, ("permission", "approvers"))
        p = t.get("permission")
        if not isinstance(p, str):
            c.bad(f"{key}.permission", f"must name a permission, not {p!r}", 'write permission = "model.export" (say)')
            continue
        if not c.permission(p, f"{key}.permission", star=False):
            continue
        if p in out:
            c.bad(f"{key}.permission", f"{p} already has a two-person rule", "merge the rules' approvers into one")
            continue
        names = c.strings(t.get("approvers", []), f"{key}.approvers")
        if not names:
            c.bad(f"{key}.approvers", "names no role: nobody could approve", "list the roles whose holders may approve")
        approvers = tuple(r for r in names if c.role_ref(r, roles, f"{key}.approvers"))
        if not any(p in r.grants for r in roles.values()) and p not in everyone:
            c.bad(f"{key}.permission", f"no role grants {p}, so a two-person rule on it guards nothing", f"grant {p} to a role, or remove the rule")
        able = [r for r in approvers if APPROVE in roles[r].grants]
        for r in approvers:
            if r not in able:
                fix = f"add {APPROVE} to roles.{r}.permissions, or remove {r} from approvers"
                c.bad(f"{key}.approvers", f"role {r} does not hold {APPROVE}, so its holders can never approve", fix, r)
        if able and not bound & set(able):
            fix = "bind someone to one of them under [bindings.users] or [bindings.groups]"
            c.bad(f"{key}.approvers", f"nobody could approve {p}: no user or group is bound to {' or '.join(able)}", fix)
        out[p] = TwoPersonRule(p, approvers)
    return out


def _check(text: str) -> tuple[Policy | None, list[PolicyProblem]]:
    try:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        data = tomllib.loads(text)
    except UnicodeEncodeError:
        return None, [PolicyProblem("", "holds characters that cannot be written as UTF-8", "save the file as UTF-8")]
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        return None, [PolicyProblem("", f"is not valid TOML ({exc})", "fix the syntax there", int(m.group(1)) if m else None)]
    c = _Check(text)
    c.table(data, "", _TOP_KEYS)
    name, version = _header(c, data)
    roles = _roles(c, data)
    users, groups = _bindings(c, data, roles)
    everyone = _everyone(c, data)
    bound = {r for names in (*users.values(), *groups.values()) for r in names}
    rules = _rules(c, data, roles, bound, everyone)
    if c.problems:
        return None, sorted(c.problems, key=lambda p: (p.line or 0, p.key))
    frozen = MappingProxyType  # read-only views: a decision can never change the policy it runs under
    return Policy(name, version, digest, frozen(roles), frozen(users), frozen(groups), everyone, frozen(rules)), []


def policy_problems(text: str, *, source: str) -> list[str]:
    """Every problem of the policy ``text``, one line each (``source:line: key: what; fix``); [] when it is fine."""
    return [p.text(source) for p in _check(text)[1]]


def parse_policy(text: str, *, source: str) -> Policy:
    """The policy in ``text``; PolicyFileError listing every problem (in ``.problems`` too) if it has any.

    Pass the file's bytes decoded as UTF-8 (not read in text mode, which rewrites line ends),
    so that ``digest`` is that of the file.
    """
    policy, problems = _check(text)
    if policy is None:
        n = len(problems)
        lines = "\n".join("  " + p.text(source) for p in problems)
        raise PolicyFileError(f"the policy {source} has {n} problem{'s' if n != 1 else ''}:\n{lines}", "fix each of them and check the file again", problems)
    return policy


def default_policy(owner: str, *, two_person: bool = True) -> str:
    """The default policy's TOML text (policies/default_policy.toml) with ``owner`` bound to admin.

    ``two_person=False`` leaves out its ``[[two_person]]`` tables, for a home one person runs
    alone (`appliance init --single-operator`), where no second person could approve.
    """
    if not owner or not owner.isprintable() or owner != owner.strip():
        raise PolicyFileError(f"{owner!r} is not a user name to bind to admin", "pass the Unix user who owns the appliance home")
    try:
        template = resources.files("policies").joinpath("default_policy.toml").read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyFileError(f"the default policy is missing from this installation ({exc})", "reinstall the appliance from its wheel bundle") from None
    text = template.replace('"{owner}"', json.dumps(owner, ensure_ascii=False))
    if not two_person:
        text = _TWO_PERSON_TABLE.sub("", text)
        text += "\n# Single operator: no two-person rules ([[two_person]]); nothing here needs a second person's approval.\n"
    return text


_TWO_PERSON_TABLE = re.compile(r'\n\[\[two_person\]\]\npermission = "[^"\n]*"\napprovers = \[[^\]\n]*\]\n')


# -- comparing ---------------------------------------------------------------------------


def policy_diff(old: Policy, new: Policy) -> list[str]:
    """What changes from ``old`` to ``new``, one line each: "+" added, "-" removed, "~" changed."""
    out: list[str] = []
    for what, x, y in (("name", old.name, new.name), ("version", old.version, new.version)):
        if x != y:
            out.append(f"~ {what}: {x} → {y}")
    for name in sorted(old.roles.keys() | new.roles.keys()):
        was, now = old.roles.get(name), new.roles.get(name)
        if was is None and now is not None:
            out.append(f"+ role {name}: {', '.join(now.permissions) or 'no permissions'}")
        elif now is None:
            out.append(f"- role {name}")
        elif was is not None:
            changes = [f"+{p}" for p in sorted(set(now.permissions) - set(was.permissions))]
            changes += [f"-{p}" for p in sorted(set(was.permissions) - set(now.permissions))]
            if changes:
                out.append(f"~ role {name}: {', '.join(changes)}")
            if was.description != now.description:
                out.append(f"~ role {name} description: {was.description!r} → {now.description!r}")
    out += [f"+ everyone: {p}" for p in sorted(new.everyone - old.everyone)]
    out += [f"- everyone: {p}" for p in sorted(old.everyone - new.everyone)]
    for kind, a_map, b_map in (("user", old.users, new.users), ("group", old.groups, new.groups)):
        for who in sorted(a_map.keys() | b_map.keys()):
            before, after = set(a_map.get(who, ())), set(b_map.get(who, ()))
            out += [f"+ {kind} {who} → role {r}" for r in sorted(after - before)]
            out += [f"- {kind} {who} → role {r}" for r in sorted(before - after)]
    for p in sorted(old.rules.keys() | new.rules.keys()):
        was_rule, now_rule = old.rules.get(p), new.rules.get(p)
        if was_rule is None and now_rule is not None:
            out.append(f"+ two-person rule on {p} (approvers: {', '.join(now_rule.approvers)})")
        elif now_rule is None:
            out.append(f"- two-person rule on {p}")
        elif was_rule is not None and set(was_rule.approvers) != set(now_rule.approvers):
            out.append(f"~ two-person rule on {p}: approvers {', '.join(was_rule.approvers)} → {', '.join(now_rule.approvers)}")
    return out
