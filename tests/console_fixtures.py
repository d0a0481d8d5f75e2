"""Fixtures for the console's tests: a real in-process service on a copy of the finished tiny run.

The home is the session's `finished_run` with a policy that also binds one user per role
(``ada`` auditor, ``mel`` ml-engineer, ``rex`` release-manager, ``sam`` data-steward; the
process's own user stays admin), signed by the home's root key as an admin would. Each test
gets its own copy, a `Service` on it, and a `Session` acting for the user it names: the same
dispatch path as the socket, with the caller given instead of read from the kernel.

    def test_something(console_home):
        with open_console(console_home, user="ada") as session:
            async def steps(app, pilot): ...
            run_console(session, steps)
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PASSPHRASE

ROLES = {"ada": "auditor", "mel": "ml-engineer", "rex": "release-manager", "sam": "data-steward"}
SIZE = (120, 40)


def _bind_role_users(home: Path) -> None:
    from appliance.service import Service
    from keys.keystore import load_key
    from policies.signature import sign_policy

    with Service.open(home, PASSPHRASE.encode()) as svc:
        version = svc.policy.version
    text = (home / "policy.toml").read_text()
    users = "".join(f'"{user}" = ["{role}"]\n' for user, role in ROLES.items())
    text = text.replace("[bindings.users]\n", f"[bindings.users]\n{users}", 1).replace(f"version = {version}", f"version = {version + 1}", 1)
    (home / "policy.toml").write_text(text)
    (home / "policy.toml.sig").write_bytes(sign_policy(text.encode(), load_key(home / "keys" / "root.key", PASSPHRASE.encode())))


@pytest.fixture(scope="session")
def console_base(tmp_path_factory: pytest.TempPathFactory, finished_run: tuple[Path, object]) -> Path:
    """The finished home with one user per role bound in its policy (copy it before use)."""
    home, _ = finished_run
    base = tmp_path_factory.mktemp("console") / "home"
    shutil.copytree(home, base, symlinks=True)
    _bind_role_users(base)
    return base


@pytest.fixture
def console_home(tmp_path: Path, console_base: Path) -> Path:
    """A private copy of the console's home for one test."""
    dest = tmp_path / "home"
    shutil.copytree(console_base, dest, symlinks=True)
    return dest


class CallerClient:
    """The in-process client acting for a named user (a socket client gets the same from the kernel)."""

    def __init__(self, svc: Any, caller: Any) -> None:
        self.svc, self.caller = svc, caller

    def call(self, op: str, **params: Any) -> Any:
        from appliance.server.client import _plain
        from appliance.service.api import dispatch

        return _plain(dispatch(self.svc, self.caller, op, params))

    def stream(self, op: str, **params: Any) -> Iterator[Any]:
        from appliance.service.api import dispatch

        return iter(dispatch(self.svc, self.caller, op, params))

    def close(self) -> None:
        pass


def caller_named(user: str) -> Any:
    from appliance.service.caller import Caller

    return Caller(uid=60000 + sum(map(ord, user)), user=user, gids=(), groups=())


@contextlib.contextmanager
def open_console(home: Path, *, user: str | None = None, svc: Any = None) -> Iterator[Any]:
    """A connected console `Session` on ``home`` for ``user`` (default: this process's user, the admin).

    Pass ``svc`` to share one open service between two users' sessions (an approval flow).
    """
    from appliance.console.session import Session
    from appliance.server.client import LocalClient
    from appliance.service import Service

    own = svc is None
    if own:
        svc = Service.open(home, PASSPHRASE.encode())
    try:
        client = LocalClient(svc) if user is None else CallerClient(svc, caller_named(user))
        session = Session(client, where=f"home {home} (local mode)")
        session.connect()
        yield session
    finally:
        if own:
            svc.close()


def run_console(session: Any, steps: Callable[[Any, Any], Awaitable[None]], *, size: tuple[int, int] = SIZE) -> Any:
    """Run the console headless at ``size`` and ``await steps(app, pilot)``; returns the app."""
    from appliance.console.app import ConsoleApp

    app = ConsoleApp(session, keymap=None)

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await steps(app, pilot)

    asyncio.run(main())
    return app


async def until(pilot: Any, ready: Callable[[], Any], what: str, *, timeout: float = 60.0) -> None:
    """Let the app run until ``ready()`` holds (service calls run in worker threads, runs in the
    service's own), or fail naming ``what``; no clock in any assertion, the timeout only ends a hang."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        await pilot.pause(0.05)
        if ready():
            await pilot.pause(0.05)
            return
    raise AssertionError(f"timed out waiting for {what}")


async def settle(pilot: Any, app: Any, *, timeout: float = 10.0, quiet: float = 0.2) -> None:
    """Wait until no worker has run for ``quiet`` seconds (service calls done, and the calls their
    answers led to: a tab shown loads on its Show event, an answer may start the next call), then
    let messages land. Streams (``follow``) never end and are not waited for."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    calm_since: float | None = None
    while loop.time() < end:
        await pilot.pause(0.05)
        if [w for w in app.workers if not w.is_finished and w.group != "follow"]:
            calm_since = None
        elif calm_since is None:
            calm_since = loop.time()
        elif loop.time() - calm_since >= quiet:
            break
    await pilot.pause(0.1)
