"""Does the vector cover more of the attack as the model grows? Coverage and harm per preset, as a plot.

Reads the report.json of finished `secvec run --config X` runs (outputs/X/report.json by default), counts the
base's parameters from its safetensors headers, and prints one JSON line per run: parameters, vector coverage
(loss with the vector on / off; 1.0 = covers nothing) on the fine-tuning set's harmful samples and on the
held-out `sv_val` pairs, over the whole reply and its first tokens, and the harmful rate of base, plain and
clean. Then plots coverage and clean-minus-base harm against parameters (log scale).

The presets differ in more than size (synthetic world vs public data, sample counts, judge): each point is that
preset's own protocol, so the plot shows how the method fares at each scale as shipped, not a controlled
scaling law.

usage: python benchmarks/scale.py [--runs micro default public smollm2-aligned] [--out docs/img/scale.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parameters(model_dir: str | Path) -> int:
    """Parameter count of a saved model from its safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def point(name: str, report: dict) -> dict:
    """One run's figures for the scale plot."""
    detail = report.get("vector_coverage_detail") or {"finetune": report["vector_coverage"]}

    def rate(model: str) -> float | None:
        return (report.get(model) or {}).get("harmful_rate")

    row = {"run": name, "config": report["config"], "parameters": parameters(report["base_model"]["dir"]),
           "harmful_base": rate("base"), "harmful_plain": rate("plain"), "harmful_clean": rate("clean")}
    for split, cov in detail.items():
        row[f"coverage_{split}"], row[f"coverage_{split}_first_k"] = cov["ratio"], cov["first_k_ratio"]
    return row


def plot(rows: list[dict], out: Path) -> None:
    from secvec.report import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["parameters"] for r in rows]
    for key, label in (("coverage_finetune", "attack's harmful samples"), ("coverage_finetune_first_k",
                       "same, first tokens"), ("coverage_validation", "held-out sv_val pairs")):
        ys = [r.get(key) for r in rows]
        left.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], "o--", label=label)
    left.set(xscale="log", ylim=(0, 1.05), xlabel="base parameters", ylabel="loss with vector on / off",
             title="vector coverage (lower covers more)")
    left.legend(fontsize=8)
    for key, label in (("harmful_plain", "plain"), ("harmful_clean", "secvec (clean)")):
        pts = [(r["parameters"], r[key] - r["harmful_base"]) for r in rows
               if r.get(key) is not None and r["harmful_base"] is not None]
        right.plot([p[0] for p in pts], [p[1] for p in pts], "o--", label=label)
    right.axhline(0.05, color="grey", linestyle=":", label="target: base + 0.05")
    right.set(xscale="log", ylim=(-0.05, 1.05), xlabel="base parameters", ylabel="harmful rate - base's",
              title="harm learned from the fine-tuning data")
    right.legend(fontsize=8)
    for ax in (left, right):
        for r in rows:
            ax.annotate(r["run"], (r["parameters"], ax.get_ylim()[0]), fontsize=7, rotation=90,
                        xytext=(2, 4), textcoords="offset points")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["micro", "default", "public", "smollm2-aligned"],
                        help="run folders under outputs/ (or paths to them)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "scale.png")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        path = Path(run) if Path(run).is_dir() else ROOT / "outputs" / run
        if not (path / "report.json").is_file():
            print(json.dumps({"run": run, "skipped": f"no report.json in {path}: run `secvec run --config {run}`"}))
            continue
        rows.append(point(path.name, json.loads((path / "report.json").read_text())))
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: r["parameters"])
    if rows:
        plot(rows, args.out)
        print(json.dumps({"plot": str(args.out)}))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
