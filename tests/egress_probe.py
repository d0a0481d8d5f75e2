"""A job module for the egress guard tests: reports whether the guard is on and tries 127.0.0.2.

Run as ``python -m airgap.run tests.egress_probe SPEC`` (as the job runner does), alone or as
a torchrun worker. Never reaches beyond loopback: 127.0.0.2 is this machine.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from airgap import guard


def main() -> None:
    result = {"guard": guard.installed(), "rank": os.environ.get("RANK"), "hf_offline": os.environ.get("HF_HUB_OFFLINE")}
    try:
        socket.create_connection(("127.0.0.2", 9), timeout=2).close()
        result["outcome"] = "connected"
    except guard.EgressRefused as exc:
        result["outcome"] = "refused"
        result["message"] = exc.message
    except OSError as exc:
        result["outcome"] = f"os error {exc}"
    print("PROBE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
    sys.exit(0)
