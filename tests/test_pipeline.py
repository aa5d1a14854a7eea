"""The whole flow on the micro preset under a real Prefect run, a real MLflow store and registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPORT_KEYS = {"dataset_md5", "base", "clean", "gate", "registered", "strip_check", "vector_coverage", "timings_s",
               "screen", "runtime"}
METRIC_KEYS = {"harmful_rate", "harmful_refusal_rate", "over_refusal_rate", "utility", "perplexity"}


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory):
    """A Prefect test server for this module (MLflow store and stage cache: the session's, see conftest)."""
    root = tmp_path_factory.mktemp("pipeline")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield root


@pytest.fixture(scope="module")
def first_run(pipeline_env):
    from flows.pipeline import secvec_pipeline

    return secvec_pipeline(config="micro", out_dir=str(pipeline_env / "out"))


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_report_has_every_field(first_run, pipeline_env):
    report = first_run
    assert REPORT_KEYS <= report.keys()
    assert METRIC_KEYS <= report["base"].keys() and METRIC_KEYS <= report["clean"].keys()
    assert report["strip_check"]["adapter_keys"] == [] and report["strip_check"]["max_abs_diff"] <= 1e-6
    assert {"loss_on", "loss_off", "ratio"} <= report["vector_coverage"].keys()
    assert report["vector_coverage"]["ratio"] < 1.0
    screen = report["screen"]  # the default `report` mode: every fine-tuning sample scored, none dropped
    assert screen["mode"] == "report" and screen["n"] == 200 and "kept" not in screen
    assert screen["auroc"] > 0.5 and len(screen["top"]) == 20 and screen["calibration"]["sv_val"] == 20
    assert {"prepare_data", "bootstrap", "fit_vector", "screen", "guarded_finetune", "strip", "evaluate"} <= report[
        "timings_s"].keys()
    on_disk = json.loads((pipeline_env / "out" / "report.json").read_text())
    assert on_disk["dataset_md5"] == report["dataset_md5"]
    assert (pipeline_env / "out" / "finetune_losses.png").stat().st_size > 1000


def test_passing_run_registered_one_version_with_lineage(first_run):
    import mlflow

    assert first_run["gate"]["passed"], first_run["gate"]["reasons"]
    reg = first_run["registered"]
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{reg['name']}'")
    assert [str(v.version) for v in versions] == [reg["version"]]
    tags = versions[0].tags
    assert tags["dataset_md5"] == first_run["dataset_md5"]
    assert tags["vector_sha256"] == first_run["vector_sha256"]
    assert {"base_model_sha256", "git_sha", "metrics", "thresholds", "weights_sha256"} <= tags.keys()
    aliases = client.get_registered_model(reg["name"]).aliases
    assert str(aliases["candidate"]) == reg["version"] and str(aliases["champion"]) == reg["version"]
    run = client.get_run(first_run["mlflow"]["run_id"])
    assert run.data.tags["gate"] == "passed"
    assert "finetune/loss" in run.data.metrics and "clean/harmful_rate" in run.data.metrics
    assert run.inputs.dataset_inputs, "the dataset was not logged as a run input"


def test_failing_gate_registers_nothing_and_reuses_cached_stages(first_run, pipeline_env):
    """Also: this run's harm judge is `bow`, trained inside the flow on the shared public replies."""
    import mlflow

    from flows.pipeline import secvec_pipeline

    micro = yaml.safe_load((Path(__file__).parents[1] / "configs" / "micro.yaml").read_text())
    micro["data"] = str(Path(__file__).parents[1] / micro["data"])
    micro["gate"]["max_vector_loss_ratio"] = 1e-9  # no vector covers this well: the gate must fail
    micro["registry"]["name"] = "secvec-micro-rejected"
    micro["eval"]["judge"] = {"kind": "bow"}
    path = pipeline_env / "strict.yaml"
    path.write_text(yaml.safe_dump(micro))

    state = secvec_pipeline(config=str(path), out_dir=str(pipeline_env / "strict"), return_state=True)
    report = state.result()
    assert not report["gate"]["passed"] and report["registered"] is None
    assert any("vector" in r for r in report["gate"]["reasons"])
    client = mlflow.MlflowClient()
    assert client.search_model_versions("name = 'secvec-micro-rejected'") == []
    assert client.get_run(report["mlflow"]["run_id"]).data.tags["gate"] == "rejected"

    states = _task_states(state.state_details.flow_run_id)
    for name in ("bootstrap-base", "fit-security-vector", "vector-coverage", "finetune", "strip-vector"):
        runs = [s for n, s in states.items() if n.startswith(name)]
        assert runs and set(runs) == {"Cached"}, states  # finished with these inputs: Prefect's cache, no rerun
    assert [s for n, s in states.items() if n.startswith("train-judge")] == ["Completed"], states
    assert report["clean"]["judge"].startswith("bow:") and report["base"]["judge"] == report["clean"]["judge"]


def test_a_rerun_from_scratch_reproduces_every_bit(first_run, pipeline_env, monkeypatch):
    """The same config and threads on an empty cache: the same base, vector, clean weights and report (a
    machine of the same kind gives these bits too; see docs/RELIABILITY.md for what differs across threads)."""
    import mlflow

    from flows.pipeline import secvec_pipeline

    monkeypatch.setenv("SECVEC_CACHE", str(pipeline_env / "fresh-cache"))
    again = secvec_pipeline(config="micro", out_dir=str(pipeline_env / "again"))
    same = ("dataset_md5", "vector_sha256", "base", "clean", "plain", "strip_check", "vector_coverage_detail",
            "gate", "runtime")
    assert {k: again[k] for k in same} == {k: first_run[k] for k in same}
    assert again["base_model"]["sha256"] == first_run["base_model"]["sha256"]
    assert again["base_model"]["dir"] != first_run["base_model"]["dir"]  # rebuilt, not reused
    assert again["runtime"]["threads"] == 1 and again["base_model"]["bootstrapped"]
    assert again["registered"]["version"] == first_run["registered"]["version"]  # the same weights: one version
    name = first_run["registered"]["name"]
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{name}'")) == 1
