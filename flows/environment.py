"""Project-local defaults for Prefect, MLflow and the offline stack, applied by `configure()` before a flow
runs (never at import), and the one Prefect server that bench worker processes share.

Every value is a default: an environment variable already set (e.g. MLFLOW_TRACKING_URI pointing at a
remote `mlflow server`, PREFECT_API_URL at a Prefect server) wins.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secvec.paths import PROJECT_ROOT

PREFECT_PORT = int(os.environ.get("SECVEC_PREFECT_PORT", "4200"))
MLFLOW_PORT = int(os.environ.get("SECVEC_MLFLOW_PORT", "5000"))
HOST = os.environ.get("SECVEC_HOST", "127.0.0.1")


def mlflow_db_uri(root: Path = PROJECT_ROOT) -> str:
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def defaults(root: Path = PROJECT_ROOT) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "secvec",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "MLFLOW_TRACKING_URI": mlflow_db_uri(root),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def prefect_server_url() -> str | None:
    """The project's Prefect server URL if one is running (started by `make ui`), else None."""
    url = f"http://{HOST}:{PREFECT_PORT}/api"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return url if response.status == 200 else None
    except OSError:
        return None


def configure(root: Path = PROJECT_ROOT) -> None:
    """Apply the defaults (before Prefect is imported); use the project's running Prefect server so runs
    appear in its UI."""
    for key, value in defaults(root).items():
        os.environ.setdefault(key, value)
    (root / "mlruns").mkdir(exist_ok=True)
    if "PREFECT_API_URL" not in os.environ and (url := prefect_server_url()):
        os.environ["PREFECT_API_URL"] = url


@contextmanager
def one_prefect_server(workers: int) -> Iterator[None]:
    """With worker processes and no configured server, start one for the run: each worker would otherwise
    start its own temporary server (one API per process, all writing the same database)."""
    if workers == 1 or os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # the workers inherit it
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        APILogWorker.drain_all(timeout=5)  # the run's last logs, before their API goes
        del os.environ["PREFECT_API_URL"]
        server.stop()
