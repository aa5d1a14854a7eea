"""The run report: report.json, its markdown summary, and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from secvec.gate import gate_coverage
from secvec.refs import DataRef, ModelRef, VectorRef

METRICS = ("harmful_rate", "harmful_refusal_rate", "over_refusal_rate", "utility", "perplexity",
           "task_answer_rate_harmful")  # the last: replies to harmful prompts that are a task answer (collapse)


def public_metrics(metrics: dict | None) -> dict | None:
    """The metrics that go into the report (sample replies go to samples.json, weight hashes to the registry)."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k not in ("samples", "weights_sha256")}


def build_report(name: str, data: DataRef, base: ModelRef, bootstrapped: bool, vector: VectorRef,
                 metrics: dict[str, dict | None], decision: dict, thresholds: dict, registered: dict | None,
                 strip_check: dict, coverage: dict[str, dict | None], timings: dict[str, float],
                 screen: dict | None, runtime: dict, mlflow: dict, out: Path) -> dict:
    """report.json of one pipeline run: lineage, the base / clean / plain metrics, the gate and the registry."""
    return {
        "config": name,
        "dataset_md5": data.md5,
        "counts": data.counts,
        "base_model": {"dir": base.dir, "sha256": base.sha256, "bootstrapped": bootstrapped},
        "vector_sha256": vector.sha256,
        **{label: public_metrics(metrics.get(label)) for label in ("base", "clean", "plain")},
        "gate": {**{k: decision[k] for k in ("passed", "reasons", "checks")}, "thresholds": thresholds},
        "registered": registered,
        "strip_check": strip_check,
        "vector_coverage": gate_coverage(coverage),
        "vector_coverage_detail": coverage,
        "screen": screen,
        "timings_s": timings,
        "runtime": runtime,
        "mlflow": mlflow,
        "report_path": str(out / "report.json"),
    }


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(models: dict[str, dict | None]) -> list[dict]:
    """Rows `{metric, <model>: value, ...}` for the models that were evaluated."""
    present = {name: m for name, m in models.items() if m}
    return [{"metric": k, **{name: m.get(k) for name, m in present.items()}} for k in METRICS]


def markdown(report: dict) -> str:
    """Human summary of a report: gate decision, metrics table, vector coverage, strip check."""
    gate = report["gate"]
    rows = metrics_table({k: report.get(k) for k in ("base", "plain", "clean")})
    names = [k for k in rows[0] if k != "metric"]
    lines = [
        f"# secvec run: gate {'PASSED' if gate['passed'] else 'FAILED'}",
        "",
        f"dataset md5 `{report['dataset_md5']}`",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(f"| {r['metric']} | " + " | ".join(_fmt(r[n]) for n in names) + " |" for r in rows),
        "",
        "`plain` is the same fine-tuning without the security vector (reference only, never registered).",
        "",
    ]
    cov = report.get("vector_coverage") or {}
    if cov:
        lines += [(f"Vector coverage on the fine-tuning set's harmful samples: loss on {_fmt(cov.get('loss_on'))}, "
                  f"off {_fmt(cov.get('loss_off'))}, ratio {_fmt(cov.get('ratio'))} "
                  f"(first {cov.get('first_k')} tokens: {_fmt(cov.get('first_k_ratio'))})."), ""]
    if screen := report.get("screen"):
        quality = ", ".join(f"{k} {_fmt(screen.get(k))}" for k in ("auroc", "precision", "recall"))
        kept = f"; {screen['kept']} kept for guarded fine-tuning." if "kept" in screen else "."
        lines += [(f"Vector screen ({screen['mode']}): {screen['flagged']} of {screen['n']} fine-tuning samples score "
                  f"above {_fmt(screen['threshold'])} (against their labels: {quality}){kept}"), ""]
        lines += ["| id | score | labelled harmful |", "|---|---|---|",
                  *(f"| {t['id']} | {t['score']:.3f} | {t['is_harmful']} |" for t in screen["top"][:10]), ""]
    strip = report.get("strip_check") or {}
    if strip:
        lines += [(f"Strip check: {len(strip.get('adapter_keys', []))} adapter keys, "
                  f"max |diff| {strip.get('max_abs_diff', float('nan')):.2e}."), ""]
    lines += ["## Gate", *(f"- {'ok' if c['passed'] else 'FAIL'}: {c['name']} = {_fmt(c['value'])} "
                           f"(limit {_fmt(c['limit'])})" for c in gate.get("checks", []))]
    if gate["reasons"]:
        lines += ["", "Rejected because:", *(f"- {r}" for r in gate["reasons"])]
    reg = report.get("registered")
    lines += ["", f"Registered: {reg['name']} version {reg['version']} (aliases {', '.join(reg['aliases'])})"
              if reg else "Registered: nothing"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write `report.json` and `report.md` into out_dir; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    (out / "report.md").write_text(markdown(report))
    return out / "report.json"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here; imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_rate_plot(fig, ax, path: str | Path, xlabel: str, ylabel: str, dpi: int = 110) -> Path:
    """Label a plot of rates (0 to 1), add its legend, save it to `path` and free it."""
    plt = pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_probe_losses(arms: dict[str, Sequence[dict]], path: str | Path) -> Path:
    """Loss of harmful vs benign samples during fine-tuning, per arm (e.g. plain vs guarded).

    For a guarded arm the curve drawn is the vector-off loss: what the clean backbone has learned.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, records in arms.items():
        if not records:
            continue
        steps = [r["step"] for r in records]
        for kind, style in (("harmful", "-"), ("benign", "--")):
            key = f"{kind}_loss_vector_off" if f"{kind}_loss_vector_off" in records[0] else f"{kind}_loss"
            ax.plot(steps, [r[key] for r in records], style, label=f"{arm}: {kind}")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean response loss (vector off)")
    ax.set_title("Harmful vs benign samples during fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_metrics(models: dict[str, dict | None], path: str | Path) -> Path:
    """Grouped bars of the rate metrics for base / plain / clean."""
    plt = pyplot()

    present = {name: m for name, m in models.items() if m}
    keys = [k for k in METRICS if k != "perplexity"]
    width = 0.8 / max(len(present), 1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, m) in enumerate(present.items()):
        values = [m.get(k) or 0.0 for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], values, width, label=name)
    ax.set_xticks([j + width * (len(present) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylim(0, 1.05)
    ax.set_title("Metrics: base vs clean (plain fine-tuning for reference)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
