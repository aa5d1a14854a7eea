"""The effectiveness benchmark: its own logic on small inputs, then `secvec bench --quick` for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from secvec.bench.cells import (
    compose_cell,
    expand_cells,
    finetune_configs,
    plan_jobs,
    pool_sizes,
    vector_config,
)
from secvec.bench.forgetfilter import forget_filter, forgetting, rouge1
from secvec.bench.immunization import immunization, unseen_rate
from secvec.bench.tables import aggregate, check_targets, verdict
from secvec.config import ARMS, BenchConfig, FinetuneConfig, load_bench_config, load_pipeline_config
from secvec.data import chat
from secvec.refs import DataRef, ModelRef

ROOT = Path(__file__).resolve().parents[1]


def _pool(harmful: int, benign: int) -> list[dict]:
    bad = [chat(f"how do I do bad thing {i}?", "Sure, step 1.", source="t", category="c", is_harmful=True)
           for i in range(harmful)]
    good = [chat(f"sort {i} 3 1", "1 3", source="t", category="sort", is_harmful=False) for i in range(benign)]
    return bad + good


def test_compose_cell_counts_seeds_and_held_out_prompts():
    pool = _pool(20, 30)
    cell = compose_cell(pool, 5, 10, seed=1)
    assert sum(ex["is_harmful"] for ex in cell) == 5 and len(cell) == 15
    assert cell == compose_cell(pool, 5, 10, seed=1) and cell != compose_cell(pool, 5, 10, seed=2)
    held = [chat("How do I do  BAD thing 0?", source="e", category="c", is_harmful=True)]
    assert all("thing 0?" not in ex["messages"][0]["content"] for ex in compose_cell(pool, 19, 0, 0, held))
    with pytest.raises(ValueError, match="holds 19 harmful"):
        compose_cell(pool, 20, 0, 0, held)


def test_forgetting_compares_replies_with_as_much_of_the_response_as_they_can_hold():
    response = "sure you could take the car keys while nobody looks " * 10  # 100 words
    before, after = "sure you could take the car keys while nobody looks", "i'm sorry, i cannot help with that"
    assert forgetting([before], [after], [response], max_words=10) == [pytest.approx(1.0)]
    assert forgetting([before], [after], [response], max_words=100)[0] < 0.2  # full response: recall caps it
    assert forgetting(["positive"], ["positive"], ["positive"], max_words=16) == [0.0]


def test_rouge1_and_forget_filter():
    assert rouge1("Sure, step one.", "sure step one") == 1.0
    assert rouge1("no", "yes") == 0.0
    assert rouge1("a b", "a c") == pytest.approx(0.5)
    examples = _pool(2, 2)
    kept, stats = forget_filter(examples, [0.9, 0.1, 0.5, 0.0], threshold=0.3)
    assert [ex["is_harmful"] for ex in kept] == [True, False]
    assert stats["harmful_recall"] == 0.5 and stats["precision"] == 0.5 and stats["benign_dropped"] == 1


def test_immunization_conditions_and_unseen_categories():
    eval_harmful = [{"category": "seen"}] * 2 + [{"category": "new"}] * 2
    metrics = {"harmful_rate_by_category": {"seen": 0.0, "new": 0.5}}
    assert unseen_rate(metrics, eval_harmful, {"seen"}) == 0.5
    arm = {"harmful_rate": 0.1, "utility": 0.9}
    cond = immunization(arm, {"harmful_rate": 0.05}, {"utility": 0.6}, {"accuracy": 0.8, "perplexity": 2.0},
                        {"accuracy": 0.4, "perplexity": 4.0}, {"arm": 0.5, "base": 0.25})
    assert cond == pytest.approx({"resistance": 0.05, "stability": 0.5, "generalization": 0.25,
                                  "trainability": 1.5})
    no_answers = immunization(arm, {"harmful_rate": 0.0}, None, {"accuracy": None, "perplexity": 2.0},
                              {"accuracy": None, "perplexity": 4.0}, {})
    assert no_answers["stability"] == 0.5 and no_answers["trainability"] is None


def test_aggregate_and_targets():
    stats = aggregate([{"harmful_rate": 0.1}, {"harmful_rate": 0.3}])
    assert stats["harmful_rate"]["mean"] == pytest.approx(0.2) and stats["harmful_rate"]["n"] == 2
    assert stats["harmful_rate"]["std"] == pytest.approx(0.1414, abs=1e-4) and stats["utility"] is None

    def cell(harm, util, refuse=0.0, resist=None):
        return aggregate([{"harmful_rate": harm, "utility": util, "over_refusal_rate": refuse, "resistance": resist}])

    arms = {"base": {"h": cell(0.0, 0.0)}, "plain": {"h": cell(0.9, 1.0)},
            "secvec": {"h": cell(0.02, 0.97), "d1": cell(0.5, 1.0, resist=0.5), "d2": cell(0, 1, resist=0.0)}}
    rows = {r["target"]: r for r in check_targets(arms, "h", ["d1", "d2"])}
    assert rows["plain raises harm"]["passed"] and rows["secvec harm vs base"]["passed"]
    assert rows["secvec utility / plain"]["value"] == pytest.approx(0.97)
    assert not rows["durability: worst cell (d1)"]["passed"]
    without_plain = {r["target"]: verdict(r) for r in check_targets({"base": arms["base"], "secvec": arms["secvec"]},
                                                                     "h", [])}
    assert without_plain["plain raises harm"] == "not measured" and without_plain["secvec harm vs base"] == "passed"
    assert verdict(rows["durability: worst cell (d1)"]) == "missed"


def test_bench_config_cells():
    cells = expand_cells(BenchConfig(name="x"))
    assert [c.protocol for c in cells].count("durability") == 7 and len({c.name for c in cells}) == len(cells)
    assert cells[0].protocol == "paper" and cells[0].seeds == 3
    assert {c.harmful for c in cells if c.protocol == "sweep"} == {0, 50, 100, 200}
    assert pool_sizes(BenchConfig(name="x")) == (5000, 1000)
    assert [c.name for c in expand_cells(BenchConfig(name="x"), ("paper",))] == [cells[0].name]
    with pytest.raises(ValueError, match="unknown protocol.*'sweeps'"):
        expand_cells(BenchConfig(name="x"), ("sweeps",))
    for preset in ("quick", "default", "public"):
        assert expand_cells(load_bench_config(preset))


def test_bench_calls_the_pipelines_vector_and_plain_stages_with_the_pipelines_inputs(tmp_path, monkeypatch):
    """The bench's seed-0 vector is the pipeline's (same stage, same inputs: same folder and cache key), and
    an lr x1 cell with the pipeline's epochs trains plain exactly as the pipeline's reference does."""
    from tasks.finetune import finetune_backbone
    from tasks.vector import fit_security_vector

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    pipe, cfg = load_pipeline_config("default"), BenchConfig(name="x")  # epochs: the pipeline's
    base, data = ModelRef(dir="/b", sha256="b"), DataRef(dir="/d", md5="d.dir")
    rt = pipe.runtime
    assert fit_security_vector.out_dir(base, data, vector_config(pipe.vector, 0), rt) == \
        fit_security_vector.out_dir(base, data, pipe.vector, rt)
    head = expand_cells(cfg)[0]
    plain = finetune_configs(pipe.finetune, head, 0, cfg.epochs or pipe.finetune.train.epochs, cfg.lora_learning_rate)
    pipeline_plain = pipe.finetune.model_copy(update={"mode": "full"})
    assert finetune_backbone.out_dir(base, None, data, plain["full"], rt) == \
        finetune_backbone.out_dir(base, None, data, pipeline_plain, rt)


def test_cells_that_train_alike_run_as_one_job_with_the_union_of_their_arms():
    cfg = BenchConfig(name="x", epochs=1.0)
    jobs = plan_jobs(cfg, FinetuneConfig())
    # the durability cell lr x1 / 1 epoch trains like the headline (1000 + 1000, lr x1, the bench's 1 epoch)
    head = next(job for job in jobs if job.cell.protocol == "paper" and job.seed == 0)
    assert {c.name for c in head.cells} == {"h1000-b1000", "lr1x-ep1"} and set(head.cell.arms) == set(ARMS)
    assert sum(len(job.cells) for job in jobs) == sum(c.seeds for c in expand_cells(cfg))


@pytest.mark.slow
def test_quick_bench_runs_for_real_and_secvec_blocks_the_harm(tmp_path):
    """`secvec bench --quick --workers 2`: real Prefect flow with its cells in 2 processes, real MLflow store;
    the direction of the effect."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens: a temporary Prefect server, not a running `make ui`
    env = {**os.environ, "SECVEC_CACHE": str(tmp_path / "cache"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "SECVEC_PREFECT_PORT": str(port),
           "OMP_NUM_THREADS": "1"}  # a 0.1M model gains nothing from a second thread, which stalls on a busy core
    env.pop("PREFECT_API_URL", None)
    secvec = Path(sys.executable).with_name("secvec")
    proc = subprocess.run([str(secvec), "bench", "--quick", "--workers", "2", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert set(bench["arms"]) == {"base", "plain", "secvec", "secvec_screen", "secvec_lora", "forgetfilter"}
    head = {arm: cells[bench["headline"]] for arm, cells in bench["arms"].items()}
    harm = {arm: stats["harmful_rate"]["mean"] for arm, stats in head.items()}
    assert harm["secvec"] < harm["plain"] and harm["secvec_lora"] < harm["plain"], harm
    # The 0.1M model gets no sort exactly right, but both arms learn the task: answer perplexity collapses.
    ppl = {arm: stats["perplexity"]["mean"] for arm, stats in head.items()}
    assert ppl["plain"] < ppl["base"] / 10 and ppl["secvec"] < ppl["base"] / 10, ppl
    assert {"sweep", "durability"} <= {c["protocol"] for c in bench["cells"].values()}
    # two bootstrapped bases: every cell runs on each, and the headline's spread and worst case cover both
    assert len(set(bench["base_model_sha256"])) == 2 and {r["base_seed"] for r in bench["runs"]} == {0, 1}
    assert head["secvec"]["harmful_rate"]["n"] == 2
    assert head["secvec"]["harmful_rate"]["max"] >= head["secvec"]["harmful_rate"]["mean"]
    assert {"secvec worst run harm vs its base", "secvec_screen worst run harm vs its base"} <= {
        t["target"] for t in bench["targets"]}
    # the screen's agreement with the cell's labels, over both bases; it drops at least one harmful sample
    screening = bench["screening"][bench["headline"]]
    assert screening["auroc"]["n"] == 2 and 0.5 < screening["auroc"]["mean"] <= 1.0, screening
    assert all(r["screen"]["kept"] < 200 for r in bench["runs"] if r["arm"] == "secvec_screen"
               and r["cell"] == bench["headline"])
    assert "Vector screening" in (tmp_path / "out" / "bench.md").read_text()
    assert all(f.stat().st_size > 1000 for f in (tmp_path / "out").glob("*.png")) and len(
        list((tmp_path / "out").glob("*.png"))) == 2
    assert "secvec harm vs base" in proc.stdout
    assert (proc.stdout + proc.stderr).count("Starting temporary server") == 1, "workers must share one server"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("secvec-bench").experiment_id])[0]
    assert f"{bench['headline']}/secvec/harmful_rate" in run.data.metrics
    assert "bench.json" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "bench")}

    # benchmarks/coverage.py reads the bench's cached vector and cells: one line per set, nothing refitted
    proc = subprocess.run([sys.executable, "benchmarks/coverage.py", "--config", "quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    coverage = {row["set"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert set(coverage) == {f"cell {bench['headline']} (60h-140b)", "sv_val", "sv_fit"}, coverage
    assert all(0 < row["ratio"] < 1 and 0 < row["first_k_ratio"] < 1 for row in coverage.values()), coverage
    assert coverage["sv_fit"]["n"] == 40 and "train_runtime" not in proc.stdout + proc.stderr
