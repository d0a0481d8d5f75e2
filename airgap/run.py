"""``python -m airgap.run MODULE ARGS…``: run a job module behind the egress guard.

Every job the service starts (and every torchrun worker) goes through here, so the guard is
in place and the hub and telemetry switches are set before the job imports anything of its
own (torch, transformers, deepspeed…).
"""

from __future__ import annotations

import runpy
import sys

from airgap.attest import force_offline
from airgap.errors import AirgapError
from airgap.guard import install


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m airgap.run MODULE [ARGS…]")
    force_offline()
    try:
        install()
    except AirgapError as exc:  # a bad allow list: said once, plainly, and the job does not start
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        raise SystemExit(2) from None
    module, *rest = argv
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
