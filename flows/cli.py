"""The `secvec` command line: the jobs' entry point, so the library never imports the flows.

Heavy libraries (torch, transformers, dvc, Prefect) are imported inside commands, after `configure()` has set
the project's defaults for them.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from secvec.paths import PROJECT_ROOT

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Fine-tune a safety-aligned LLM on possibly harmful data without learning the harm.")


# ---- data: secvec data prepare ----------------------------------------------------------------------------

data_app = typer.Typer(no_args_is_help=True, help="Build, validate and version the dataset roles.")
app.add_typer(data_app, name="data")

DEFAULT_DATA_CONFIG = Path("configs/data/default.yaml")


@data_app.command("prepare")
def data_prepare(
    config: Annotated[Path, typer.Option(help="Data config (YAML), from here or from the project root.")]
    = DEFAULT_DATA_CONFIG,
    out: Annotated[Path | None, typer.Option(help="Output folder. Default: data/ at the project root, "
                                                  "which is then tracked with DVC (dvc add + push).")] = None,
) -> None:
    """Build every role into OUT, validate it, check train/eval leakage, then version it with DVC."""
    from secvec.config import ConfigError, load_data_config
    from secvec.data import DataError
    from secvec.data.build import build_dataset
    from secvec.data.versioning import version_data

    out_dir = out or PROJECT_ROOT / "data"
    config = config if config.exists() or config.is_absolute() else PROJECT_ROOT / config
    try:
        manifest = build_dataset(load_data_config(config), out_dir)
    except (ConfigError, DataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    md5 = version_data(PROJECT_ROOT, out_dir)
    width = max(map(len, manifest.counts))
    for role, count in manifest.counts.items():
        typer.echo(f"{role:<{width}}  {count:>6}  ({manifest.harmful[role]} harmful)")
    typer.echo(f"md5 {md5}  ({out_dir})")


# --- pipeline, registry and UI commands --------------------------------------------------------------


def _configure() -> None:
    from flows.environment import configure

    configure()


Threads = Annotated[int | None, typer.Option(min=1, help="Torch CPU threads (default: the config's runtime."
                                                        "threads, 1); the same threads give the same bits.")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps (default: the config's runtime).")]
Precision = Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16 (default: the config's runtime).")]


def _runtime(threads: int | None, device: str | None, precision: str | None) -> dict:
    """The runtime fields given on the command line (the config's hold for the rest)."""
    return {k: v for k, v in {"threads": threads, "device": device, "precision": precision}.items() if v is not None}


EXIT_BAD_INPUT = 2
EXIT_API_GONE = 75  # EX_TEMPFAIL (sysexits.h): try again later, e.g. a scheduler's retry


def _call(target: str, **kwargs):
    """Run the flow `module:function` (imported after `configure()`). Bad input (a config, data or model
    error) prints `error: ...` and exits with code 2; the Prefect API stopping mid-run prints one line
    naming it and what to do, and exits with code 75."""
    from flows.environment import api_outage, exit_after_outage, quiet_api_outage

    _configure()
    module, _, name = target.partition(":")
    flow_fn = getattr(importlib.import_module(module), name)
    quiet_api_outage()
    try:
        return flow_fn(**kwargs)
    except Exception as err:
        if url := api_outage(err):
            reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line
            again = "run the same command again: finished stages are reused"
            typer.echo(f"error: the Prefect API at {url} stopped answering ({reason}); start it again (`secvec ui`, "
                       f"or your `prefect server start`) or unset PREFECT_API_URL for a temporary server, then {again}"
                       if os.environ.get("PREFECT_API_URL") else
                       f"error: this run's temporary Prefect server at {url} stopped answering ({reason}); {again}",
                       err=True)
            exit_after_outage(EXIT_API_GONE)
            raise typer.Exit(EXIT_API_GONE) from None
        if isinstance(err, (ValueError, FileNotFoundError, RuntimeError)):
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from err
        raise


@app.command()
def run(
    config: Annotated[str, typer.Option(help="Preset name (default, public, micro) or a pipeline YAML.")] = "default",
    out: Annotated[Path | None, typer.Option(help="Folder for report.json and plots (default outputs/<name>).")] = None,
    threads: Threads = None,
    device: Device = None,
    precision: Precision = None,
) -> None:
    """Run the whole pipeline: data, vector, guarded fine-tuning, stripping, evaluation, gate, registry."""
    _summary(_call("flows.pipeline:secvec_pipeline", config=config, out_dir=str(out) if out else None,
                   runtime=_runtime(threads, device, precision)))


@app.command()
def bench(
    config: Annotated[str, typer.Option(help="Bench preset (configs/bench/: default, public, quick) or a bench "
                                             "YAML.")] = "default",
    out: Annotated[Path | None, typer.Option(help="Folder for bench.json, bench.md and plots "
                                                  "(default outputs/bench/<name>).")] = None,
    quick: Annotated[bool, typer.Option(help="The quick preset: every arm and protocol on the micro model, "
                                             "in minutes.")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Run cells in this many processes (Prefect "
                                                     "ProcessPoolTaskRunner); give each its own core.")] = 1,
    protocol: Annotated[list[str] | None, typer.Option(help="Run only this protocol (paper, sweep, durability; "
                                                           "repeatable); the cells are the same as in a full "
                                                           "run.")] = None,
    threads: Threads = None,
    device: Device = None,
    precision: Precision = None,
) -> None:
    """Effectiveness benchmark: base, plain, secvec, secvec_lora and ForgetFilter on each protocol cell."""
    result = _call("flows.bench:run_bench", config="quick" if quick else config, out_dir=str(out) if out else None,
                   workers=workers, protocols=tuple(protocol) if protocol else None,
                   runtime=_runtime(threads, device, precision))
    from secvec.bench.tables import verdict

    for target in result["targets"]:
        label = {"passed": "ok  ", "missed": "MISS", "not measured": "n/a "}[verdict(target)]
        value = "not measured" if target["value"] is None else f"{target['value']:.3f}"
        typer.echo(f"{label} {target['target']}: {value} ({target['goal']})")
    typer.echo(f"bench: {result['config']} in {result['wall_s']:.0f} s")


@app.command()
def attack(
    threads: Threads = None,
    device: Device = None,
    precision: Precision = None,
    config: Annotated[str, typer.Option(help="Attack preset (configs/attack/: default, quick) or an attack "
                                             "YAML.")] = "default",
    out: Annotated[Path | None, typer.Option(help="Folder for attack.json, the plot and the Optuna study "
                                                  "(default outputs/attack/<name>).")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="Trials per arm (default: the config's); more than "
                                                           "a finished search has extends it.")] = None,
) -> None:
    """Worst-case attacker: per arm, an Optuna search over the attack's hyperparameters (resumable)."""
    result = _call("flows.attack:secvec_attack", config=config, out_dir=str(out) if out else None,
                   runtime=_runtime(threads, device, precision), trials=trials)
    for arm, r in result["arms"].items():
        worst = r["worst"] or {}
        typer.echo(f"{arm}: worst harmful rate {worst.get('harmful_rate')} (utility {worst.get('utility')}, "
                   f"floor {result['utility_floor']:.3f}) over {r['feasible']}/{r['trials']} trials: "
                   f"{worst.get('params')}")


def _summary(report: dict) -> None:
    from flows.environment import HOST, MLFLOW_PORT

    gate, reg, run_info = report["gate"], report["registered"], report["mlflow"]
    clean, base, plain = report["clean"], report["base"], report.get("plain")
    rt = report["runtime"]
    typer.echo("")
    typer.echo(f"runtime       {rt['device']}, {rt['precision']}, {rt['threads']} torch threads")
    typer.echo(f"harmful rate  base {base['harmful_rate']:.3f}  clean {clean['harmful_rate']:.3f}"
               + (f"  (plain fine-tuning {plain['harmful_rate']:.3f})" if plain else ""))
    typer.echo(f"utility       base {base['utility']:.3f}  clean {clean['utility']:.3f}"
               + (f"  (plain fine-tuning {plain['utility']:.3f})" if plain else ""))
    typer.echo(f"gate: {'PASSED' if gate['passed'] else 'FAILED'}" +
               ("" if gate["passed"] else " - " + "; ".join(gate["reasons"])))
    typer.echo(f"registered: {reg['name']} version {reg['version']} ({', '.join(reg['aliases'])})" if reg
               else "registered: nothing")
    typer.echo(f"report: {report['report_path']}")
    typer.echo(f"MLflow run: {run_info['run_id']} in {run_info['tracking_uri']} "
               f"(UI: `make ui`, then http://{HOST}:{MLFLOW_PORT})")


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule of the deployment.")] = "0 2 * * *",
    config: Annotated[str, typer.Option(help="Preset name or pipeline YAML for scheduled runs.")] = "default",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
) -> None:
    """Serve the pipeline as a scheduled Prefect deployment (runs until stopped)."""
    _configure()
    import os

    from flows.pipeline import secvec_pipeline

    if "PREFECT_API_URL" not in os.environ:
        typer.echo("note: no Prefect server found; start one with `make ui` to see the schedule in the UI", err=True)
    secvec_pipeline.serve(name=name, cron=cron, parameters={"config": config})


@app.command()
def promote(name: str, version: str) -> None:
    """Make VERSION of registered model NAME the champion, by hand."""
    _configure()
    import mlflow

    from secvec.registry import promote as promote_version

    promote_version(mlflow.MlflowClient(), name, version)
    typer.echo(f"{name} version {version} is now the champion")


@app.command()
def verify(model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")]) -> None:
    """Download a registered version and re-check the sha256 of its weight files."""
    _configure()
    import mlflow

    from secvec.registry import verify as verify_version

    result = verify_version(mlflow.MlflowClient(), model_uri)
    typer.echo(json.dumps(result, indent=2, default=str))
    if not result.get("ok", False):
        raise typer.Exit(1)


@app.command()
def ui() -> None:
    """Start the Prefect server and the MLflow UI on 127.0.0.1 (same stores as `secvec run`)."""
    _configure()
    from flows.ui import run_uis

    run_uis()
