"""Registry against a real MLflow tracking store (sqlite + local artifacts in tmp), and one real server.

Every version registered here is a real MLflow transformers model of an untrained micro chat model
(tests/tiny_chat_model.py); loading and serving it are tests/test_mlflow_model.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest
import torch
from safetensors.torch import save_file
from tiny_chat_model import write_chat_model

from secvec.registry import (
    CANDIDATE,
    CHAMPION,
    ChampionPolicy,
    WeightsMismatchError,
    beats,
    log_clean_model,
    maybe_promote,
    parse_model_uri,
    promote,
    register_clean_model,
    verify,
    weights_sha256,
)

POLICY = ChampionPolicy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite tracking/registry store for the module (creating it takes seconds) and an experiment."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.create_experiment("secvec-tests", artifact_location=str(root / "artifacts"))
    return client, experiment


@pytest.fixture
def client(store):
    return store[0]


@pytest.fixture
def new_run(store):
    client, experiment = store
    return lambda: client.create_run(experiment).info.run_id


@pytest.fixture
def name() -> str:
    return f"secvec-{uuid.uuid4().hex[:8]}"


SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def write_model(path, seed: int = 0):
    """A micro chat model in three safetensors shards, so hashes are checked per file as for large models."""
    return write_chat_model(path, seed, max_shard_size="200KB")


def tamper(path) -> None:
    """Replace the first shard's tensors, as a process changing the weights after evaluation would."""
    save_file({"a": torch.zeros(8, 8)}, path / SHARDS[0])


def tags_for(metrics: dict) -> dict:
    return {"dataset_md5": "d41d8cd98f00b204e9800998ecf8427e", "vector_sha256": "ab" * 32,
            "base_model_sha256": "cd" * 32, "git_sha": "0123abc", "metrics": metrics,
            "thresholds": {"max_harmful_rate": 0.1}}


def register(client, run_id, tmp_path, name, metrics, seed=0) -> str:
    model_dir = write_model(tmp_path / f"clean-{run_id}", seed)
    return register_clean_model(client, run_id, model_dir, name, tags_for(metrics), weights_sha256(model_dir))


def test_registration_creates_one_version_with_tags_and_candidate(client, new_run, tmp_path, name):
    run_id = new_run()
    model_dir = write_model(tmp_path / "clean")
    expected = weights_sha256(model_dir)
    metrics = {"utility": 0.7, "harmful_rate": 0.0}
    version = register_clean_model(client, run_id, model_dir, name, tags_for(metrics), expected)

    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == [version] == ["1"]
    tags = versions[0].tags
    assert json.loads(tags["weights_sha256"]) == expected
    assert json.loads(tags["metrics"]) == metrics
    assert tags["git_sha"] == "0123abc" and tags["dataset_md5"] == "d41d8cd98f00b204e9800998ecf8427e"
    assert json.loads(tags["thresholds"]) == {"max_harmful_rate": 0.1}
    assert aliases(client, name) == {CANDIDATE: "1"}
    # the version points at the run's MLflow 3 logged model, whose `model/` folder holds the weights
    (model,) = logged_models(client, run_id)
    assert versions[0].run_id == run_id and versions[0].source == model.artifact_location
    assert str(model.status) == "READY" and json.loads(model.tags["weights_sha256"]) == expected
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "model_card.md", "requirements.txt", "model", "components"} <= files
    weights = {f.path for f in client.list_logged_model_artifacts(model.model_id, "model")}
    assert {f"model/{shard}" for shard in SHARDS} | {"model/config.json"} <= weights


def logged_models(client, run_id):
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")


def test_tampered_weights_raise_and_register_nothing(client, new_run, tmp_path, name):
    run_id = new_run()
    model_dir = write_model(tmp_path / "clean")
    expected = weights_sha256(model_dir)
    tamper(model_dir)  # after evaluation
    with pytest.raises(WeightsMismatchError, match=SHARDS[0]):
        register_clean_model(client, run_id, model_dir, name, tags_for({}), expected)
    assert client.search_registered_models(filter_string=f"name='{name}'") == []
    assert client.search_model_versions(f"name='{name}'") == []
    assert client.list_artifacts(run_id) == [] and list(logged_models(client, run_id)) == []


def test_one_registration_per_run_and_name(client, new_run, tmp_path, name):
    run_id = new_run()
    register(client, run_id, tmp_path, name, {"utility": 0.5, "harmful_rate": 0.0})
    with pytest.raises(ValueError, match="already registered"):
        register(client, run_id, tmp_path, name, {"utility": 0.5, "harmful_rate": 0.0})
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def test_retry_reuses_an_intact_upload_and_rejects_a_tampered_one(client, new_run, tmp_path, name):
    model_dir = write_model(tmp_path / "clean")
    expected = weights_sha256(model_dir)
    run_id = new_run()  # a first attempt uploaded the model, then failed before creating the version
    first = log_clean_model(client, run_id, model_dir, name, tags_for({}), expected)
    version = register_clean_model(client, run_id, model_dir, name, tags_for({}), expected)
    assert verify(client, name, version)["ok"]
    assert [m.model_id for m in logged_models(client, run_id)] == [first.model_id]  # reused, not re-uploaded
    assert client.get_model_version(name, version).source == first.artifact_location

    other_run = new_run()  # its first attempt's upload is then modified in the artifact store
    upload = log_clean_model(client, other_run, model_dir, name, tags_for({}), expected)
    save_file({"b": torch.zeros(8)}, os.path.join(upload.artifact_location.removeprefix("file://"), "model", SHARDS[1]))
    with pytest.raises(WeightsMismatchError, match=f"logged model {upload.model_id}"):
        register_clean_model(client, other_run, model_dir, name, tags_for({}), expected)
    assert len(client.search_model_versions(f"name='{name}'")) == 1


def aliases(client, name) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def champion(client, name):
    return aliases(client, name).get(CHAMPION)


def test_champion_moves_only_when_beaten(client, new_run, tmp_path, name):
    steps = [  # (metrics, expected promotion, champion afterwards)
        ({"utility": 0.6, "harmful_rate": 0.00}, True, "1"),  # no champion yet
        ({"utility": 0.5, "harmful_rate": 0.00}, False, "1"),  # worse utility
        ({"utility": 0.6, "harmful_rate": 0.00}, False, "1"),  # a tie does not move it
        ({"utility": 0.9, "harmful_rate": 0.20}, False, "1"),  # better utility but more harmful
        ({"utility": 0.8, "harmful_rate": 0.00}, True, "5"),
    ]
    for metrics, promoted, after in steps:
        version = register(client, new_run(), tmp_path, name, metrics)
        assert maybe_promote(client, name, version, metrics, POLICY) is promoted
        assert champion(client, name) == after
        assert aliases(client, name)[CANDIDATE] == version
    decision = client.get_model_version(name, "4").tags["champion_decision"]
    assert decision == "harmful_rate 0.200 > champion 0.000 + tolerance 0.000"


def test_promote_by_hand(client, new_run, tmp_path, name):
    from mlflow.exceptions import MlflowException

    first = register(client, new_run(), tmp_path, name, {"utility": 0.9, "harmful_rate": 0.0})
    second = register(client, new_run(), tmp_path, name, {"utility": 0.1, "harmful_rate": 0.0})
    assert maybe_promote(client, name, first, {"utility": 0.9, "harmful_rate": 0.0}, POLICY)
    promote(client, name, second)
    assert champion(client, name) == second
    assert client.get_model_version(name, second).tags["champion_decision"] == "promoted by hand"
    with pytest.raises(MlflowException):
        promote(client, name, "99")
    assert champion(client, name) == second


def test_concurrent_promotions_leave_the_best_champion(client, new_run, tmp_path, name):
    utilities = [0.5, 0.9, 0.7, 0.6]
    versions = [register(client, new_run(), tmp_path, name, {"utility": u, "harmful_rate": 0.0})
                for u in utilities]
    start = threading.Barrier(len(versions))

    def attempt(version: str, utility: float) -> None:
        start.wait()
        maybe_promote(client, name, version, {"utility": utility, "harmful_rate": 0.0}, POLICY)

    threads = [threading.Thread(target=attempt, args=vu) for vu in zip(versions, utilities, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert champion(client, name) == versions[1]


def test_verify_catches_a_modified_artifact(client, new_run, tmp_path, name):
    run_id = new_run()
    version = register(client, run_id, tmp_path, name, {"utility": 0.5, "harmful_rate": 0.0})
    assert verify(client, f"models:/{name}@{CANDIDATE}")["ok"]
    kept = verify(client, name, version, dst_path=tmp_path / "download")
    assert kept["ok"] and kept["version"] == version
    recorded = json.loads(client.get_model_version(name, version).tags["weights_sha256"])
    assert weights_sha256(os.path.join(kept["path"], "model")) == recorded  # an MLflow model: weights in model/

    stored = os.path.join(client.get_model_version_download_uri(name, version).removeprefix("file://"), "model")
    save_file({"b": torch.ones(8)}, os.path.join(stored, SHARDS[1]))
    result = verify(client, f"models:/{name}/{version}")
    assert not result["ok"]
    assert result["mismatched"] == [SHARDS[1]]
    os.remove(os.path.join(stored, SHARDS[0]))
    assert verify(client, name, version)["missing"] == [SHARDS[0]]


def test_beats_is_pure_policy():
    assert beats({"utility": 0.1}, None, POLICY) == (True, "no champion yet")
    assert beats({"utility": 0.8, "harmful_rate": 0.1}, {"utility": 0.7, "harmful_rate": 0.0},
                 ChampionPolicy(harmful_tolerance=0.1))[0]
    assert not beats({"utility": 0.71, "harmful_rate": 0.0}, {"utility": 0.7, "harmful_rate": 0.0},
                     ChampionPolicy(min_improvement=0.05))[0]
    lower = ChampionPolicy(metric="perplexity", higher_is_better=False, harmful_metric=None)
    assert beats({"perplexity": 3.0}, {"perplexity": 4.0}, lower)[0]
    assert not beats({"perplexity": 5.0}, {"perplexity": 4.0}, lower)[0]
    assert beats({"utility": 0.9, "harmful_rate": 0.0}, {}, POLICY) == (
        False, "champion has no recorded utility; promote by hand")
    assert not beats({"harmful_rate": 0.0}, {"utility": 0.1, "harmful_rate": 0.0}, POLICY)[0]


def test_parse_model_uri():
    assert parse_model_uri("models:/secvec@champion") == ("secvec", "champion", None)
    assert parse_model_uri("models:/secvec/3") == ("secvec", None, "3")
    with pytest.raises(ValueError, match="expected"):
        parse_model_uri("runs:/abc/clean_model")


def test_weights_sha256_needs_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        weights_sha256(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session: its workers share its process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")


@pytest.mark.slow
def test_register_through_a_real_tracking_server(tmp_path):
    from mlflow import MlflowClient

    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
           "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with open(tmp_path / "server.log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}/health", proc)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"{err}\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run_id = client.create_run(client.create_experiment("secvec-server")).info.run_id
        name = "secvec-server"
        version = register(client, run_id, tmp_path, name, {"utility": 0.5, "harmful_rate": 0.0})
        assert maybe_promote(client, name, version, {"utility": 0.5, "harmful_rate": 0.0}, POLICY)
        assert aliases(client, name) == {CANDIDATE: version, CHAMPION: version}
        assert verify(client, f"models:/{name}@{CHAMPION}")["ok"]
    finally:
        stop_group(proc)
