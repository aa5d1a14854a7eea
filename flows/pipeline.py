"""The main job: prepare data, fit the security vector, guarded fine-tune, strip, evaluate, gate, register."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from flows.environment import PROJECT_ROOT, configure

configure()

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from secvec.config import PipelineConfig, load_pipeline_config
from secvec.models import check_model_dir, hash_model_dir
from secvec.report import markdown, metrics_table, plot_metrics, plot_probe_losses, write_report
from tasks import tracking
from tasks.bootstrap import bootstrap
from tasks.common import fresh, stage_dir
from tasks.data import log_dataset_to_mlflow, prepare_data
from tasks.evaluate import evaluate, with_judge
from tasks.finetune import finetune_backbone
from tasks.register import gate, register
from tasks.strip import strip
from tasks.vector import check_coverage, fit_security_vector


@contextmanager
def stage(name: str, timings: dict[str, float]):
    get_run_logger().info("==> %s", name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def resolve_base(cfg: PipelineConfig, data: dict, cache: Path, timings: dict) -> dict:
    """The configured local model directory, or the tiny aligned base bootstrapped (and cached) here."""
    if cfg.base_model:
        model_dir = check_model_dir(cfg.base_model, allow_pickle=cfg.allow_pickle)
        return {"model_dir": str(model_dir), "model_sha256": hash_model_dir(model_dir), "bootstrapped": False}
    boot_cfg = cfg.bootstrap.model_dump()
    out = stage_dir(cache, "base", data["md5"], boot_cfg)
    with stage("bootstrap", timings):
        base = fresh(bootstrap, out)(data["data_dir"], data["md5"], boot_cfg, str(out))
    tracking.log_history("bootstrap", base["history"])
    return {**base, "bootstrapped": True}


@flow(name="secvec-pipeline")
def secvec_pipeline(config: str = "default", out_dir: str | None = None) -> dict:
    """Run the whole pipeline for a config file or preset name; returns the report (also report.json)."""
    cfg = load_pipeline_config(config)
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / cfg.name
    cache = Path(os.environ.get("SECVEC_CACHE", PROJECT_ROOT / ".cache"))
    timings: dict[str, float] = {}
    with tracking.start_run(cfg.experiment, PROJECT_ROOT, run_name=cfg.name) as run:
        tracking.log_config(cfg.model_dump(mode="json"))
        with stage("prepare_data", timings):
            data = prepare_data(str(cfg.data), str(cfg.data_dir) if cfg.data_dir else None)
        log_dataset_to_mlflow(data["data_dir"], data["md5"])
        md5, data_dir = data["md5"], data["data_dir"]

        base = resolve_base(cfg, data, cache, timings)
        base_dir, base_sha = base["model_dir"], base["model_sha256"]

        vec_cfg = cfg.vector.model_dump()
        vec_out = stage_dir(cache, "vector", base_sha, md5, vec_cfg)
        with stage("fit_vector", timings):
            vector = fresh(fit_security_vector, vec_out)(base_dir, base_sha, data_dir, md5, vec_cfg, str(vec_out))
        tracking.log_history("vector", vector["history"])
        with stage("vector_coverage", timings):
            coverage = check_coverage(base_dir, base_sha, vector["vector_dir"], vector["vector_sha256"], data_dir,
                                      md5, cfg.coverage_first_k)

        ft_cfg = cfg.finetune.model_dump()
        ft_out = stage_dir(cache, "guarded", base_sha, vector["vector_sha256"], md5, ft_cfg)
        with stage("guarded_finetune", timings):
            guarded = fresh(finetune_backbone, ft_out)(base_dir, base_sha, vector["vector_dir"],
                                                       vector["vector_sha256"], data_dir, md5, ft_cfg, str(ft_out))
        tracking.log_history("finetune", guarded["history"])
        tracking.log_history("finetune_probe", guarded["probes"])
        strip_out = stage_dir(cache, "clean", ft_out.name)
        with stage("strip", timings):
            clean = fresh(strip, strip_out)(guarded["guarded_dir"], ft_out.name, data_dir, md5, str(strip_out))

        eval_cfg = with_judge(cfg.eval.model_dump(), cfg.data, cache)
        with stage("evaluate", timings):
            base_metrics = evaluate("base", base_dir, base_sha, data_dir, md5, eval_cfg)
            clean_metrics = evaluate("clean", clean["model_dir"], clean["model_sha256"], data_dir, md5, eval_cfg)
        plain_metrics, plain = None, None
        if cfg.plain_reference:
            plain_out = stage_dir(cache, "plain", base_sha, md5, ft_cfg)
            with stage("plain_reference", timings):
                plain = fresh(finetune_backbone, plain_out)(base_dir, base_sha, None, None, data_dir, md5,
                                                            {**ft_cfg, "mode": "full"}, str(plain_out))
                plain_metrics = evaluate("plain", plain["model_dir"], plain["model_sha256"], data_dir, md5,
                                         eval_cfg)
            tracking.log_history("plain_probe", plain["probes"])

        vector_cov = coverage["finetune"] or coverage["validation"]
        with stage("gate", timings):
            decision = gate(base_metrics, clean_metrics, clean["strip_check"], vector_cov,
                            cfg.gate.model_dump())
        registered = None
        if decision["passed"]:
            tags = {"dataset_md5": md5, "vector_sha256": vector["vector_sha256"], "base_model_sha256": base_sha,
                    "git_sha": tracking.git_sha(PROJECT_ROOT), "thresholds": cfg.gate.model_dump(),
                    "metrics": {k: clean_metrics[k] for k in ("harmful_rate", "over_refusal_rate", "utility",
                                                              "perplexity")}}
            with stage("register", timings):
                registered = register(run.info.run_id, clean["model_dir"], cfg.registry.name, tags,
                                      clean_metrics["weights_sha256"], tags["metrics"],
                                      cfg.registry.champion.model_dump())

        report = {
            "config": cfg.name,
            "dataset_md5": md5,
            "counts": data.get("counts"),
            "base_model": {"dir": base_dir, "sha256": base_sha, "bootstrapped": base["bootstrapped"]},
            "vector_sha256": vector["vector_sha256"],
            "base": _public(base_metrics),
            "clean": _public(clean_metrics),
            "plain": _public(plain_metrics),
            "gate": {"passed": decision["passed"], "reasons": decision["reasons"], "checks": decision["checks"],
                     "thresholds": cfg.gate.model_dump()},
            "registered": registered,
            "strip_check": clean["strip_check"],
            "vector_coverage": vector_cov,
            "vector_coverage_detail": coverage,
            "timings_s": timings,
            "mlflow": {"run_id": run.info.run_id, "experiment": cfg.experiment,
                       "tracking_uri": mlflow.get_tracking_uri()},
            "report_path": str(out / "report.json"),
        }
        samples = {k: m["samples"] for k, m in (("base", base_metrics), ("clean", clean_metrics),
                                                 ("plain", plain_metrics)) if m}
        _publish(report, samples, guarded, plain, out)
    return report


def _public(metrics: dict | None) -> dict | None:
    """The metrics that go into the report (samples stay in the MLflow artifacts)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k not in ("samples", "weights_sha256")}


def _publish(report: dict, samples: dict, guarded: dict, plain: dict | None, out: Path) -> None:
    """Write report, sample replies and plots, and show them in MLflow and the Prefect UI."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    models = {k: report[k] for k in ("base", "plain", "clean")}
    plot_probe_losses({"guarded (clean view)": guarded["probes"], "plain": plain["probes"] if plain else []},
                      out / "finetune_losses.png")
    plot_metrics(models, out / "metrics.png")
    path = write_report(report, out)
    for name, metrics in models.items():
        tracking.log_model_metrics(name, metrics)
    mlflow.set_tags({"dataset_md5": report["dataset_md5"], "vector_sha256": report["vector_sha256"],
                     "gate": "passed" if report["gate"]["passed"] else "rejected",
                     "gate_reasons": "; ".join(report["gate"]["reasons"])[:5000]})
    mlflow.log_artifacts(str(out), artifact_path="report")
    create_markdown_artifact(markdown(report), key="secvec-gate-report", description="secvec gate report")
    create_table_artifact(metrics_table(models), key="secvec-metrics", description="base / plain / clean metrics")
    get_run_logger().info("report: %s", path)
