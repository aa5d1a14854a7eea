"""`secvec ui` (make ui) starts real Prefect and MLflow servers on 127.0.0.1; `secvec serve` registers the
pipeline there as a scheduled deployment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
SECVEC = str(Path(sys.executable).parent / "secvec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(what)


def _listen_addresses(port: int) -> set[str]:
    """Local addresses on which something listens on `port` (IPv4, from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_ui_servers_and_scheduled_deployment(tmp_path):
    prefect_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "SECVEC_PREFECT_PORT": str(prefect_port),
           "SECVEC_MLFLOW_PORT": str(mlflow_port), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    ui = subprocess.Popen([SECVEC, "ui"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    serve = None
    try:
        api = f"http://127.0.0.1:{prefect_port}/api"
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, "prefect server")
        _wait(lambda: httpx.get(f"http://127.0.0.1:{mlflow_port}/health", timeout=2).status_code == 200, 180,
              "mlflow server")
        for port in (prefect_port, mlflow_port):  # loopback only, never 0.0.0.0
            assert _listen_addresses(port) == {"127.0.0.1"}

        serve = subprocess.Popen([SECVEC, "serve", "--cron", "0 2 * * *", "--config", "micro"],
                                 env={**env, "PREFECT_API_URL": api}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)

        def deployment():
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=5).json()
            return next((d for d in found if d["name"] == "nightly"), None)

        dep = _wait(deployment, 120, "deployment 'nightly'")
        assert dep["parameters"] == {"config": "micro"}
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
    finally:
        if serve:
            _stop(serve)
        _stop(ui)
    # Stopping `secvec ui` stops both servers and their workers: nothing keeps listening.
    _wait(lambda: not _listen_addresses(prefect_port) and not _listen_addresses(mlflow_port), 60, "ports released")
