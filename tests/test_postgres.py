"""A team's shared stores on a real PostgreSQL cluster: the registry lock held by the database, registrations
at once (threads on the DB directly; two `secvec run` processes through an MLflow server and a Prefect
server that both keep their state in PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_registry import POLICY, free_port, tags_for, wait_healthy, write_model

from secvec.registry_lock import LOCK_URI_ENV, RegistryLockTimeout, registry_lock

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
PG_BIN = next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True) if (p / "initdb").exists()),
              Path(shutil.which("initdb") or "/nonexistent").parent)
DATABASES = ("mlflow_direct", "mlflow_server", "prefect")


def _pg(user: str | None, *cmd: str) -> None:
    # initdb and postgres refuse to run as root: as root they run as an unprivileged user
    prefix = ["runuser", "-u", user, "--"] if user else []
    subprocess.run(prefix + [str(PG_BIN / cmd[0]), *cmd[1:]], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway cluster on 127.0.0.1 (socket in its own folder, trust auth), with one database per store;
    stopped and deleted at the end, also when a test fails. Yields `url(db, driver="postgresql")`."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:
        user = "postgres" if subprocess.run(["id", "postgres"], capture_output=True, check=False).returncode == 0 else "nobody"
    folder = Path(tempfile.mkdtemp(prefix="secvec-pg-"))  # not tmp_path: root-only, the cluster's user can't enter
    if user:
        shutil.chown(folder, user)
    port = free_port()
    _pg(user, "initdb", "-D", str(folder / "data"), "-U", "secvec", "--auth=trust", "-E", "UTF8", "--no-locale")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=300"
    _pg(user, "pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-o", options, "start")
    try:
        for db in DATABASES:
            _pg(None, "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "secvec", db)
        yield lambda db, driver="postgresql": f"{driver}://secvec@127.0.0.1:{port}/{db}"
    finally:
        _pg(user, "pg_ctl", "-D", str(folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


HOLD = """import sys, time
from secvec.registry_lock import registry_lock
with registry_lock(sys.argv[1], "shared-model"):
    print("held", flush=True)
    time.sleep(300)
"""


def test_the_lock_is_held_by_the_database_and_freed_when_its_holder_dies(postgres, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, postgres("mlflow_direct")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegistryLockTimeout, match="shared-model"), registry_lock(
                postgres("mlflow_direct"), "shared-model", timeout_s=1):
            pass
        with registry_lock(postgres("mlflow_direct"), "another-model", timeout_s=1):
            pass  # one lock per model name
        # a client of an HTTP tracking server takes the same lock through SECVEC_REGISTRY_LOCK_URI
        monkeypatch.setenv(LOCK_URI_ENV, postgres("mlflow_direct", "postgresql+asyncpg"))
        with pytest.raises(RegistryLockTimeout), registry_lock("http://127.0.0.1:1", "shared-model", timeout_s=1):
            pass
        holder.send_signal(signal.SIGKILL)  # no clean-up: PostgreSQL ends the session and frees its locks
        holder.wait()
        with registry_lock("http://127.0.0.1:1", "shared-model", timeout_s=10):
            pass
    finally:
        holder.kill()
        holder.wait()


def assert_consistent(client, name: str) -> list:
    """Versions 1..n with no gap, every weights hash once, every alias on an existing version."""
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == list(range(1, len(versions) + 1))
    weights = [v.tags["weights_sha256"] for v in versions]
    assert len(set(weights)) == len(weights), "the same weights registered twice"
    aliases = client.get_registered_model(name).aliases
    assert {"candidate", "champion"} <= aliases.keys() and set(map(str, aliases.values())) <= {
        str(v.version) for v in versions}
    return versions


def register_at_once(client, experiment: str, name: str, models: list[tuple[Path, float]]) -> list[str | None]:
    """One thread per (model dir, utility), each with its own MLflow run, all calling register_once together."""
    from secvec.registry import register_once, weights_sha256

    start, versions = threading.Barrier(len(models)), [None] * len(models)

    def run(i: int, model: Path, utility: float) -> None:
        run_id = client.create_run(experiment).info.run_id
        metrics = {"utility": utility, "harmful_rate": 0.0}
        start.wait()
        versions[i] = register_once(client, run_id, model, name, tags_for(metrics), weights_sha256(model), metrics,
                                    POLICY)["version"]

    threads = [threading.Thread(target=run, args=(i, *m)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return versions


def test_runs_registering_the_same_weights_at_once_make_one_version(postgres, tmp_path):
    """Six runs at once on the DB store itself, three rounds: runs 0-2 and 3-5 each share their weights.
    Without the lock it failed 6 tries of 6: the same weights as two or three versions, or a registration
    failing on a conflicting write."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=postgres("mlflow_direct"))
    experiment = client.create_experiment("secvec-pg", artifact_location=(tmp_path / "artifacts").as_uri())
    name = "secvec-pg"
    for r in range(3):
        dirs = [write_model(tmp_path / f"r{r}-w{w}", seed=10 * r + w) for w in range(2)]
        versions = register_at_once(client, experiment, name,
                                    [(dirs[i // 3], 0.5 + 0.1 * r + 0.01 * (i // 3)) for i in range(6)])
        assert None not in versions, "a registration failed (see the captured log)"
        assert len(set(versions[:3])) == 1 and len(set(versions[3:])) == 1
    versions = assert_consistent(client, name)
    assert len(versions) == 6
    aliases = client.get_registered_model(name).aliases
    best = max(versions, key=lambda v: json.loads(v.tags["metrics"])["utility"])
    assert str(aliases["champion"]) == str(best.version)


def _servers(postgres, root: Path) -> tuple[dict[str, subprocess.Popen], str, str]:
    """A Prefect server and an MLflow tracking server (proxied artifacts), both on the cluster."""
    prefect_port, mlflow_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    commands = {
        "prefect": ([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                    {"PREFECT_HOME": str(root / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "PREFECT_UI_ENABLED": "false",
                     "PREFECT_API_DATABASE_CONNECTION_URL": postgres("prefect", "postgresql+asyncpg")}),
        "mlflow": ([str(BIN / "mlflow"), "server", "--backend-store-uri", postgres("mlflow_server"),
                    "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1",
                    "--port", str(mlflow_port), "--workers", "1"], {}),
    }
    procs = {}
    for name, (cmd, extra) in commands.items():
        with open(root / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(cmd, env={**env, **extra}, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
    return procs, f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the servers' workers share their process group
    for proc in procs.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _start_run(i: int, root: Path, prefect_api: str, mlflow_uri: str, lock_uri: str) -> subprocess.Popen:
    """`secvec run --config micro` as on machine `i`: its own stage cache and Prefect home, the team's stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(root / f"home{i}"), "MLFLOW_TRACKING_URI": mlflow_uri,
        LOCK_URI_ENV: lock_uri, "SECVEC_CACHE": str(root / f"cache{i}"), "OMP_NUM_THREADS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(root / f"run{i}.log", "w") as log:
        return subprocess.Popen([str(BIN / "secvec"), "run", "--config", "micro", "--out", str(root / f"out{i}")],
                                env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)


def _lock_waiters(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                            ).fetchone()[0]


def test_two_pipeline_runs_at_once_share_the_postgres_stores(postgres, tmp_path):
    """Two machines' worth of `secvec run --config micro` started together, with the same config and threads,
    so the same weights. The test holds the model's registry lock until both runs queue on it, then lets
    go: both look for their weights and register at the same instant (and both must have used the
    database's lock, not a local one, to queue)."""
    from mlflow import MlflowClient

    from secvec.config import load_pipeline_config
    from secvec.registry import verify

    name, lock_uri = load_pipeline_config("micro").registry.name, postgres("mlflow_server")
    booted = time.monotonic()
    procs, prefect_api, mlflow_uri = _servers(postgres, tmp_path)
    runs: dict[int, subprocess.Popen] = {}
    try:
        for server, url in (("prefect", f"{prefect_api}/health"), ("mlflow", f"{mlflow_uri}/health")):
            try:
                wait_healthy(url, procs[server], timeout=180)
            except (RuntimeError, TimeoutError) as err:
                pytest.fail(f"{server}: {err}\n{(tmp_path / f'{server}.log').read_text()[-3000:]}")
        booted, start, ends, queued_at = time.monotonic() - booted, time.monotonic(), {}, []  # queued_at: when the 1st, 2nd run queued on the lock
        with registry_lock(lock_uri, name):
            runs = {i: _start_run(i, tmp_path, prefect_api, mlflow_uri, lock_uri) for i in range(2)}
            while (queued := _lock_waiters(lock_uri)) < 2 and all(p.poll() is None for p in runs.values()):
                queued_at += [time.monotonic() - start] * (queued - len(queued_at))
                time.sleep(1)
            queued_at += [time.monotonic() - start] * (queued - len(queued_at))
        while len(ends) < 2 and time.monotonic() - start < 900:
            ends |= {i: time.monotonic() - start for i, p in runs.items() if i not in ends and p.poll() is not None}
            time.sleep(0.5)
        print(f"\nservers healthy after {booted:.0f} s; two runs at once: queued on the lock at {', '.join(f'{t:.0f}' for t in queued_at)} s; run 0 "
              f"ended at {ends.get(0, -1):.0f} s, run 1 at {ends.get(1, -1):.0f} s")
        for i, proc in runs.items():
            assert proc.wait(timeout=1) == 0, (tmp_path / f"run{i}.log").read_text()[-4000:]
        assert queued == 2, "a run registered without waiting for the database's lock"

        reports = [json.loads((tmp_path / f"out{i}" / "report.json").read_text()) for i in range(2)]
        flow_runs = _flow_runs(prefect_api)
        assert sorted(r["state_type"] for r in flow_runs) == ["COMPLETED", "COMPLETED"], flow_runs
        client = MlflowClient(tracking_uri=mlflow_uri)
        versions = assert_consistent(client, name)
        assert [str(v.version) for v in versions] == ["1"]  # the same weights: one version for both runs
        assert {r["registered"]["version"] for r in reports} == {"1"}
        assert versions[0].run_id in {r["mlflow"]["run_id"] for r in reports}
        assert verify(client, f"models:/{name}@champion")["ok"]  # its files, through the proxied artifact store
    finally:
        for proc in runs.values():
            proc.kill()
            proc.wait()
        _stop(procs)
