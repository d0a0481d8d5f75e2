"""Run attestation and `appliance airgap check`: fields, signatures, verdicts, route tables."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from airgap import netinfo
from airgap.attest import environment_attestation
from airgap.check import overall, verdicts
from appliance.service import Service
from keys.keystore import load_public_key, verify_signature
from tests.conftest import PASSPHRASE, cli

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
DEFAULT_V4 = "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
SUBNET_V4 = "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
V6_DEFAULT = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n"
)
V6_LO = (
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
)


def _tables(tmp_path: Path, v4: str, v6: str) -> tuple[Path, Path]:
    (tmp_path / "route").write_text(ROUTE_HEADER + v4)
    (tmp_path / "ipv6_route").write_text(v6)
    return tmp_path / "route", tmp_path / "ipv6_route"


def test_route_tables_with_and_without_a_default_route(tmp_path: Path) -> None:
    assert netinfo.default_routes(*_tables(tmp_path, SUBNET_V4, V6_LO)) == []
    assert netinfo.default_routes(*_tables(tmp_path, DEFAULT_V4 + SUBNET_V4, V6_DEFAULT)) == [
        {"family": "ipv4", "interface": "eth0", "via": "192.0.2.1"},
        {"family": "ipv6", "interface": "eth0", "via": "fd00::1"},
    ]
    assert netinfo.default_routes(tmp_path / "none", tmp_path / "none6") is None


def _probe_ok() -> dict[str, Any]:
    from airgap.attest import OFFLINE_ENV

    return {"guard": True, "refuses_lookup": True, "refuses_connect": True, "offline_env": dict(OFFLINE_ENV), "proxies": []}


def test_verdicts(tmp_path: Path) -> None:
    att = environment_attestation(recipe_digest="r")
    by_name = lambda items: {i.name: i.verdict for i in items}  # noqa: E731
    att["default_route"] = []
    att["from_bundle"] = att["packages"]
    items = verdicts(att, _probe_ok(), True)
    assert by_name(items)["default route"] == "pass" and overall(items) == "pass"
    att["default_route"] = [{"family": "ipv4", "interface": "eth0", "via": "192.0.2.1"}]
    items = verdicts(att, _probe_ok(), True)
    assert by_name(items)["default route"] == "warn" and overall(items) == "warn"
    assert "192.0.2.1" in next(i.detail for i in items if i.name == "default route")
    off = {**_probe_ok(), "guard": False, "refuses_lookup": False, "refuses_connect": False}
    assert by_name(verdicts(att, off, True))["egress guard in jobs"] == "fail"
    assert by_name(verdicts(att, None, True))["egress guard in jobs"] == "fail"
    assert by_name(verdicts(att, {**_probe_ok(), "proxies": ["HTTPS_PROXY"]}, True))["proxies in jobs"] == "fail"
    assert by_name(verdicts(att, _probe_ok(), False))["egress guard in the service"] == "fail"
    assert overall(verdicts(att, _probe_ok(), False)) == "fail"


@pytest.mark.parametrize("route", [False, True], ids=["no-default-route", "default-route"])
def test_airgap_check_runs_a_real_job_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, route: bool) -> None:
    v4, v6 = _tables(tmp_path, (DEFAULT_V4 if route else "") + SUBNET_V4, V6_LO)
    monkeypatch.setattr(netinfo, "ROUTE_V4", v4)
    monkeypatch.setattr(netinfo, "ROUTE_V6", v6)
    monkeypatch.setattr(netinfo.default_routes, "__defaults__", (v4, v6))
    code, out, err = cli(capsys, "airgap", "check", "--json")
    assert code == 0, err
    report = json.loads(out)
    items = {i["name"]: i for i in report["items"]}
    assert items["egress guard in jobs"]["verdict"] == "pass"
    assert items["hub and telemetry switches in jobs"]["verdict"] == "pass"
    assert items["proxies in jobs"]["verdict"] == "pass"
    assert items["default route"]["verdict"] == ("warn" if route else "pass")
    assert report["verdict"] == "warn"  # packages here are not from a signed bundle
    code, out, _ = cli(capsys, "airgap", "check")
    assert ("WARN  default route" in out) is route and "verdict: warn" in out


def test_every_run_records_a_signed_attestation(finished_run: tuple[Path, Any]) -> None:
    home, summary = finished_run
    with Service.open(home, PASSPHRASE.encode()) as svc:
        (event,) = [e for e in svc.ledger.events("run.started") if e.data["run_id"] == summary.run_id]
        env = event.data["environment"]
        for key in ("python", "platform", "package_list", "egress_guard", "default_route", "interfaces_up", "recipe_digest", "offline_env_in_jobs"):
            assert key in env, key
        assert env["recipe_digest"] == event.data["recipe_digest"]
        assert env["egress_guard"]["jobs"] is True and "127.0.0.1" in env["egress_guard"]["allowed"]
        assert {"name", "version"} <= set(env["package_list"][0])
        assert any(p["name"].lower() == "torch" for p in env["package_list"])
        # Signed by the node key: the event's signature verifies over its hash.
        verify_signature(load_public_key(home / "keys" / "node.pub.pem"), base64.b64decode(event.signature), bytes.fromhex(event.hash))
