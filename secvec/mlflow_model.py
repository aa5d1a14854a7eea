"""Package a clean model directory as an MLflow 3 model of the transformers flavor, served as a chat model.

What `mlflow.transformers.load_model`, `mlflow.pyfunc.load_model` and `mlflow models serve` read: an
`MLmodel` file (flavors `transformers` and `python_function`, task `llm/v1/chat` with its OpenAI-style chat
signature), pinned pip requirements, the tokenizer (with its chat template) and a model card. The weight
files under `model/` are the very files that were hash-checked, not a re-serialisation of them.

Offline by construction, whatever HF_HUB_OFFLINE says: the card is ours, so MLflow never fetches one from
the Hub; the model is loaded from an absolute path, which the Hub client rejects as a repo id before any
request (MLflow's license lookup asks the Hub about `name_or_path`); the requirements are given, so MLflow
neither infers them (a subprocess that loads the model) nor validates an example by running it.
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAT_TASK = "llm/v1/chat"
WEIGHTS_SUBDIR = "model"  # the flavor's `model_binary`: the checkpoint folder inside an MLflow model
CARD_FILE = "model_card.md"  # written by the flavor from the card we pass
# What loading and serving import; pinned to this environment's versions so a deployment gets the same code.
REQUIREMENTS = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate", "jinja2")
INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "Sort these numbers: 3 1 2"}], "max_tokens": 32}
LINEAGE = (("base model sha256", "base_model_sha256"), ("security vector sha256", "vector_sha256"),
           ("dataset md5", "dataset_md5"), ("git sha", "git_sha"))


def pinned_requirements(packages: tuple[str, ...] = REQUIREMENTS) -> list[str]:
    """`name==version` of each package as installed here.

    A local version label (torch's `+cpu`) names a build index rather than a release PyPI knows, so it is
    dropped, as MLflow does for the requirements it infers.
    """
    from packaging.version import Version

    return [f"{name}=={Version(installed_version(name)).public}" for name in packages]


def weights_dir(local_model: str | Path) -> Path:
    """Where the weight files of a downloaded registered version are: `model/` inside an MLflow model, the
    folder itself for a version registered as plain files (before the transformers flavor)."""
    root = Path(local_model)
    return root / WEIGHTS_SUBDIR if (root / "MLmodel").is_file() else root


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _tag(tags: dict[str, Any], key: str) -> Any:
    value = tags.get(key)
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)  # a tag stored as JSON (see registry._tag_value)
    return value


def card_text(name: str, tags: dict[str, Any], weights: dict[str, str]) -> str:
    """The model card: Hub-style YAML front matter, then lineage, gate results, thresholds and metrics."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [secvec, security-vector, safety-gated]", "---", "", f"# {name}", "",
             ("The clean backbone of a secvec run: fine-tuned with the security vector active and frozen, then "
              "stripped of it. Registered because it passed the release gate below."), "", "## Lineage", "",
             "| what | value |", "|---|---|"]
    lines += [f"| {label} | `{tags[key]}` |" for label, key in LINEAGE if tags.get(key)]
    for dataset in _tag(tags, "datasets") or []:
        lines.append(f"| dataset input `{dataset.get('context')}` | {dataset.get('name')}, digest "
                     f"`{dataset.get('digest')}` |")
    gate = _tag(tags, "gate")
    if gate:
        lines += ["", f"## Gate: {'passed' if gate.get('passed') else 'FAILED'}", "",
                  "| check | value | limit | passed |", "|---|---|---|---|"]
        lines += [f"| {c.get('name')} | {c.get('value')} | {c.get('limit')} | {c.get('passed')} |"
                  for c in gate.get("checks", [])]
        lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    for title, key in (("Thresholds", "thresholds"), ("Metrics of this model", "metrics")):
        if tags.get(key) is not None:
            lines += ["", f"## {title}", "", "```json", json.dumps(_tag(tags, key), indent=2, sort_keys=True),
                      "```"]
    lines += ["", "## Weight files (sha256, as evaluated)", ""]
    lines += [f"- `{WEIGHTS_SUBDIR}/{path}`: `{digest}`" for path, digest in sorted(weights.items())]
    lines += ["", "## Use", "", "```python", "import mlflow", "",
              f'chat = mlflow.pyfunc.load_model("models:/{name}@champion")',
              f"chat.predict({_json(INPUT_EXAMPLE)})", "```", ""]
    return "\n".join(lines)


def build_chat_model(checked_dir: Path, out_dir: Path, card: str, mlflow_model=None) -> Path:
    """Write the MLflow transformers model of the checkpoint `checked_dir` to `out_dir`, then MOVE
    `checked_dir` in as its `model/` folder.

    MLflow 3.17 cannot save a checkpoint folder as-is under transformers 5 (its local-checkpoint mode fails
    on `pipelines.check_task`), so the flavor saves the loaded model, and its re-serialised weights (resharded
    at 500 MB) are replaced by the checked files: what gets served is exactly what was evaluated.

    Args:
        checked_dir: a hash-checked private copy of the model directory (it is moved, not copied).
        mlflow_model: an `mlflow.models.Model` carrying the run and logged-model ids, or None.
    """
    import mlflow.transformers
    from huggingface_hub import ModelCard

    from secvec.models import load_causal_lm

    checked_dir = checked_dir.resolve()  # an absolute path is never taken for a Hub repo id (see module doc)
    model, tokenizer = load_causal_lm(checked_dir)
    mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, path=str(out_dir), task=CHAT_TASK,
                                   model_card=ModelCard(card), pip_requirements=pinned_requirements(),
                                   input_example=INPUT_EXAMPLE, mlflow_model=mlflow_model)
    del model
    # The flavor's fallback text sends readers to huggingface.co/<our temp path>; say what is known instead.
    (out_dir / "LICENSE.txt").write_text(
        "This model is a fine-tuned copy of its base model (sha256 in model_card.md): the base model's license "
        "and that of the fine-tuning data apply. secvec adds no terms.\n", encoding="utf-8")
    shutil.rmtree(out_dir / WEIGHTS_SUBDIR)
    shutil.move(str(checked_dir), out_dir / WEIGHTS_SUBDIR)
    log.info("mlflow model: %s (task %s) with the checked weights of %s", out_dir, CHAT_TASK, checked_dir)
    return out_dir
