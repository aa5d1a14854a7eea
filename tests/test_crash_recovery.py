"""Whole `secvec run` processes killed or cut off from their Prefect API, then run again: real subprocesses,
a real Prefect server, a real sqlite MLflow store and registry, the micro preset.

(a) SIGKILL to the whole process group during guarded fine-tuning: the re-run resumes from the last
checkpoint, ends with the report and clean weights of an uninterrupted fine-tuning, and registers once.
(b) the Prefect server stopped mid-run: one readable error line and exit code 75; once the server is back, the
same command completes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
SECVEC = str(BIN / "secvec")
# The report fields that must come out the same whether fine-tuning ran at once or resumed
SAME = ("dataset_md5", "vector_sha256", "base_model", "base", "clean", "plain", "strip_check", "vector_coverage",
        "vector_coverage_detail", "screen", "gate", "runtime")
DOWNSTREAM = ("finetune", "strip-vector", "evaluate")  # stage folders from guarded fine-tuning on


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"{what}: the process ended first (rc {proc.returncode})\n{tail}")
        time.sleep(0.05)
    raise TimeoutError(what)


def test_only_failed_calls_to_the_prefect_api_count_as_an_outage(monkeypatch):
    import httpx

    from flows.environment import api_outage

    def refused(url: str) -> httpx.ConnectError:
        return httpx.ConnectError("[Errno 111] Connection refused", request=httpx.Request("GET", url))

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api/")
    assert api_outage(refused("http://127.0.0.1:4200/api/flow_runs/1")) == "http://127.0.0.1:4200/api"
    try:  # as the engine raises it: the transport error as the cause of another
        raise RuntimeError("state proposal failed") from refused("http://127.0.0.1:4200/api/task_runs/")
    except RuntimeError as err:
        assert api_outage(err) == "http://127.0.0.1:4200/api"
    assert api_outage(refused("http://127.0.0.1:5000/api/2.0/mlflow/runs/get")) is None  # another server
    assert api_outage(ValueError("bad config")) is None
    monkeypatch.delenv("PREFECT_API_URL")  # a temporary server: named by the failed call
    assert api_outage(refused("http://127.0.0.1:8449/api/logs/")) == "http://127.0.0.1:8449/api"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """Temp stores for every run of this module and a micro config whose fine-tuning saves checkpoints."""
    root = tmp_path_factory.mktemp("crash")
    micro = yaml.safe_load((ROOT / "configs" / "micro.yaml").read_text())
    micro["data"] = str(ROOT / micro["data"])
    # micro saves none. 39 steps: checkpoints 5, 10, ..., 35, each on a logging step (logging_steps 5): the
    # loss logged next after a resume averages the steps since the last log of *this* process (Trainer).
    micro["finetune"]["train"]["save_steps"] = 5
    micro["registry"]["name"] = "secvec-crash"
    (root / "crash.yaml").write_text(yaml.safe_dump(micro))
    return {"root": root, "config": root / "crash.yaml", "cache": root / "cache",
            "mlflow": f"sqlite:///{root / 'mlflow.db'}"}


def _env(stores: dict, prefect_home: Path, **extra: str) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "MLFLOW_TRACKING_URI": stores["mlflow"],
           "SECVEC_CACHE": str(stores["cache"]), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # a port where no `make ui` server of the project answers: configure() would report there
           "SECVEC_PREFECT_PORT": str(_free_port())}
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


def _run_command(stores: dict, out: Path) -> list[str]:
    return [SECVEC, "run", "--config", str(stores["config"]), "--out", str(out)]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    # its own process group: a kill reaches the run's temporary Prefect server too, as an OOM kill of a job would
    with log.open("w") as fh:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _run(cmd: list[str], env: dict, log: Path, timeout_s: float = 600) -> tuple[int, str]:
    proc = _start(cmd, env, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()


def _complete_checkpoints(cache: Path) -> list[Path]:
    """Guarded fine-tuning's complete checkpoints (Trainer writes trainer_state.json last). It is the first
    `finetune` stage of the flow: the plain reference runs after evaluation."""
    found = cache.glob("finetune/*/trainer/checkpoint-*/trainer_state.json")
    return sorted((p.parent for p in found), key=lambda p: int(p.name.split("-")[1]))


def _versions(stores: dict) -> list:
    import mlflow

    return mlflow.MlflowClient(stores["mlflow"]).search_model_versions("name = 'secvec-crash'")


def _clean_sha(cache: Path) -> str:
    """The clean backbone's sha256, as the strip stage recorded it (registering hashes it again)."""
    [result] = cache.glob("strip-vector/*/result.json")
    return json.loads(result.read_text())["model"]["sha256"]


@pytest.fixture(scope="module")
def resumed(stores) -> dict:
    """A run SIGKILLed (whole process group) right after guarded fine-tuning wrote a checkpoint, then the
    same command again."""
    home, root = stores["root"] / "prefect", stores["root"]
    killed = _start(_run_command(stores, root / "out"), _env(stores, home), root / "killed.log")
    try:
        _wait_for(lambda: _complete_checkpoints(stores["cache"]), 400, "a guarded fine-tuning checkpoint",
                  killed, root / "killed.log")
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    checkpoints = _complete_checkpoints(stores["cache"])
    stage = checkpoints[-1].parents[1]
    assert not (stage / "DONE").exists() and not (stage / "guarded").exists(), "killed after fine-tuning ended"
    assert not (root / "out" / "report.json").exists()

    rc, console = _run(_run_command(stores, root / "out"), _env(stores, home), root / "resumed.log")
    assert rc == 0, console[-3000:]
    report = json.loads((root / "out" / "report.json").read_text())
    history = json.loads((stage / "result.json").read_text())["history"]
    return {"report": report, "console": console, "stage": stage, "last_checkpoint": checkpoints[-1],
            "history": history, "clean_sha": _clean_sha(stores["cache"])}


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result_and_registers_once(stores, resumed):
    stage = resumed["stage"]
    assert f"resuming from {resumed['last_checkpoint']}" in resumed["console"]
    assert (stage / "DONE").is_file() and (stage / "guarded").is_dir()
    assert not list((stage / "trainer").glob("checkpoint-*")), "checkpoints are removed after success"
    assert len(resumed["history"]) == 8 and resumed["history"][0]["step"] == 5  # the steps before the checkpoint too
    report = resumed["report"]
    assert report["gate"]["passed"] and report["registered"]["version"] == "1"
    assert [str(v.version) for v in _versions(stores)] == ["1"]

    # The uninterrupted reference: the same inputs (data, base, vector: the finished stages), every stage from
    # guarded fine-tuning on run again at once. A rerun from an empty cache reproduces those upstream stages
    # bit for bit (tests/test_pipeline.py::test_a_rerun_from_scratch_reproduces_every_bit).
    for name in DOWNSTREAM:
        shutil.rmtree(stores["cache"] / name)
    out = stores["root"] / "reference"
    rc, console = _run(_run_command(stores, out), _env(stores, stores["root"] / "prefect"),
                       stores["root"] / "reference.log")
    assert rc == 0, console[-3000:]
    assert "resuming from" not in console
    reference = json.loads((out / "report.json").read_text())
    assert {k: report[k] for k in SAME} == {k: reference[k] for k in SAME}
    assert _clean_sha(stores["cache"]) == resumed["clean_sha"]
    steps = [{k: v for k, v in r.items() if not k.startswith("train_")} for r in resumed["history"]]
    ref_history = json.loads((stage / "result.json").read_text())["history"]
    assert steps == [{k: v for k, v in r.items() if not k.startswith("train_")} for r in ref_history]
    # registering looks the version up by the weights' sha256: the same weights, still one version
    assert reference["registered"]["version"] == "1" and len(_versions(stores)) == 1


def _prefect_server(home: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = _start(cmd, env, log)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    _wait_for(healthy, 180, "prefect server", server, log)
    return server


@pytest.mark.slow
def test_prefect_api_stopped_mid_run_gives_one_line_and_a_rerun_completes(stores, resumed):
    """Uses the finished stages of the runs above: the re-run is short."""
    home, port, root = stores["root"] / "server-home", _free_port(), stores["root"]
    api = f"http://127.0.0.1:{port}/api"
    # Prefect's client retries each call 5 times with backoff (about a minute) by default, and the stage
    # retries on top of that: a server back within that time lets the run go on. 0 here: fail fast.
    env = _env(stores, home, PREFECT_API_URL=api, PREFECT_CLIENT_MAX_RETRIES="0")
    server = _prefect_server(home, port, root / "server.log")
    log = root / "cut-off.log"
    run = _start(_run_command(stores, root / "cut-off"), env, log)
    try:
        _wait_for(lambda: "==> prepare_data" in log.read_text(), 300, "the flow run's first stage", run, log)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait(timeout=60)
    rc = run.wait(timeout=300)
    console = log.read_text()
    lines = [line for line in console.splitlines() if line.strip()]
    assert rc == 75, console[-3000:]
    assert lines[-1].startswith(f"error: the Prefect API at {api} stopped answering (ConnectError:"), lines[-1]
    assert "prefect server start" in lines[-1] and "run the same command again" in lines[-1]
    assert "Traceback" not in console and "│" not in console, console[-3000:]  # nor Rich's boxed one

    server = _prefect_server(home, port, root / "server-again.log")
    try:
        rc, console = _run(_run_command(stores, root / "again"), env, root / "again.log")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert rc == 0, console[-3000:]
    again = json.loads((root / "again" / "report.json").read_text())
    assert {k: again[k] for k in SAME} == {k: resumed["report"][k] for k in SAME}
    assert again["registered"]["version"] == "1" and len(_versions(stores)) == 1
