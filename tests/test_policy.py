"""Role-based access from a root-signed policy file: parsing, checking, deciding, signing, comparing."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.errors import ApplianceError
from keys.keystore import create_key
from keys.truststore import entry_for, new_store, read_store, write_store
from policies.decision import ACTIONS
from policies.errors import PolicyError, PolicyFileError, PolicySignatureError
from policies.policy import (
    ACTION_PERMISSION,
    EVERYONE,
    PERMISSIONS,
    Policy,
    default_policy,
    parse_policy,
    policy_diff,
    policy_problems,
)
from policies.signature import read_policy, sign_policy, verify_policy
from tests.conftest import PASSPHRASE

DEFAULT = default_policy("alice")
# bob is an ML engineer through his group; carol is bound to nothing.
BOB = ("bob", ["staff", "appliance-ml"])
CAROL = ("carol", ["staff"])


def _policy(text: str = DEFAULT) -> Policy:
    return parse_policy(text, source="policy.toml")


def _with(extra: str, text: str = DEFAULT) -> str:
    """The default policy with ``extra`` appended after its [bindings.groups] table."""
    return text.replace("[bindings.groups]\n", "[bindings.groups]\n" + extra + "\n")


ML = _with('appliance-ml = ["ml-engineer"]\nrelease = ["release-manager"]\nstewards = ["data-steward"]\naudit = ["auditor"]')


# -- the default policy ----------------------------------------------------------------


def test_the_default_policy_parses_and_binds_the_owner_to_admin() -> None:
    policy = _policy()
    assert (policy.name, policy.version) == ("default", 1)
    assert policy.roles_of("alice", []) == ("admin", EVERYONE)
    assert policy.roles_of("mallory", ["alice"]) == (EVERYONE,)  # a group named like the owner is not the owner
    assert re.fullmatch(r"[0-9a-f]{64}", policy.digest)
    assert DEFAULT.count("alice") == 1  # only the binding: the template's comments are left alone


def test_the_default_policy_table_role_by_permission() -> None:
    admin = sorted(PERMISSIONS)
    assert _policy().table() == [
        ("admin", admin),
        ("data-steward", ["approvals.decide", "artifact.read", "data.ingest", "data.purge", "data.read", "ledger.verify", "run.read", "run.start"]),
        ("ml-engineer", ["artifact.read", "data.read", "ledger.verify", "model.promote", "model.use", "run.cancel", "run.read", "run.resume", "run.start"]),
        ("release-manager", ["approvals.decide", "artifact.read", "ledger.verify", "model.export", "model.import", "model.promote", "model.use", "run.read"]),
        ("auditor", ["artifact.read", "data.read", "keys.read", "ledger.query", "ledger.verify", "policy.read", "run.read"]),
        (EVERYONE, ["approvals.read", "service.info"]),
    ]
    assert admin == [
        "approvals.decide",
        "approvals.read",
        "artifact.read",
        "data.ingest",
        "data.purge",
        "data.read",
        "keys.manage",
        "keys.read",
        "keys.revoke",
        "keys.rotate",
        "ledger.query",
        "ledger.verify",
        "model.export",
        "model.import",
        "model.promote",
        "model.use",
        "policy.read",
        "policy.update",
        "run.cancel",
        "run.read",
        "run.resume",
        "run.start",
        "service.info",
    ]
    rules = {p: r.approvers for p, r in _policy().rules.items()}
    assert rules == {
        "model.export": ("release-manager", "admin"),
        "data.purge": ("data-steward", "admin"),
        "keys.rotate": ("admin",),
        "keys.revoke": ("admin",),
        "policy.update": ("admin",),
    }


def test_an_owner_name_needing_escapes_stays_one_user() -> None:
    policy = _policy(default_policy('o"dd\\name'))
    assert policy.roles_of('o"dd\\name', []) == ("admin", EVERYONE)
    for bad in ("", " alice", "al\nice"):
        with pytest.raises(PolicyFileError, match="is not a user name"):
            default_policy(bad)


def test_every_service_action_needs_a_known_permission() -> None:
    assert ACTIONS | {"policy.show", "policy.update"} <= ACTION_PERMISSION.keys()
    assert set(ACTION_PERMISSION.values()) <= PERMISSIONS
    assert {
        "data.ingest", "data.read", "data.purge", "run.start", "run.cancel", "run.resume", "run.read", "model.export", "model.import", "model.promote",
        "model.use", "keys.read", "keys.manage", "keys.rotate", "keys.revoke", "policy.read", "policy.update", "ledger.query", "ledger.verify",
        "artifact.read", "approvals.decide", "service.info",
    } <= PERMISSIONS  # fmt: skip
    assert ACTION_PERMISSION["run.show"] == ACTION_PERMISSION["run.list"] == "run.read"
    assert {ACTION_PERMISSION[a] for a in ("data.card", "data.dropped", "data.skipped")} == {"data.read"}
    assert (ACTION_PERMISSION["ledger.head"], ACTION_PERMISSION["keys.list"], ACTION_PERMISSION["model.generate"]) == (
        "ledger.verify",
        "keys.read",
        "model.use",
    )


# -- deciding --------------------------------------------------------------------------


def test_a_user_bound_directly_is_allowed_naming_the_role_and_binding() -> None:
    d = _policy().decide("alice", [], "keys.list", "")
    assert d.allowed and d.permission == "keys.read" and d.roles == ("admin", EVERYONE)
    assert d.rule == "role admin grants keys.read through * (user alice)"


def test_a_user_in_a_bound_group_is_allowed_and_the_rule_names_the_group() -> None:
    d = _policy(ML).decide(*BOB, "run.start", "recipe.toml")
    assert d.allowed and not d.needs_approval
    assert d.rule == "role ml-engineer grants run.start (group appliance-ml)"
    assert d.roles == ("ml-engineer", EVERYONE)
    assert "bob may run.start recipe.toml" in d.reason


def test_everyone_holds_service_info_and_nothing_else() -> None:
    policy = _policy()
    d = policy.decide(*CAROL, "service.info", "")
    assert d.allowed and d.rule == "everyone holds service.info" and d.roles == (EVERYONE,)
    assert not policy.decide(*CAROL, "run.list", "").allowed


def test_a_denial_names_the_roles_to_ask_for() -> None:
    d = _policy(ML).decide(*BOB, "model.export", "model-1")
    assert not d.allowed and d.needs_approval
    assert d.rule == "no role of bob grants model.export"
    assert d.would_allow == ("release-manager", "admin")  # the roles naming it first, "*" last
    assert "ask for role release-manager or admin" in d.reason and "(ml-engineer)" in d.reason


def test_an_allowed_two_person_permission_says_it_needs_approval() -> None:
    d = _policy(ML).decide("dora", ["release"], "model.export", "model-1")
    assert d.allowed and d.needs_approval
    assert "second person's approval (approvers: release-manager, admin)" in d.reason


def test_an_unknown_action_is_denied_with_a_reason() -> None:
    d = _policy().decide("alice", [], "model.delete", "x")
    assert not d.allowed and d.permission == "" and d.would_allow == ()
    assert "'model.delete' is not an action this appliance knows" in d.reason


def test_groups_must_be_a_sequence_of_names() -> None:
    with pytest.raises(TypeError):
        _policy().decide("bob", "appliance-ml", "run.start", "")


def test_who_may_approve_needs_an_approver_role_and_approvals_decide() -> None:
    policy = _policy(ML)
    assert policy.may_approve("dora", ["release"], "model.export")
    assert not policy.may_approve(*BOB, "model.export")  # no approver role
    assert not policy.may_approve("dora", ["release"], "data.purge")  # approvals.decide, but not a purge approver
    assert policy.may_approve("sam", ["stewards"], "data.purge")
    assert policy.may_approve("alice", [], "keys.rotate")
    assert not policy.may_approve("alice", [], "run.start")  # no rule, nothing to approve
    assert policy.two_person("run.start") is None and policy.two_person("data.purge") is not None


# -- checking --------------------------------------------------------------------------

PLANTED = """\
[policy]
name = "planted"
version = 1
colour = "blue"

[roles.admin]
permissions = ["*"]

[roles.ops]
permissions = ["ledger.quer", "run.start", "approvals.decide"]

[roles.idle]
permissions = ["approvals.decide"]

[bindings.users]
alice = ["admin"]
bob = ["opz"]

[[two_person]]
permission = "run.start"
approvers = ["idle"]
"""


def test_every_planted_problem_is_reported_at_once_with_its_line() -> None:
    problems = policy_problems(PLANTED, source="planted.toml")
    assert problems == [
        "planted.toml:4: policy.colour: is not a key a policy knows; the keys of [policy] are: name, version, description",
        "planted.toml:10: roles.ops.permissions: 'ledger.quer' is not a permission (did you mean 'ledger.query'?)",
        "planted.toml:17: bindings.users.bob: role 'opz' is not defined (did you mean 'ops'?); define [roles.opz] or name one of: admin, ops, idle",
        "planted.toml:21: two_person[0].approvers: nobody could approve run.start: no user or group is bound to idle; "
        "bind someone to one of them under [bindings.users] or [bindings.groups]",
    ]
    with pytest.raises(PolicyFileError) as err:
        parse_policy(PLANTED, source="planted.toml")
    assert "has 4 problems" in err.value.message and all(p in err.value.message for p in problems)
    # The server sends each problem as a dict beside the message.
    assert [dataclasses.asdict(p)["key"] for p in err.value.problems] == [
        "policy.colour",
        "roles.ops.permissions",
        "bindings.users.bob",
        "two_person[0].approvers",
    ]
    assert isinstance(err.value, PolicyError) and err.value.hint


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace("version = 1", "version = 0"), "policy.version: must be a positive integer, not 0"),
        (lambda t: t.replace("version = 1", 'version = "1"'), "policy.version: must be a positive integer, not '1'"),
        (lambda t: t.replace("version = 1", "version = true"), "policy.version: must be a positive integer, not True"),
        (lambda t: t.replace("version = 1", "version = 1.5"), "policy.version: must be a positive integer, not 1.5"),
        (lambda t: t.replace("version = 1", "version = 9223372036854775807"), "policy.version: 9223372036854775807 is above 1_000_000_000"),
        (lambda t: t.replace('approvers = ["admin"]', 'approvers = ["admin", "auditor"]', 1), "role auditor does not hold approvals.decide"),
        (lambda t: t.replace('"alice" = ["admin"]', '"alice" = ["everyone"]'), "'everyone' is not a role to name here"),
        (lambda t: t.replace('permissions = ["service.info", "approvals.read"]', 'permissions = ["*"]'), 'everyone.permissions: "*" is not allowed here'),
        (
            lambda t: t.replace('"keys.read", "policy.read"]', '"keys.read", "policy.update"]'),
            "roles.auditor.permissions: grants policy.update but not policy.read",
        ),
        (lambda t: t.replace("[roles.auditor]", "[roles.everyone]"), "roles.everyone: 'everyone' is reserved"),
        (lambda t: t + '\n[[two_person]]\npermission = "model.export"\napprovers = ["admin"]\n', "model.export already has a two-person rule"),
        (lambda t: t + '\n[[two_person]]\npermission = "keys.manage"\napprovers = []\n', "two_person[5].approvers: names no role"),
        (lambda t: t.replace("[[two_person]]", "[[two_persons]]", 1), "two_persons: is not a key a policy knows (did you mean 'two_person'?)"),
        (lambda t: t.replace("[policy]", "[policy\n"), "is not valid TOML"),
        (lambda t: t.replace('"release-manager", "admin"]', '"release-manager", "admin", 3]'), "two_person[0].approvers: must be a list of strings"),
    ],
)
def test_each_kind_of_problem_is_reported(change: object, expected: str) -> None:
    problems = policy_problems(change(default_policy("alice")), source="p.toml")  # type: ignore[operator]
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "text",
    [
        "policy = 3\nroles = 3\nbindings = 3\neveryone = 3\ntwo_person = 3\n",
        "[policy]\nname = 1\n[roles]\nadmin = 3\n[bindings]\nusers = 3\ngroups = []\n[everyone]\npermissions = [1]\n",
        '[policy]\nname = "x"\nversion = 1\n[roles."a b"]\npermissions = "run.read"\n[bindings.users]\n"" = "admin"\n[[two_person]]\npermission = 3\n',
        "two_person = [1, {permission = '*', approvers = 'admin'}]\n[roles.r]\npermissions = []\ndescription = 3\n",
    ],
)
def test_a_policy_of_the_wrong_shapes_is_reported_not_crashed_on(text: str) -> None:
    problems = policy_problems(text, source="p.toml")
    assert len(problems) >= 3 and all(p.startswith("p.toml") for p in problems)


def test_a_two_person_rule_on_a_permission_nobody_holds_is_reported() -> None:
    text = (
        PLANTED.replace('colour = "blue"\n', "")
        .replace('["ledger.quer", ', '["ledger.query", ')
        .replace('bob = ["opz"]', 'bob = ["idle"]')
        .replace('"run.start"\napprovers', '"keys.rotate"\napprovers')
    )
    text = text.replace('permissions = ["*"]', 'permissions = ["run.read"]')
    assert policy_problems(text, source="p.toml") == [
        "p.toml:19: two_person[0].permission: no role grants keys.rotate, so a two-person rule on it guards nothing; grant keys.rotate to a role, or remove the rule"
    ]


# -- signatures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A real root-signed trust store holding a root key and a node key, read back through its anchor."""
    tmp = tmp_path_factory.mktemp("trust")
    root = create_key(tmp / "root.key", PASSPHRASE.encode())
    node = create_key(tmp / "node.key", PASSPHRASE.encode())
    write_store(tmp / "truststore.json", new_store(root, "alice").with_entry(entry_for(node, "node", "node")), root)
    return SimpleNamespace(root=root, node=node, store=read_store(tmp / "truststore.json", root.public_key))


def _signed(tmp_path: Path, trust: SimpleNamespace, text: str = DEFAULT) -> Path:
    path = tmp_path / "policy.toml"
    path.write_bytes(text.encode())
    (tmp_path / "policy.toml.sig").write_bytes(sign_policy(path.read_bytes(), trust.root))
    return path


def test_a_root_signed_policy_verifies_and_reads_back(tmp_path: Path, trust: SimpleNamespace) -> None:
    path = _signed(tmp_path, trust)
    verify_policy(path.read_bytes(), (tmp_path / "policy.toml.sig").read_bytes(), trust.store, source=str(path))
    policy = read_policy(path, trust.store)
    assert policy.roles_of("alice", []) == ("admin", EVERYONE)
    signature = json.loads((tmp_path / "policy.toml.sig").read_text())
    assert signature["key_id"] == trust.root.key_id and signature["digest"] == policy.digest


def test_a_tampered_policy_is_refused_naming_the_file(tmp_path: Path, trust: SimpleNamespace) -> None:
    path = _signed(tmp_path, trust)
    path.write_text(_with('appliance-ml = ["admin"]'))  # still a valid policy: only the signature catches it
    with pytest.raises(PolicySignatureError, match="was changed after it was signed") as err:
        read_policy(path, trust.store)
    assert str(path) in err.value.message


def test_an_unsigned_policy_is_refused(tmp_path: Path, trust: SimpleNamespace) -> None:
    path = _signed(tmp_path, trust)
    (tmp_path / "policy.toml.sig").unlink()
    with pytest.raises(PolicySignatureError, match=f"the policy {re.escape(str(path))} is unsigned"):
        read_policy(path, trust.store)


def test_a_policy_signed_by_a_node_key_is_refused_naming_the_key(tmp_path: Path, trust: SimpleNamespace) -> None:
    policy_bytes = DEFAULT.encode()
    signature = sign_policy(policy_bytes, trust.node)
    with pytest.raises(PolicySignatureError, match="not a root key of the trust store") as err:
        verify_policy(policy_bytes, signature, trust.store, source="policy.toml")
    assert trust.node.key_id[:16] in err.value.message and "(it is a node key)" in err.value.message


def test_a_node_signature_relabelled_as_the_roots_does_not_verify(trust: SimpleNamespace) -> None:
    policy_bytes = DEFAULT.encode()
    forged = json.loads(sign_policy(policy_bytes, trust.node))
    forged["key_id"] = trust.root.key_id
    with pytest.raises(PolicySignatureError, match="does not verify with root key"):
        verify_policy(policy_bytes, json.dumps(forged).encode(), trust.store, source="policy.toml")
    forged["signature"] = base64.b64encode(b"junk").decode()
    with pytest.raises(PolicySignatureError, match="does not verify"):
        verify_policy(policy_bytes, json.dumps(forged).encode(), trust.store, source="policy.toml")


@pytest.mark.parametrize(
    ("signature", "reason"), [(b"not json", "is not JSON"), (b'{"format": "other"}', "is not a policy signature"), (b"[]", "is not a policy signature")]
)
def test_a_malformed_signature_is_refused(trust: SimpleNamespace, signature: bytes, reason: str) -> None:
    with pytest.raises(PolicySignatureError, match=reason):
        verify_policy(DEFAULT.encode(), signature, trust.store, source="policy.toml")


def test_a_policy_with_problems_is_not_signed(trust: SimpleNamespace) -> None:
    with pytest.raises(PolicyFileError, match="the policy to sign has 4 problems"):
        sign_policy(PLANTED.encode(), trust.root)


def test_the_signature_is_domain_separated(trust: SimpleNamespace) -> None:
    """A root signature over the bare digest (what some other tool might sign) is not a policy signature."""
    policy_bytes = DEFAULT.encode()
    document = json.loads(sign_policy(policy_bytes, trust.root))
    document["signature"] = base64.b64encode(trust.root.sign(document["digest"].encode())).decode()
    with pytest.raises(PolicySignatureError, match="does not verify"):
        verify_policy(policy_bytes, json.dumps(document).encode(), trust.store, source="policy.toml")


# -- comparing -------------------------------------------------------------------------


def test_escalations_find_a_self_granted_role() -> None:
    current = _policy(ML)
    grabbed = _policy(ML.replace('appliance-ml = ["ml-engineer"]', 'appliance-ml = ["ml-engineer", "release-manager"]'))
    found = current.escalations(grabbed, *BOB)
    assert found[0] == "role release-manager"
    assert {"permission model.export", "permission model.import", "permission approvals.decide", "approver of model.export"} <= set(found)
    assert current.escalations(current, *BOB) == []
    assert grabbed.escalations(current, *BOB) == []  # giving up a role is no escalation


def test_dropping_a_two_person_rule_on_a_held_permission_is_an_escalation() -> None:
    current = _policy(ML)
    no_rule = _policy(ML.replace('[[two_person]]\npermission = "model.export"\napprovers = ["release-manager", "admin"]\n', ""))
    assert current.escalations(no_rule, "dora", ["release"]) == ["model.export without a second person's approval"]
    assert current.escalations(no_rule, *BOB) == []  # bob cannot export either way


def test_policy_diff_lists_what_changes() -> None:
    old = _policy(ML)
    text = (
        ML.replace("version = 1", "version = 2")
        .replace('"model.use", "model.promote", "ledger.verify"]', '"model.use", "ledger.verify", "model.export"]')
        .replace('\naudit = ["auditor"]\n', '\naudit = ["auditor"]\nops = ["admin"]\n', 1)
        .replace('\nappliance-ml = ["ml-engineer"]\n', "\n", 1)
        .replace('permission = "keys.revoke"\napprovers = ["admin"]', 'permission = "keys.revoke"\napprovers = ["admin", "release-manager"]')
        .replace('[[two_person]]\npermission = "data.purge"\napprovers = ["data-steward", "admin"]\n', "")
        .replace('permissions = ["service.info", "approvals.read"]', 'permissions = ["service.info", "approvals.read", "policy.read"]')
        + '\n[roles.operator]\npermissions = ["run.read"]\n'
    )
    new = _policy(text)
    assert policy_diff(old, new) == [
        "~ version: 1 → 2",
        "~ role ml-engineer: +model.export, -model.promote",
        "+ role operator: run.read",
        "+ everyone: policy.read",
        "- group appliance-ml → role ml-engineer",
        "+ group ops → role admin",
        "- two-person rule on data.purge",
        "~ two-person rule on keys.revoke: approvers admin → admin, release-manager",
    ]
    assert policy_diff(old, old) == []


# -- properties ------------------------------------------------------------------------

ROLE_NAMES = ["r0", "r1", "r2", "r3"]
perm_sets = st.lists(st.sampled_from(sorted(PERMISSIONS)), unique=True, max_size=6)


def _render(roles: dict[str, list[str]], users: dict[str, list[str]], groups: dict[str, list[str]], everyone: list[str]) -> str:
    lines = ['[policy]\nname = "p"\nversion = 3']
    for name, perms in roles.items():
        lines.append(f"[roles.{name}]\npermissions = {json.dumps(perms)}")
    lines.append("[bindings.users]\n" + "".join(f"{u} = {json.dumps(r)}\n" for u, r in users.items()))
    lines.append("[bindings.groups]\n" + "".join(f"{g} = {json.dumps(r)}\n" for g, r in groups.items()))
    lines.append(f"[everyone]\npermissions = {json.dumps(everyone)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=150, deadline=None)
@given(
    roles=st.dictionaries(st.sampled_from(ROLE_NAMES), perm_sets, min_size=1),
    users=st.dictionaries(st.sampled_from(["u0", "u1", "u2"]), st.lists(st.sampled_from(ROLE_NAMES), unique=True, max_size=2)),
    groups=st.dictionaries(st.sampled_from(["g0", "g1"]), st.lists(st.sampled_from(ROLE_NAMES), unique=True, max_size=2)),
    everyone=st.lists(st.sampled_from(["service.info", "run.read", "ledger.verify"]), unique=True),
    caller=st.tuples(st.sampled_from(["u0", "u1", "u2", "u3"]), st.lists(st.sampled_from(["g0", "g1", "g2"]), unique=True)),
    action=st.sampled_from(sorted(ACTION_PERMISSION) + ["no.such"]),
)
def test_decisions_match_the_union_of_the_callers_roles(
    roles: dict[str, list[str]], users: dict[str, list[str]], groups: dict[str, list[str]], everyone: list[str], caller: tuple[str, list[str]], action: str
) -> None:
    for perms in roles.values():
        if "policy.update" in perms and "policy.read" not in perms:
            perms.append("policy.read")
    users = {u: [r for r in rs if r in roles] for u, rs in users.items()}
    groups = {g: [r for r in rs if r in roles] for g, rs in groups.items()}
    policy = _policy(_render(roles, users, groups, everyone))
    user, member_of = caller
    held = set(users.get(user, [])) | {r for g in member_of for r in groups.get(g, [])}
    granted = set(everyone) | {p for r in held for p in roles[r]}
    d = policy.decide(user, member_of, action, "s")
    assert d.allowed == (action in ACTION_PERMISSION and ACTION_PERMISSION[action] in granted)
    assert d.roles == (*sorted(held), EVERYONE)
    assert set(d.would_allow) == {r for r, ps in roles.items() if d.permission in ps}
    assert policy_diff(policy, policy) == [] and policy.escalations(policy, user, member_of) == []


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_checking_a_damaged_policy_never_raises_and_agrees_with_parsing(data: st.DataObject) -> None:
    lines = DEFAULT.splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["drop", "swap", "garble"]))
        if how == "drop":
            del lines[i]
        elif how == "swap":
            lines[i] = lines[data.draw(st.integers(0, len(lines) - 1))]
        else:
            at = data.draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + data.draw(st.text(max_size=4)) + lines[i][at:]
    text = "\n".join(lines)
    problems = policy_problems(text, source="p.toml")
    if problems:
        with pytest.raises(PolicyFileError):
            parse_policy(text, source="p.toml")
    else:
        parse_policy(text, source="p.toml")


def test_policy_errors_are_appliance_errors_with_a_fix() -> None:
    for cls in (PolicyFileError, PolicySignatureError):
        assert issubclass(cls, PolicyError) and issubclass(cls, ApplianceError)
