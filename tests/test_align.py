"""Aligning a given base: a chat model that does not refuse learns the `align` role's refusals first."""

from __future__ import annotations

import pytest
from conftest import REFUSE
from pydantic import ValidationError
from tiny_chat_model import write_chat_model

from secvec.config import PipelineConfig, TrainConfig
from secvec.models import load_causal_lm
from secvec.training import mean_response_loss


def test_align_needs_a_given_base():
    with pytest.raises(ValidationError, match="align: aligns a given base"):
        PipelineConfig(name="x", data="configs/data/micro.yaml", align=TrainConfig())
    cfg = PipelineConfig(name="x", data="configs/data/micro.yaml", base_model="models/m", align=TrainConfig())
    assert cfg.align is not None
    assert "align" not in PipelineConfig(name="x", data="configs/data/micro.yaml").model_dump(mode="json")


def test_the_align_stage_teaches_refusals_and_is_a_cached_base(world, tmp_path, monkeypatch):
    from secvec.config import RuntimeConfig
    from secvec.data.build import write_dataset
    from secvec.data.schema import Manifest
    from secvec.refs import DataRef, ModelRef
    from tasks.align import align

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / "cache"))
    given = ModelRef.of(write_chat_model(tmp_path / "given"))
    refusals = [ex for ex in world["align"] if ex["messages"][-1]["content"] == REFUSE]
    train_on = [ex for ex in world["align"] if ex not in refusals[:8]]  # 8 refusals held out
    roles = {"align": [{**ex, "id": f"align-{i}", "role": "align", "is_harmful": ex in refusals, "source": "test",
                        "category": "harm" if ex in refusals else "benign"}
                       for i, ex in enumerate(train_on)]}
    write_dataset(roles, tmp_path / "data", Manifest.of(roles, "test", 0, {}))
    data = DataRef.of(tmp_path / "data")
    cfg = TrainConfig(learning_rate=3e-3, epochs=6, batch_size=16, progress_bar=False)
    result = align.task.fn(given, data, cfg, RuntimeConfig())
    before = mean_response_loss(*load_causal_lm(given.dir), refusals[:8])
    after = mean_response_loss(*load_causal_lm(result.model.dir), refusals[:8])
    print(f"held-out refusal loss {before:.2f} -> {after:.2f} nats/token")
    assert after < before / 3, (before, after)
    assert result.model.sha256 != given.sha256 and result.history
    assert align.stored(align.out_dir(given, data, cfg, RuntimeConfig())) == result
