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
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from appliance.service.api import OPS
from keys.keystore import load_key
from policies.policy import EVERYONE, default_policy, parse_policy, sign_policy
from tests.conftest import PASSPHRASE
from tests.test_server import Served, new_home, short_dir, start_serve  # noqa: F401  (short_dir is a fixture)
from tests.test_server_users import TOOLS, User, _run, as_user

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
    reason="needs root and useradd/groupadd/setpriv/curl to create test users",
)

ROLES = ("data-steward", "ml-engineer", "release-manager", "auditor")
PLACEHOLDER = {str: "zz-none", int: 1, bool: False, list: [], dict: {}}


@pytest.fixture
def people() -> Iterator[tuple[str, dict[str, User], dict[str, str]]]:
    """(socket group, role -> user, role -> that user's role group); plus "nobody", bound to nothing."""
    import grp
    import pwd

    prefix = f"aplr_{secrets.token_hex(3)}"
    sock_group = f"{prefix}_sock"
    made_users: list[str] = []
    made_groups: list[str] = []
    try:
        _run("groupadd", sock_group)
        made_groups.append(sock_group)
        role_groups: dict[str, str] = {}
        users: dict[str, User] = {}
        for i, role in enumerate((*ROLES, "nobody")):
            name = f"{prefix}_{i}"
            groups = [sock_group]
            if role != "nobody":
                role_groups[role] = f"{prefix}_g{i}"
                _run("groupadd", role_groups[role])
                made_groups.append(role_groups[role])
                groups.append(role_groups[role])
            _run("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", "-G", ",".join(groups), name)
            made_users.append(name)
            made_groups.append(name)
            entry = pwd.getpwnam(name)
            users[role] = User(name, entry.pw_uid, entry.pw_gid)
        yield sock_group, users, role_groups
    finally:
        for name in made_users:
            subprocess.run(["userdel", name], capture_output=True, timeout=60)
        for name in made_groups:
            try:
                grp.getgrnam(name)
            except KeyError:
                continue
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def _bind_groups(served: Served, role_groups: dict[str, str]) -> None:
    """Install the default policy with each role's group bound, signed by the root key, as the owner (root)."""
    text = default_policy("root", two_person=False).replace(
        "[bindings.groups]\n", "[bindings.groups]\n" + "".join(f'"{g}" = ["{r}"]\n' for r, g in role_groups.items())
    )
    text = text.replace("version = 1", "version = 2", 1)
    root = load_key(served.home / "keys" / "root.key", PASSPHRASE.encode())
    client = served.client()
    try:
        client.call("policy.update", text=text, signature=sign_policy(text.encode(), root).decode())
    finally:
        client.close()


def _call(user: User, socket: Path, op: object) -> tuple[int, str]:
    """Call ``op`` as ``user`` with placeholder values for its required parameters; (HTTP status, error message)."""
    params = {p.name: PLACEHOLDER[p.type] for p in op.params if p.required}  # type: ignore[attr-defined]
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
    served = start_serve(new_home(short_dir / "home"), short_dir / "run" / "appliance.sock", "--socket-group", sock_group)
    try:
        _bind_groups(served, role_groups)
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
            want = policy.decide(user.name, [sock_group, *groups], row["action"], "").allowed
            assert row["allowed"] == want, (role, op.name, row)
            assert row["policy"] == policy.digest and row["rule"]
            # A refused call is a 403 naming the action; an allowed one went past the policy (and may
            # then fail on its placeholder: a path the caller cannot read, a run that does not exist).
            status, message = statuses[(role, op.name)]
            refused = status == 403 and f"may not {row['action']}" in message
            assert refused == (not want), (role, op.name, status, message)
            if want:
                allowed_here.append(op.name)
        matrix.append(f"{role:16} {', '.join(allowed_here) or '-'}")
    # The matrix as tested, for the record (pytest -s shows it).
    print("\n" + "\n".join(matrix))
    assert policy.roles_of("x", []) == (EVERYONE,)
