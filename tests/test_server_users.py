"""The service as several Unix users see it: the kernel names the caller, the socket's group
decides who may connect, the policy decides what each caller may do, and every decision is
recorded under the identity the kernel gave.

Needs root (it creates users and a group, named ``aplt_<random>_…``, and removes them) and
`useradd`, `groupadd`, `setpriv`, `curl`. The service runs as root, as it would under a
`User=` of its own; clients run as each test user through ``setpriv``.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_server import DECISIONS_SQL, Served, new_home, short_dir, start_serve  # noqa: F401  (short_dir is a fixture)
from tests.unix_users import User, unix_people

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("useradd", "userdel", "groupadd", "groupdel", "setpriv", "curl")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
    reason="needs root and useradd/groupadd/setpriv/curl to create test users",
)


@dataclass(frozen=True)
class Cast:
    group: str  # owns the socket
    alice: User  # in the group
    bob: User  # in the group
    outsider: User  # not in the group


@pytest.fixture
def cast() -> Iterator[Cast]:
    """Two users sharing the socket's group, one outside it; all removed afterwards."""
    prefix = f"aplt_{secrets.token_hex(3)}"
    group = f"{prefix}_sock"
    with unix_people([group], [(f"{prefix}_a", [group]), (f"{prefix}_b", [group]), (f"{prefix}_c", [])]) as made:
        yield Cast(group=group, alice=made[f"{prefix}_a"], bob=made[f"{prefix}_b"], outsider=made[f"{prefix}_c"])


def as_user(user: User, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as ``user`` with its own groups, and none of this process's secrets."""
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *argv],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd="/",
        timeout=120,
    )


def curl_as(user: User | None, socket: Path, path: str, *args: str) -> tuple[int, dict]:
    argv = ["curl", "-sS", "--unix-socket", str(socket), "-w", "\n%{http_code}", *args, f"http://appliance{path}"]
    out = as_user(user, *argv) if user else subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)


def python_for(user: User) -> tuple[list[str], dict[str, str]] | None:
    """A Python that ``user`` can run with this project importable, or None.

    The venv's interpreter may live where other users cannot go (a venv made from a Python
    under /root); then the system's Python of the same version, given the venv's packages
    and the repository on PYTHONPATH, runs the same code."""
    purelib, platlib = sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [([sys.executable], {})]
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system:
        candidates.append(([system], {"PYTHONPATH": os.pathsep.join(dict.fromkeys([str(REPO), purelib, platlib]))}))
    for argv, env in candidates:
        probe = as_user(user, *argv, "-c", "import appliance.cli, appliance.server.client, httpx", env=env)
        if probe.returncode == 0:
            return argv, env
    return None


@pytest.fixture
def served_to_group(short_dir: Path, cast: Cast) -> Iterator[Served]:
    s = start_serve(new_home(short_dir / "home"), short_dir / "run" / "appliance.sock", "--socket-group", cast.group)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def _decisions(served: Served) -> list[dict]:
    client = served.client()
    try:
        result = client.call("ledger.query", sql=DECISIONS_SQL)
    finally:
        client.close()
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def test_socket_belongs_to_the_group(served_to_group: Served, cast: Cast) -> None:
    st = served_to_group.socket.stat()
    assert st.st_mode & 0o777 == 0o660
    assert grp.getgrgid(st.st_gid).gr_name == cast.group
    assert f"group {cast.group}, mode 0660" in served_to_group.stderr()


def test_each_caller_is_who_the_kernel_says(served_to_group: Served, cast: Cast) -> None:
    sock = served_to_group.socket
    # The owner (root initialised the home) is allowed.
    status, body = curl_as(None, sock, "/v1/info")
    assert status == 200 and body["result"]["caller"]["uid"] == 0
    # Group members reach the service, which names them from the kernel: what the policy grants
    # everyone (service.info) they get, as themselves; nothing else (no role is bound to them).
    for user in (cast.alice, cast.bob):
        status, body = curl_as(user, sock, "/v1/info", "-H", "X-User: root", "-H", "X-Uid: 0")
        assert status == 200, body
        assert body["result"]["caller"]["uid"] == user.uid and body["result"]["caller"]["user"] == user.name
        status, body = curl_as(user, sock, "/v1/ledger/query", "-G", "--data-urlencode", "sql=SELECT * FROM decisions")
        assert status == 403 and body["error"]["type"] == "PolicyError"
        assert f"{user.name} may not ledger.query" in body["error"]["message"] and "ask for role auditor" in body["error"]["message"]
        # Claiming to be the owner in the body is refused as an unknown parameter.
        status, body = curl_as(user, sock, "/v1/ledger/verify", "-H", "Content-Type: application/json", "-d", '{"caller": "root"}')
        assert status == 400 and "takes no parameter 'caller'" in body["error"]["message"]
    rows = _decisions(served_to_group)
    by_user = {u.name: u for u in (cast.alice, cast.bob)}
    for name, user in by_user.items():
        mine = [r for r in rows if r["identity"] == name]
        assert [(r["action"], r["uid"], r["allowed"]) for r in mine] == [("service.info", user.uid, True), ("ledger.query", user.uid, False)]
    owner_rows = [r for r in rows if r["identity"] == "root"]
    assert owner_rows and all(r["uid"] == 0 and r["allowed"] for r in owner_rows)
    assert {r["identity"] for r in rows} == {"root", cast.alice.name, cast.bob.name}


def test_outsider_cannot_connect(served_to_group: Served, cast: Cast) -> None:
    out = as_user(cast.outsider, "curl", "-sS", "--unix-socket", str(served_to_group.socket), "http://appliance/v1/info")
    assert out.returncode == 7, (out.returncode, out.stdout, out.stderr)  # curl: could not connect
    python = python_for(cast.outsider)
    if python is not None:
        argv, env = python
        probe = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        out = as_user(cast.outsider, *argv, "-c", probe, str(served_to_group.socket), env=env)
        assert out.returncode != 0 and "PermissionError" in out.stderr, out.stderr
    # Nothing reached the service: no decision names the outsider.
    assert all(r["identity"] != cast.outsider.name for r in _decisions(served_to_group))


def test_cli_over_the_socket_as_each_user(served_to_group: Served, cast: Cast) -> None:
    python = python_for(cast.alice)
    if python is None:
        pytest.skip("no Python that the test users can run with this project importable")
    argv, env = python
    cli = [*argv, "-m", "appliance", "--socket", str(served_to_group.socket), "ledger", "query", "--json", "SELECT 1 AS one"]
    out = as_user(cast.alice, *cli, env=env)
    assert out.returncode == 2, out.stderr
    assert f"{cast.alice.name} may not ledger.query" in out.stderr and "Traceback" not in out.stderr
    out = as_user(cast.outsider, *cli, env=env)
    assert out.returncode == 2 and "cannot reach the appliance service" in out.stderr and "Traceback" not in out.stderr
    # The owner, through the same command.
    own = subprocess.run(cli, capture_output=True, text=True, env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}, timeout=120)
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout) == [{"one": 1}]
    rows = _decisions(served_to_group)
    assert [(r["uid"], r["allowed"]) for r in rows if r["identity"] == cast.alice.name] == [(cast.alice.uid, False)]
