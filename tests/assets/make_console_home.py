"""Build tests/assets/console-home.tar.gz: a frozen home for the console's snapshot tests.

Snapshots compare pixels of text, so what the screens show must not change between runs: run
ids, times, key ids and digests come from this one home, built once and kept. Rebuild it when
the home's format changes (a ledger schema, a key file):

    .venv/bin/python tests/assets/make_console_home.py

It runs the tiny test recipe on the standard library's docs in /tmp/appliance-console-home,
binds one user per role in its policy (as tests/console_fixtures.py does), and packs the home.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.demo import build_stdlib_corpus  # noqa: E402
from tests.conftest import ASSETS, new_home, run_to_end  # noqa: E402
from tests.console_fixtures import _bind_role_users  # noqa: E402

BASE = Path("/tmp/appliance-console-home")
OUT = ASSETS / "console-home.tar.gz"


def main() -> None:
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    build_stdlib_corpus(BASE / "corpus", max_bytes=150_000)
    shutil.copyfile(ASSETS / "tiny.toml", BASE / "tiny.toml")
    with new_home(BASE / "home") as svc:
        final = run_to_end(svc, BASE / "tiny.toml")
    if final["status"] != "succeeded":
        raise SystemExit(f"the tiny run did not succeed: {final}")
    _bind_role_users(BASE / "home")
    (BASE / "home" / "service.lock").unlink(missing_ok=True)
    with tarfile.open(OUT, "w:gz") as tar:
        tar.add(BASE / "home", arcname="home")
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
