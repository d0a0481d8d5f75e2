"""The default policy's role × action matrix, as real Unix users see it over the socket.

Needs root: it creates one user per role of the default policy (bound through a Unix group
of its own), one user bound to nothing, and a socket group they all share; every one is
removed afterwards. The service runs as root (it owns the home); each client runs as its
user through ``setpriv`` and calls every operation of the API with placeholder parameters.
The service authorizes before it reads anything, so each call leaves exactly one decision in
the ledger; the test compares every decision with the policy's and prints the matrix.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from appliance.service.api import OPS
from keys.keystore import load_key
from policies.policy import EVERYONE, default_policy, parse_policy
from policies.signature import sign_policy
from tests.conftest import PASSPHRASE
from tests.test_server import Served, new_home, short_dir, start_serve  # noqa: F401  (short_dir is a fixture)
from tests.test_server_users import TOOLS, as_user
from tests.unix_users import User, unix_people

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
    reason="needs root and useradd/groupadd/setpriv/curl to create test users",
)

ROLES = ("admin", "data-steward", "ml-engineer", "release-manager", "auditor")
PLACEHOLDER = {str: "zz-none", int: 1, bool: False, list: [], dict: {}}


@pytest.fixture
def people() -> Iterator[tuple[str, dict[str, User], dict[str, str]]]:
    """(socket group, role -> user, role -> that user's role group); plus "nobody", bound to nothing."""
    prefix = f"aplr_{secrets.token_hex(3)}"
    sock_group = f"{prefix}_sock"
    role_groups = {role: f"{prefix}_g{i}" for i, role in enumerate(ROLES)}
    names = {role: f"{prefix}_{i}" for i, role in enumerate((*ROLES, "nobody"))}
    specs = [(names[role], [sock_group, *([role_groups[role]] if role in role_groups else [])]) for role in names]
    with unix_people([sock_group, *role_groups.values()], specs) as made:
        yield sock_group, {role: made[name] for role, name in names.items()}, role_groups


def _bind_groups(home: Path, role_groups: dict[str, str]) -> Path:
    """With the service stopped, as the root key's holder: the default policy (two-person rules
    and all) with each role's group bound, signed by the root key."""
    text = default_policy("root").replace("[bindings.groups]\n", "[bindings.groups]\n" + "".join(f'"{g}" = ["{r}"]\n' for r, g in role_groups.items()))
    text = text.replace("version = 1", "version = 2", 1)
    root = load_key(home / "keys" / "root.key", PASSPHRASE.encode())
    (home / "policy.toml").write_text(text)
    (home / "policy.toml.sig").write_bytes(sign_policy(text.encode(), root))
    return home


def _call(user: User, socket: Path, op: object) -> tuple[int, str]:
    """Call ``op`` as ``user`` with placeholder values for its required parameters; (HTTP status, error message)."""
    params = {p.name: PLACEHOLDER[p.type] for p in op.params if p.required}  # type: ignore[attr-defined]
    if op.name == "approvals.request":  # type: ignore[attr-defined]
        params["action"] = "model.export"  # an action that is requested, on a model that does not exist
    path = op.path  # type: ignore[attr-defined]
    for name in list(params):
        if "{" + name + "}" in path:
            path = path.replace("{" + name + "}", quote(str(params.pop(name)), safe=""))
    argv = ["curl", "-sS", "-w", "\n%{http_code}", "--unix-socket", str(socket)]
    if "GET" in op.methods:  # type: ignore[attr-defined]
        argv += ["-G", *[a for k, v in params.items() for a in ("--data-urlencode", f"{k}={v}")]]
    else:
        argv += ["-X", op.methods[0], "-H", "Content-Type: application/json", "-d", json.dumps(params)]  # type: ignore[attr-defined]
    out = as_user(user, *argv, f"http://appliance{path}")
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    try:
        error = json.loads(body).get("error") or {}
    except ValueError:
        error = {}
    return int(status), str(error.get("message", ""))


def test_every_role_gets_exactly_what_the_default_policy_grants(short_dir: Path, people: tuple[str, dict[str, User], dict[str, str]]) -> None:
    sock_group, users, role_groups = people
    home = _bind_groups(new_home(short_dir / "home"), role_groups)
    served = start_serve(home, short_dir / "run" / "appliance.sock", "--socket-group", sock_group)
    try:
        ops = list(OPS)
        statuses: dict[tuple[str, str], tuple[int, str]] = {}
        for role, user in users.items():
            for op in ops:
                statuses[(role, op.name)] = _call(user, served.socket, op)
        client = served.client()
        try:
            result = client.call(
                "ledger.query",
                sql="SELECT identity, action, allowed, body ->> '$.data.rule' AS rule, body ->> '$.data.policy_digest' AS policy "
                "FROM decisions d JOIN events e USING (seq) ORDER BY seq",
            )
            policy_text = client.call("policy.show")["text"]
        finally:
            client.close()
    finally:
        served.stop()
    policy = parse_policy(policy_text, source="policy in force")
    rows = [dict(zip(result["columns"], r, strict=True)) for r in result["rows"]]
    matrix = []
    for role, user in users.items():
        groups = [role_groups[role]] if role in role_groups else []
        # One decision per call, in call order (an operation may authorize under another action's
        # name: model.list is artifact.list).
        mine = [r for r in rows if r["identity"] == user.name]
        assert len(mine) == len(ops), (role, [r["action"] for r in mine])
        allowed_here = []
        for op, row in zip(ops, mine, strict=True):
            d = policy.decide(user.name, [sock_group, *groups], row["action"], "")
            # Under a two-person rule the action itself is refused without an approved request;
            # asking for one (approvals.request, or policy.update, which opens its request) needs the permission alone.
            second = d.needs_approval and op.name not in ("approvals.request", "policy.update")
            want = d.allowed and not second
            assert row["allowed"] == want, (role, op.name, row)
            assert row["policy"] == policy.digest and row["rule"]
            # A refused call is a 403 naming the action; an allowed one went past the policy (and may
            # then fail on its placeholder: a path the caller cannot read, a run that does not exist).
            status, message = statuses[(role, op.name)]
            refused = status == 403 and (f"may not {row['action']}" in message or "only once a second person" in message)
            assert refused == (not want), (role, op.name, status, message)
            if want:
                allowed_here.append(op.name)
            elif d.allowed and second:
                allowed_here.append(f"{op.name} (once approved)")
        matrix.append(f"{role:16} {', '.join(allowed_here) or '-'}")
    # The matrix as tested, for the record (pytest -s shows it).
    print("\n" + "\n".join(matrix))
    assert policy.roles_of("x", []) == (EVERYONE,)


def test_two_person_policy_update_with_real_users_and_their_own_keys(short_dir: Path, people: tuple[str, dict[str, User], dict[str, str]]) -> None:
    """Root (admin) asks for a policy update; root's own approval, then a release manager's, are
    refused; a second admin's, signed with the key that admin made in their own account, installs it."""
    from tests.test_server_users import python_for

    sock_group, users, role_groups = people
    python = python_for(users["admin"])
    if python is None:
        pytest.skip("no Python that the test users can run with this project importable")
    argv, env = python
    home = _bind_groups(new_home(short_dir / "home"), role_groups)
    served = start_serve(home, short_dir / "run" / "appliance.sock", "--socket-group", sock_group)
    me = {**os.environ, "APPLIANCE_PASSPHRASE": PASSPHRASE, "APPLIANCE_USER_PASSPHRASE": PASSPHRASE, "HOME": str(short_dir / "roothome")}
    try:
        # Each person makes a user key in their own account; root, holding the root key, adds the public halves.
        for role in ("admin", "release-manager"):
            user = users[role]
            mine = short_dir / f"home-{user.name}"
            mine.mkdir(mode=0o700)
            os.chown(mine, user.uid, user.gid)
            out = as_user(user, *argv, "-m", "appliance", "keys", "create", env={**env, "HOME": str(mine), "APPLIANCE_USER_PASSPHRASE": PASSPHRASE})
            assert out.returncode == 0, out.stderr
            key_file = mine / ".config" / "appliance" / "user.key"
            assert oct(key_file.stat().st_mode & 0o777) == "0o600" and key_file.stat().st_uid == user.uid
            add = [sys.executable, "-m", "appliance", "--home", str(home), "keys", "add", str(mine / ".config" / "appliance" / "user.pub.pem")]
            done = subprocess.run(
                [*add, "--owner", user.name, "--root-key", str(home / "keys" / "root.key")], capture_output=True, text=True, env=me, timeout=120
            )
            assert done.returncode == 0, done.stderr
        done = subprocess.run([sys.executable, "-m", "appliance", "keys", "create"], capture_output=True, text=True, env=me, timeout=120)
        assert done.returncode == 0, done.stderr
        pub = short_dir / "roothome" / ".config" / "appliance" / "user.pub.pem"
        add = [
            sys.executable,
            "-m",
            "appliance",
            "--home",
            str(home),
            "keys",
            "add",
            str(pub),
            "--owner",
            "root",
            "--root-key",
            str(home / "keys" / "root.key"),
        ]
        assert subprocess.run(add, capture_output=True, env=me, timeout=120).returncode == 0

        # Root asks for v3, which binds the unbound user to auditor.
        text = (home / "policy.toml").read_text().replace("version = 2", "version = 3", 1)
        text = text.replace("[bindings.users]\n", f'[bindings.users]\n"{users["nobody"].name}" = ["auditor"]\n')
        draft = short_dir / "v3.toml"
        draft.write_text(text)
        sock = ["--socket", str(served.socket)]
        subprocess.run(
            [sys.executable, "-m", "appliance", "policy", "sign", str(draft), "--root-key", str(home / "keys" / "root.key")], check=True, env=me, timeout=120
        )
        done = subprocess.run(
            [sys.executable, "-m", "appliance", *sock, "policy", "update", str(draft), "--json"], capture_output=True, text=True, env=me, timeout=120
        )
        assert done.returncode == 0, done.stderr
        rid = json.loads(done.stdout)["request"]["id"]

        def approve(user: User | None) -> subprocess.CompletedProcess[str]:
            cmd = ["-m", "appliance", *sock, "approve", rid]
            if user is None:
                return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=me, timeout=120)
            return as_user(user, *argv, *cmd, env={**env, "HOME": str(short_dir / f"home-{user.name}"), "APPLIANCE_USER_PASSPHRASE": PASSPHRASE})

        out = approve(None)
        assert out.returncode == 2 and "nobody approves their own request" in out.stderr, out.stderr
        out = approve(users["release-manager"])
        assert out.returncode == 2 and "is approved by admin with approvals.decide" in out.stderr and "Traceback" not in out.stderr, out.stderr
        # The request is visible to the admin who may decide it, and not to the release manager.
        listed = as_user(users["admin"], *argv, "-m", "appliance", *sock, "approvals", "list", "--json", env=env)
        assert [r["id"] for r in json.loads(listed.stdout) if r["you_may_decide"]] == [rid], listed.stderr
        out = approve(users["admin"])
        assert out.returncode == 0 and "carried out: policy default v3 in force" in out.stdout, out.stderr
        client = served.client()
        try:
            assert client.call("policy.show")["version"] == 3
            rows = client.call(
                "ledger.query",
                sql="SELECT kind, actor FROM events WHERE kind LIKE 'approval.%' OR kind = 'policy.updated' ORDER BY seq",
            )["rows"]
        finally:
            client.close()
    finally:
        served.stop()
    admin, manager = users["admin"].name, users["release-manager"].name
    assert rows == [
        ["approval.requested", "root"],
        ["approval.refused", "root"],
        ["approval.refused", manager],
        ["approval.approved", admin],
        ["approval.executed", "root"],
        ["policy.updated", "root"],
    ]
