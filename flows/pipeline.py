"""The main job: prepare data, fit the security vector, guarded fine-tune, strip, evaluate, gate, register."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from secvec.config import PipelineConfig, RuntimeConfig, load_pipeline_config, with_runtime
from secvec.convert import gguf_sha256, packaged_gguf
from secvec.device import start
from secvec.gate import gate_coverage
from secvec.models import check_model_dir
from secvec.paths import PROJECT_ROOT
from secvec.refs import DataRef, FinetuneResult, ModelRef
from secvec.registry import version_tags
from secvec.report import build_report, markdown, metrics_table, plot_metrics, plot_probe_losses, write_report
from tasks import tracking
from tasks.align import align
from tasks.bootstrap import bootstrap
from tasks.convert import convert
from tasks.data import log_dataset_to_mlflow, prepare_data
from tasks.evaluate import evaluate, with_judge
from tasks.finetune import finetune_backbone, guarded_data, plain_reference
from tasks.register import gate, register
from tasks.screen import screen
from tasks.strip import strip
from tasks.vector import check_coverage, fit_security_vector


@contextmanager
def stage(name: str, timings: dict[str, float]):
    get_run_logger().info("==> %s", name)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def resolve_base(cfg: PipelineConfig, data: DataRef, runtime: RuntimeConfig, timings: dict) -> tuple[ModelRef, bool]:
    """The configured local model directory or a GGUF file converted (and cached) to one, aligned on `align`
    first when `cfg.align` says so (cached), or the tiny aligned base bootstrapped (and cached) here."""
    if cfg.base_model or cfg.base_gguf:
        if cfg.base_model:
            given = ModelRef.of(check_model_dir(cfg.base_model, allow_pickle=cfg.allow_pickle))
        else:
            src = cfg.base_gguf
            gguf = packaged_gguf(src.package, src.file) if src.package else src.path
            with stage("convert_gguf", timings):
                converted = convert(gguf_sha256(gguf), str(gguf))
            # then like any local model directory: checked, hashed, loaded by models.load_causal_lm downstream
            given = ModelRef.of(check_model_dir(converted.dir))
        if cfg.align is None:
            return given, False
        with stage("align", timings):
            aligned = align(given, data, cfg.align, runtime)
        tracking.log_history("align", aligned.history)
        return aligned.model, False
    with stage("bootstrap", timings):
        base = bootstrap(data, cfg.bootstrap, runtime)
    tracking.log_history("bootstrap", base.history)
    return base.model, True


@flow(name="secvec-pipeline")
def secvec_pipeline(config: str = "default", out_dir: str | None = None, runtime: dict | None = None) -> dict:
    """Run the whole pipeline for a config file or preset name; returns the report (also report.json).
    `runtime` overrides fields of the config's runtime (device, precision, threads)."""
    cfg = with_runtime(load_pipeline_config(config), runtime or {})
    out = Path(out_dir) if out_dir else PROJECT_ROOT / "outputs" / cfg.name
    timings: dict[str, float] = {}
    rt, hw = start(cfg.runtime)
    with tracking.start_run(cfg.experiment, PROJECT_ROOT, run_name=cfg.name) as run:
        tracking.log_config(cfg.model_dump(mode="json"))
        tracking.log_runtime(hw.describe())
        with stage("prepare_data", timings):
            data = prepare_data(str(cfg.data), str(cfg.data_dir) if cfg.data_dir else None)
        log_dataset_to_mlflow(data)
        base, bootstrapped = resolve_base(cfg, data, rt, timings)
        with stage("fit_vector", timings):
            fitted = fit_security_vector(base, data, cfg.vector, rt)
        tracking.log_history("vector", fitted.history)
        with stage("vector_coverage", timings):
            coverage = check_coverage(base, fitted.vector, data, cfg.coverage_first_k, rt)
        screened = None
        if cfg.screen.mode != "off":
            with stage("screen", timings):
                screened = screen(base, fitted.vector, data, cfg.screen, rt)
        train_data = screened.data if screened else data  # screened only in `drop` mode
        with stage("guarded_finetune", timings):
            train_data = guarded_data(train_data, data, cfg.finetune)  # + the alignment replay, if configured
            guarded = finetune_backbone(base, fitted.vector, train_data, cfg.finetune, rt)
        tracking.log_history("finetune", guarded.history)
        tracking.log_history("finetune_probe", guarded.probes)
        with stage("strip", timings):
            clean = strip(guarded.guarded, train_data, rt)

        eval_cfg = with_judge(cfg.eval, cfg.data, rt)
        with stage("evaluate", timings):
            metrics = {"base": evaluate("base", base, data, eval_cfg, rt),
                       "clean": evaluate("clean", clean.model, data, eval_cfg, rt)}
        plain = None
        if cfg.plain_reference:
            with stage("plain_reference", timings):
                plain = finetune_backbone(base, None, data, plain_reference(cfg.finetune), rt)
                metrics["plain"] = evaluate("plain", plain.model, data, eval_cfg, rt)
            tracking.log_history("plain_probe", plain.probes)

        with stage("gate", timings):
            decision = gate(metrics["base"], metrics["clean"], clean.strip_check, gate_coverage(coverage), cfg.gate)
        registered = None
        if decision.passed:
            tags = version_tags(data.md5, fitted.vector.sha256, base.sha256, tracking.git_sha(PROJECT_ROOT),
                                cfg.gate.model_dump(), metrics["clean"], decision.model_dump())
            with stage("register", timings):
                registered = register(run.info.run_id, clean.model, cfg.registry.name, tags,
                                      metrics["clean"]["weights_sha256"], tags["metrics"], cfg.registry.champion)

        report = build_report(cfg.name, data, base, bootstrapped, fitted.vector, metrics, decision.model_dump(),
                              cfg.gate.model_dump(), registered, clean.strip_check, coverage, timings,
                              screened.report if screened else None, hw.describe(),
                              {"run_id": run.info.run_id, "experiment": cfg.experiment,
                               "tracking_uri": mlflow.get_tracking_uri()}, out)
        publish(report, {k: m["samples"] for k, m in metrics.items()}, guarded, plain, out)
    return report


def publish(report: dict, samples: dict, guarded: FinetuneResult, plain: FinetuneResult | None, out: Path) -> None:
    """Write report, sample replies and plots, and show them in MLflow and the Prefect UI."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    models = {k: report[k] for k in ("base", "plain", "clean")}
    plot_probe_losses({"guarded (clean view)": guarded.probes, "plain": plain.probes if plain else []},
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
    if screened := report["screen"]:
        tracking.log_model_metrics("screen", {k: v for k, v in screened.items() if k != "n"})
        create_table_artifact(screened["top"], key="secvec-screen", description=f"vector screen: {screened['flagged']} "
                              f"of {screened['n']} samples above {screened['threshold']:.3f}")
    get_run_logger().info("report: %s", path)
