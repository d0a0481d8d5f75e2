"""``python -m airgap.run airgap.selftest``: what a job process sees, as JSON on stdout.

Used by `appliance airgap check`: the guard must be installed by the job wrapper, must refuse a
name lookup (a reserved ``.invalid`` name) and a connection to 127.0.0.2 (this machine: nothing
leaves even if the guard failed), and the hub switches must be set with no proxy left.
"""

from __future__ import annotations

import json
import os
import socket

from airgap import guard
from airgap.attest import OFFLINE_ENV, PROXY_VARS


def _refused(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except guard.EgressRefused:
        return True
    except OSError:
        return False
    return False


def main() -> None:
    report = {
        "guard": guard.installed(),
        "refuses_lookup": _refused(lambda: socket.getaddrinfo("egress-selftest.invalid", 80)),
        "refuses_connect": _refused(lambda: socket.socket().connect(("127.0.0.2", 9))),
        "offline_env": {k: os.environ.get(k) for k in OFFLINE_ENV},
        "proxies": sorted(k for k in PROXY_VARS if os.environ.get(k)),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
