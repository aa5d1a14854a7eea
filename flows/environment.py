"""Project-local defaults for Prefect, MLflow and the offline stack, applied by `configure()` before a flow
runs (never at import), and the one Prefect server that bench worker processes share.

Every value is a default: an environment variable already set (e.g. MLFLOW_TRACKING_URI pointing at a
remote `mlflow server`, PREFECT_API_URL at a Prefect server) wins.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from secvec.paths import PROJECT_ROOT

PREFECT_PORT = int(os.environ.get("SECVEC_PREFECT_PORT", "4200"))
MLFLOW_PORT = int(os.environ.get("SECVEC_MLFLOW_PORT", "5000"))
HOST = os.environ.get("SECVEC_HOST", "127.0.0.1")
PEFT_DEPRECATION = "`is_gradient_checkpointing` is deprecated"  # the start of the warning's message


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
        # transformers' "Loading weights" / "Writing model shards" bars: two lines per model load or save,
        # no information in a log (the Trainer's own progress bar is not affected)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # a deprecation inside peft (PeftModel calls `is_gradient_checkpointing`); the worker processes of
        # bench and torchrun read it from here, this process from `configure`
        "PYTHONWARNINGS": f"ignore:{PEFT_DEPRECATION}:FutureWarning",
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
    warnings.filterwarnings("ignore", message=re.escape(PEFT_DEPRECATION), category=FutureWarning)
    # Prefect hands its handlers to the `secvec` logger (PREFECT_LOGGING_EXTRA_LOGGERS) but not a level: left
    # at the root's WARNING, the stages' INFO lines (stage reused, screen, coverage, registry) never showed
    logging.getLogger("secvec").setLevel(logging.INFO)
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


# ---- the Prefect API going away mid-run ------------------------------------------------------------------


def api_outage(err: BaseException) -> str | None:
    """The Prefect API URL when `err` or an exception it came from is a failed connection to that API (a
    server stopped mid-run), else None."""
    import httpx

    configured = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, httpx.TransportError):
            try:
                url = str(err.request.url)
            except RuntimeError:  # raised without a request: not a call we can name
                url = ""
            parts = urlsplit(url)
            api = configured or f"{parts.scheme}://{parts.netloc}/api"
            if url.startswith(api + "/"):
                return api
        err = err.__cause__ or err.__context__
    return None


class _QuietOutage(logging.Filter):
    """What Prefect logs while its API is gone, made short: the engines' "failed with exception
    ConnectError(...)" without the traceback of httpx's internals, and the events worker's failure without a
    dump of the whole lost event (its "Unable to connect ... event data may be lost" warning says the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and api_outage(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        if record.msg == "Service %r failed to process item %r" and isinstance(record.args, tuple) \
                and len(record.args) == 2:
            service, item = record.args
            record.msg, record.args = "Service %r failed to process %s", (service, _short(item))
        return True


def _short(item: object) -> str:
    kind = getattr(item, "event", None)  # a Prefect event: its name, e.g. prefect.task-run.Completed
    return f"{type(item).__name__} {kind}" if kind else type(item).__name__


def quiet_api_outage() -> None:
    """Install the filter on the task and flow engines' loggers and the services' (after Prefect's import)."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect._internal.concurrency"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOutage) for f in logger.filters):
            logger.addFilter(_QuietOutage())


def exit_after_outage(code: int) -> None:
    """End the process now, once the CLI has said what happened. Nothing left can reach the API, and at exit
    Prefect's workers would still try: each lost event reconnects 10 times (about 7 s an event, minutes in
    all), with a line per failure. A run's own work is on disk by then (stage folders, MLflow, report)."""
    if os.environ.get("PREFECT_API_URL"):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    # a temporary server of this process: exit normally, so that its clean-up stops it, but quietly
    logging.raiseExceptions = False  # the API log worker prints its failures unless this is off
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            logger.disabled = True  # Prefect's SafeLogger ignores logging.disable()
