"""The authority: `Service` owns one appliance home; every operation is a method of it.

Names are imported on first use, so a client that reads only the API table
(`appliance.service.api`) does not load the ledger, DuckDB or the key store.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Caller", "Service", "ServiceConfig"]


def __getattr__(name: str) -> Any:
    if name == "Caller":
        from appliance.service.caller import Caller

        return Caller
    if name in ("Service", "ServiceConfig"):
        from appliance.service import core

        return getattr(core, name)
    raise AttributeError(name)
