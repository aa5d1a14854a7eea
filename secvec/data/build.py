"""The atomic build: every role from its preset and the user's sources, validated, leak-checked, then written.

`write_dataset` is the sole writer of a dataset folder: `<role>.jsonl` per role (one example per line, keys
sorted, UTF-8, `\\n` endings) and `manifest.json`, swapped in atomically so a crash leaves old or new.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from secvec.config import DataConfig
from secvec.data import public, sources, synthetic
from secvec.data.schema import ROLES, DataError, Manifest, check_leakage, load_role, validate_examples


def _label(out: Path) -> str:
    """How error messages name the output folder: relative to the working directory when inside it."""
    rel = os.path.relpath(out.absolute())
    return str(out) if rel.startswith("..") else rel


def _wanted(config: DataConfig, role: str) -> bool:
    s = config.sizes
    size = {"align": s.align_benign + s.align_harmful + s.align_lookalike, "finetune": config.n}.get(role)
    size = size if size is not None else getattr(s, role)
    return bool(size) or any(source.role == role for source in config.sources)


def _check_replaceable(out: Path, label: str) -> None:
    # The old folder is deleted on success: only ever a previous build (or nothing), never e.g. `secvec/`.
    if out.exists() and not (out / "manifest.json").is_file() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError.at(label, None, None, "exists and is not a dataset folder (no manifest.json): "
                           "refusing to replace it")


def _write_jsonl(path: Path, examples: Sequence[Mapping]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n")


def _replace_dir(new: Path, out: Path) -> None:
    """Swap the finished folder in by renames on one file system (a crash leaves old or new, never a mix)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


def write_dataset(roles: Mapping[str, Sequence[Mapping]], out_dir: str | Path, manifest: Manifest | None = None,
                  label: str | None = None) -> Path:
    """Write the roles (and the manifest) into a fresh folder beside `out_dir`, then swap it in atomically.

    The examples are written as given: validate them (`validate_examples`, `check_leakage`) first.

    Args:
        roles: role -> examples; each role becomes `<role>.jsonl`, in this order.
        out_dir: the folder to (re)write; it must not exist, be empty or hold a dataset (`manifest.json`).
        manifest: written as `manifest.json` when given.
        label: how error messages name `out_dir` (default: relative to the working directory when inside it).

    Returns:
        `out_dir` as a path.

    Raises:
        DataError: an `out_dir` that holds something other than a dataset build; it is then left as it was.
        ValueError: a name in `roles` that is not a role.
    """
    out = Path(out_dir)
    if unknown := [role for role in roles if role not in ROLES]:
        raise ValueError(f"unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    _check_replaceable(out, label or _label(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        for role, examples in roles.items():
            _write_jsonl(tmp / f"{role}.jsonl", examples)
        if manifest is not None:
            text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, ensure_ascii=False)
            (tmp / "manifest.json").write_text(text + "\n", encoding="utf-8", newline="\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_dataset(config: DataConfig, out_dir: str | Path, root: Path | None = None) -> Manifest:
    """Build every role, validate it and check leakage, then atomically replace `out_dir`.

    Args:
        config: the data config (preset, sizes, generic sources).
        out_dir: the folder to (re)write: `<role>.jsonl` per role and `manifest.json`.
        root: the folder relative paths in the config are resolved against (default: the project root).

    Returns:
        The manifest written to `out_dir/manifest.json`.

    Raises:
        DataError: on any bad input, or an `out_dir` that holds something other than a dataset build;
            `out_dir` is then left as it was.
    """
    out = Path(out_dir)
    label = _label(out)
    _check_replaceable(out, label)
    records = public.build_public(config, root) if config.preset == "public" else synthetic.generate(config)
    records = sources.apply_sources(records, config, root)
    roles: dict[str, list[dict]] = {}
    for role in ROLES:
        examples = [{**r, "role": role, "id": r.get("id") or f"{role}-{i:05d}"}
                    for i, r in enumerate(records.get(role, []), 1)]
        if not examples and _wanted(config, role):
            raise DataError.at(f"{label}/{role}.jsonl", None, "sizes", f"role {role!r} came out empty")
        roles[role] = validate_examples(examples, f"{label}/{role}.jsonl", role, config.max_chars)
    check_leakage(roles, label)
    manifest = Manifest.of(roles, config.preset, config.seed, config.model_dump(mode="json"))
    write_dataset(roles, out, manifest, label)
    return manifest


def replay_examples(align: Sequence[Mapping], n: int, seed: int) -> list[dict]:
    """n chats of the base's alignment data (refusals of harmful prompts, benign and look-alike answers, in
    their proportions), drawn with `seed`, as fine-tuning examples: replayed beside the user's data so that
    fine-tuning does not erode the refusals the base learned. Each is a safe training example, so it is
    labelled not harmful (in the `align` role `is_harmful` marks a harmful *prompt*, answered by a refusal).

    Raises:
        ValueError: when `align` holds fewer than n chats.
    """
    if n > len(align):
        raise ValueError(f"finetune.replay: {n} chats wanted, the `align` role holds {len(align)}")
    rng = random.Random(seed)
    return [{**ex, "id": f"replay-{ex['id']}", "role": "finetune", "is_harmful": False,
             "source": f"replay:{ex.get('source', 'align')}"} for ex in rng.sample(list(align), n)]


def with_finetune(data_dir: str | Path, finetune: Sequence[Mapping], out_dir: str | Path, origin: dict) -> Path:
    """A copy of a dataset whose `finetune` role is replaced (e.g. screened), validated, with a manifest
    recording where it came from. Roles the dataset lacks (a bench cell holds only some) stay absent."""
    roles = {role: load_role(data_dir, role) for role in ROLES if (Path(data_dir) / f"{role}.jsonl").is_file()}
    roles["finetune"] = validate_examples(finetune, f"{out_dir}/finetune.jsonl", "finetune")
    check_leakage(roles, out_dir)
    return write_dataset(roles, out_dir, Manifest.of(roles, "derived", 0, origin))
