"""`make ui`: the Prefect server and the MLflow UI on 127.0.0.1, over the stores `secvec run` writes to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.environment import HOST, MLFLOW_PORT, PREFECT_PORT, PROJECT_ROOT


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before {url} was healthy")
        if _healthy(url):
            return
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def server_commands(root: Path = PROJECT_ROOT) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    return {
        "prefect": [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(PREFECT_PORT)],
        "mlflow": [str(bin_dir / "mlflow"), "server", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                   "--default-artifact-root", (root / "mlruns" / "artifacts").as_uri(),
                   "--host", HOST, "--port", str(MLFLOW_PORT)],
    }


def run_uis() -> None:
    """Start both servers, print their URLs, and keep them up until Ctrl-C or SIGTERM; both stop with it."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # The Prefect UI calls the API at PREFECT_SERVER_API_PORT (4200), not at `--port`: on another port the
    # page loads but shows "Can't connect to Server API" (seen by tests/test_browser.py).
    env.setdefault("PREFECT_UI_API_URL", f"http://{HOST}:{PREFECT_PORT}/api")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the cleanup below, as Ctrl-C does
    # Each server in its own process group: stopping it must also stop the workers it spawns.
    procs = {name: subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, start_new_session=True)
             for name, cmd in server_commands().items()}
    try:
        wait_healthy(f"http://{HOST}:{PREFECT_PORT}/api/health", procs["prefect"])
        wait_healthy(f"http://{HOST}:{MLFLOW_PORT}/health", procs["mlflow"])
        print(f"\nPrefect UI: http://{HOST}:{PREFECT_PORT}\nMLflow UI:  http://{HOST}:{MLFLOW_PORT}\n"
              "`make run` in another terminal reports to both. Ctrl-C stops them.", flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
