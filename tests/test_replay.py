"""Alignment replay (`finetune.replay`): guarded fine-tuning also trains on some of the base's `align` chats."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from secvec.config import DataConfig, FinetuneConfig
from secvec.data import load_role
from secvec.data.build import build_dataset, replay_examples, write_dataset
from secvec.data.schema import Manifest, validate_examples
from secvec.refs import DataRef


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "data"
    build_dataset(DataConfig(preset="micro"), out)
    return DataRef.of(out)


def test_replayed_chats_are_safe_finetuning_examples_drawn_with_the_seed(micro_data):
    align = load_role(micro_data.dir, "align")
    drawn = replay_examples(align, 40, seed=3)
    assert len(drawn) == len({ex["id"] for ex in drawn}) == 40
    assert all(ex["role"] == "finetune" and not ex["is_harmful"] and ex["id"].startswith("replay-align-")
               and ex["source"].startswith("replay:") for ex in drawn)
    by_id = {ex["id"]: ex for ex in align}
    assert all(ex["messages"] == by_id[ex["id"].removeprefix("replay-")]["messages"] for ex in drawn)
    # refusals of harmful prompts are replayed too (in align they are the `is_harmful` chats)
    assert Counter(by_id[ex["id"].removeprefix("replay-")]["is_harmful"] for ex in drawn)[True] > 0
    validate_examples(drawn, "replay", "finetune")
    assert replay_examples(align, 40, seed=3) == drawn and replay_examples(align, 40, seed=4) != drawn
    with pytest.raises(ValueError, match=r"finetune.replay: .* holds"):
        replay_examples(align, len(align) + 1, seed=0)


def test_the_stage_adds_the_replay_to_a_cell_and_leaves_its_other_roles(micro_data, tmp_path, monkeypatch):
    """A bench cell holds no `align` role: the chats come from the main dataset the base was aligned on."""
    from tasks.finetune import with_replay

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / "cache"))
    roles = {r: load_role(micro_data.dir, r) for r in ("finetune", "eval_harmful", "eval_utility")}
    write_dataset(roles, tmp_path / "cell", Manifest.of(roles, "bench-cell", 0, {}))
    cell = DataRef.of(tmp_path / "cell")
    replayed = with_replay.task.fn(cell, micro_data, 25, 0)
    train = load_role(replayed.dir, "finetune")
    assert train[: len(roles["finetune"])] == roles["finetune"] and len(train) == len(roles["finetune"]) + 25
    assert sum(ex["is_harmful"] for ex in train) == sum(ex["is_harmful"] for ex in roles["finetune"])
    assert sorted(p.stem for p in replayed.path.glob("*.jsonl")) == ["eval_harmful", "eval_utility", "finetune"]
    assert all(load_role(replayed.dir, r) == roles[r] for r in ("eval_harmful", "eval_utility"))
    origin = json.loads((replayed.path / "manifest.json").read_text())["config"]
    assert origin == {"replayed_into": cell.md5, "replay": 25, "align_md5": micro_data.md5, "seed": 0}
    with pytest.raises(ValueError, match="no `align` role to replay; set finetune.replay: 0"):
        with_replay.task.fn(cell, cell, 25, 0)


def test_plain_fine_tuning_never_replays_and_keeps_its_cache_keys(micro_data):
    """`unguarded` strips the replay, and a config at replay 0 dumps as one made before the field existed,
    so the plain runs cached before it (the reference, every bench's plain arm) stay valid."""
    from tasks.finetune import guarded_data, plain_reference, unguarded

    cfg = FinetuneConfig(replay=200)
    assert unguarded(cfg).replay == 0 and "replay" not in unguarded(cfg).model_dump()
    assert unguarded(cfg).model_dump() == FinetuneConfig().model_dump()
    assert plain_reference(FinetuneConfig(mode="lora", replay=200)).model_dump() == FinetuneConfig().model_dump()
    assert guarded_data(micro_data, micro_data, FinetuneConfig()) is micro_data
