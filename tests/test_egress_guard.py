"""The egress guard, for real, in fresh processes (an audit hook stays for a process's life).

Only loopback is ever touched: 127.0.0.1 is allowed, 127.0.0.2 (this machine too) stands for
everything that is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airgap.guard import ENV_ALLOW, ENV_LOG
from appliance.jobs.launch import LaunchOptions, command
from appliance.jobs.runner import job_env

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full, timeout=120, check=False)


def test_loopback_passes_another_address_is_refused_and_logged(tmp_path: Path) -> None:
    log = tmp_path / "egress.jsonl"
    out = _python(
        """
        import socket, threading
        from airgap import guard
        guard.install()
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept()[0].sendall(b"ok"), daemon=True).start()
        with socket.create_connection(("127.0.0.1", port)) as c:
            print("loopback", c.recv(2).decode())
        for how in ("tcp", "udp"):
            try:
                if how == "tcp":
                    socket.socket().connect(("127.0.0.2", port))
                else:
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.2", port))
                print(how, "connected")
            except guard.EgressRefused as exc:
                print(how, "refused:", exc.message)
        a, b = socket.socketpair()  # Unix sockets stay on the machine
        a.sendall(b"u"); print("unix", b.recv(1).decode())
        """,
        {ENV_LOG: str(log)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "loopback ok"
    assert lines[1].startswith("tcp refused: egress refused: connect to 127.0.0.2:") and "asked by __main__" in lines[1]
    assert lines[2].startswith("udp refused: egress refused: sendto to 127.0.0.2:")
    assert lines[3] == "unix u"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["event"] for r in records] == ["connect", "sendto"]
    assert all(r["address"].startswith("127.0.0.2:") and r["module"] == "__main__" for r in records)


def test_a_name_is_refused_before_any_lookup_and_an_allowed_address_passes() -> None:
    out = _python(
        """
        import socket
        from airgap import guard
        guard.install()
        for call in (lambda: socket.getaddrinfo("models.example.org", 443), lambda: socket.gethostbyname("models.example.org"),
                     lambda: socket.create_connection(("models.example.org", 443))):
            try:
                call(); print("looked up")
            except guard.EgressRefused as exc:
                print("refused", exc.message.split(",")[0])
            except socket.gaierror:
                print("a lookup was made")
        print("local", socket.getaddrinfo("localhost", 80)[0][4][0] in ("127.0.0.1", "::1"))
        server = socket.create_server(("127.0.0.2", 0))
        with socket.create_connection(("127.0.0.2", server.getsockname()[1])):
            print("allowed 127.0.0.2")
        """,
        {ENV_ALLOW: "127.0.0.2/32"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == [
        "refused egress refused: getaddrinfo to models.example.org:443",
        "refused egress refused: gethostbyname to models.example.org",
        "refused egress refused: getaddrinfo to models.example.org:443",
    ]
    assert lines[3:] == ["local True", "allowed 127.0.0.2"]


def test_a_bad_allow_entry_is_named() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), ENV_ALLOW: "10.0.0.0/8,not a host!"}
    out = subprocess.run([sys.executable, "-m", "airgap.run", "tests.egress_probe"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 2 and "'not a host!'" in out.stderr and ENV_ALLOW in out.stderr and "Traceback" not in out.stderr
    assert "PROBE" not in out.stdout


@pytest.mark.parametrize("torchrun", [False, True], ids=["job", "torchrun-worker"])
def test_every_job_process_runs_behind_the_guard(tmp_path: Path, torchrun: bool) -> None:
    opts = LaunchOptions(nproc_per_node=1, force_torchrun=torchrun) if torchrun else LaunchOptions()
    spec = tmp_path / "job.json"
    spec.write_text("{}")
    argv = command(spec, opts, module="tests.egress_probe")
    assert argv[1:3] == ["-m", "airgap.run"]
    env = {**job_env(opts), "PYTHONPATH": str(REPO), ENV_LOG: str(tmp_path / "egress.jsonl"), "HTTPS_PROXY": "http://127.0.0.2:3128"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    probes = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("PROBE ")]
    assert len(probes) == 1
    probe = probes[0]
    assert probe["guard"] is True and probe["outcome"] == "refused" and probe["hf_offline"] == "1"
    assert (probe["rank"] == "0") is torchrun
    assert "127.0.0.2:9" in probe["message"] and "tests.egress_probe" in probe["message"]
    assert [json.loads(line)["module"].split(" ")[0] for line in (tmp_path / "egress.jsonl").read_text().splitlines()] == ["tests.egress_probe"]


def test_a_hub_download_inside_a_job_fails_at_once_on_the_guard(tmp_path: Path) -> None:
    """Even with the hub's offline switch turned back off (as a library ignoring it would), the
    download never leaves: the hub endpoint is pointed at 127.0.0.2, which the guard refuses."""
    log = tmp_path / "egress.jsonl"
    code = """
        import os
        os.environ["HF_HUB_OFFLINE"] = "0"; os.environ["TRANSFORMERS_OFFLINE"] = "0"
        os.environ["HF_ENDPOINT"] = "http://127.0.0.2:9"
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained("some/name")
            print("loaded")
        except Exception as exc:
            chain, e = [], exc
            while e is not None:
                chain.append(type(e).__name__); e = e.__cause__ or e.__context__
            print("failed", " ".join(chain))
        """
    probe = tmp_path / "hub_probe.py"
    probe.write_text(textwrap.dedent(code))
    env = {**job_env(LaunchOptions()), "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}", ENV_LOG: str(log), "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "airgap.run", "hub_probe"], capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("failed") and "EgressRefused" in out.stdout, out.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all(r["address"].startswith("127.0.0.2:9") for r in records)
    assert len(records) < 5  # no retry storm: the hub client's back-off (about 20 s) never starts
    assert any(m in records[0]["module"] for m in ("urllib3", "requests", "httpx", "httpcore", "huggingface_hub")), records[0]


def test_the_job_runner_reads_back_what_the_guard_refused(tmp_path: Path) -> None:
    from appliance.jobs.runner import Job

    job = Job("tests.egress_probe", {"op": "probe"}, tmp_path / "job")
    outcome = job.run(lambda event: None)
    assert outcome.returncode == 0
    (refused,) = job.refusals()
    assert refused["event"] == "getaddrinfo" and refused["address"] == "127.0.0.2:9" and refused["module"].startswith("tests.egress_probe")
    assert "PROBE" in job.log_file.read_text()


def test_an_allowed_host_name_lets_its_addresses_through() -> None:
    """The rendezvous host of a multi-node job is given by name: its addresses pass (here localhost's)."""
    out = _python(
        """
        import socket
        from airgap import guard
        guard.install(["localhost"])
        server = socket.create_server(("127.0.0.1", 0))
        with socket.create_connection(("localhost", server.getsockname()[1])):
            print("connected by name")
        """,
        {},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "connected by name"
