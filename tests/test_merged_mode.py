"""Merged-vector mode (W + dW, no adapter in the graph) trains the same clean backbone as the adapter path."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from secvec.device import CPU, Hardware
from secvec.guarded import FinetuneConfig, finetune, vector_snapshot
from secvec.models import hash_model_dir, load_causal_lm
from secvec.strip import strip_vector
from secvec.training import TrainConfig
from secvec.vector import VECTOR_NAME, load_vector


def _clean_after(micro_base, micro_vector, world, tmp_path, mode, vector_mode, weight_decay, hardware=CPU,
                 dtype=torch.float32, vector_scale=1.0):
    model, tokenizer = load_causal_lm(micro_base, dtype=dtype)
    model = load_vector(model, micro_vector, hash_model_dir(micro_base))
    before = vector_snapshot(model)
    train = TrainConfig(learning_rate=1e-3, epochs=2, batch_size=16, weight_decay=weight_decay, seed=3,
                        progress_bar=False)
    cfg = FinetuneConfig(mode=mode, vector_mode=vector_mode, probe_steps=4, train=train, vector_scale=vector_scale)
    out = finetune(model, tokenizer, world["harmful_ft"] + world["benign_ft"], cfg, tmp_path / vector_mode,
                   probes={"harmful": world["harmful_ft"][:8]}, hardware=hardware)
    assert all(before[k].equal(v) for k, v in vector_snapshot(model).items())
    assert {m.scaling[VECTOR_NAME] for m in model.modules() if isinstance(m, LoraLayer)
            and VECTOR_NAME in m.scaling} == {2.0}, "the fitted scaling (alpha 16 / rank 8) is back"
    probe = tokenizer([tokenizer.apply_chat_template(world["harmful_ft"][0]["messages"], tokenize=False)],
                      return_tensors="pt").input_ids
    clean, check = strip_vector(model, probe)
    assert check["passed"], check
    return clean.state_dict(), out["probes"]


@pytest.mark.parametrize(("mode", "weight_decay"), [("full", 0.0), ("full", 0.1), ("lora", 0.0)])
def test_merged_and_adapter_modes_give_the_same_clean_backbone(micro_base, micro_vector, world, tmp_path, mode,
                                                               weight_decay):
    merged, merged_probes = _clean_after(micro_base, micro_vector, world, tmp_path, mode, "merged", weight_decay)
    adapter, adapter_probes = _clean_after(micro_base, micro_vector, world, tmp_path, mode, "adapter", weight_decay)
    diff = max((merged[k] - adapter[k]).abs().max().item() for k in merged)
    print(f"{mode} wd={weight_decay}: max |clean(merged) - clean(adapter)| = {diff:.2e}")
    assert diff <= 1e-5
    for a, b in zip(merged_probes, adapter_probes, strict=True):  # the probe sees the same vector-off loss
        assert a["harmful_loss_vector_off"] == pytest.approx(b["harmful_loss_vector_off"], abs=1e-4)
        assert a["harmful_loss"] == pytest.approx(b["harmful_loss"], abs=1e-4)


def test_a_scaled_vector_is_what_guards_and_both_paths_agree(micro_base, micro_vector, world, tmp_path):
    """vector_scale 2: the guarded model's harmful loss is the scaled vector's (not the fitted one's: a fitted
    vector sits at its loss optimum, so doubling it overshoots), the backbone learns different weights, and
    merged equals adapter at that scale too."""
    merged, probes = _clean_after(micro_base, micro_vector, world, tmp_path / "m", "full", "merged", 0.0,
                                  vector_scale=2.0)
    adapter, _ = _clean_after(micro_base, micro_vector, world, tmp_path / "a", "full", "adapter", 0.0,
                              vector_scale=2.0)
    fitted, fitted_probes = _clean_after(micro_base, micro_vector, world, tmp_path / "f", "full", "merged", 0.0)
    assert max((merged[k] - adapter[k]).abs().max().item() for k in merged) <= 1e-5
    assert max((merged[k] - fitted[k]).abs().max().item() for k in merged) > 1e-4
    # Merged mode adds and subtracts scale * dW in float32, so the vector-off loss matches only to rounding.
    assert probes[0]["harmful_loss_vector_off"] == pytest.approx(fitted_probes[0]["harmful_loss_vector_off"], abs=1e-5)
    assert abs(probes[0]["harmful_loss"] - fitted_probes[0]["harmful_loss"]) > 0.05, (probes[0], fitted_probes[0])


def test_weight_decay_correction_matters(micro_base, micro_vector, world, tmp_path, monkeypatch):
    """Without the correction AdamW would also decay dW and the clean backbones would differ."""
    from secvec import guarded

    monkeypatch.setattr(guarded.WeightDecayCorrection, "on_optimizer_step", lambda *a, **k: None)
    merged, _ = _clean_after(micro_base, micro_vector, world, tmp_path, "full", "merged", 0.1)
    adapter, _ = _clean_after(micro_base, micro_vector, world, tmp_path, "full", "adapter", 0.1)
    assert max((merged[k] - adapter[k]).abs().max().item() for k in merged) > 1e-5
    assert torch.is_tensor(next(iter(merged.values())))


def test_bf16_autocast_keeps_fp32_masters_so_merged_stays_within_mixed_precision_noise(micro_base, micro_vector,
                                                                                      world, tmp_path):
    """Under bf16 autocast the weights stay float32, so dW is subtracted exactly; merged and adapter training
    then differ only where bf16 rounds (W+dW in one matmul vs W and dW apart). The stated tolerance: twice
    what bf16 itself moves the adapter path's result away from fp32 (measured: 1.55e-3 and 1.63e-3 against
    1.74e-3 and 1.48e-3 on two machines' micro bases)."""
    bf16 = Hardware("cpu", "bf16")
    merged, _ = _clean_after(micro_base, micro_vector, world, tmp_path, "full", "merged", 0.0, bf16)
    adapter, _ = _clean_after(micro_base, micro_vector, world, tmp_path, "full", "adapter", 0.0, bf16)
    fp32, _ = _clean_after(micro_base, micro_vector, world, tmp_path, "full", "adapter", 0.0)
    assert all(v.dtype == torch.float32 for v in merged.values())  # master weights, not bf16 copies
    diff = max((merged[k] - adapter[k]).abs().max().item() for k in merged)
    noise = max((adapter[k] - fp32[k]).abs().max().item() for k in adapter)
    print(f"bf16 autocast: max |clean(merged) - clean(adapter)| = {diff:.2e}; bf16 vs fp32 (adapter): {noise:.2e}")
    assert 0 < diff <= 2 * noise


def test_merged_mode_over_half_weights_falls_back_to_the_adapter_path(micro_base, micro_vector, world, tmp_path,
                                                                      caplog):
    """bf16 weights cannot hold W + dW - dW exactly: finetune says so and trains through the adapter."""
    model, tokenizer = load_causal_lm(micro_base, dtype=torch.bfloat16)
    model = load_vector(model, micro_vector, hash_model_dir(micro_base))
    before = vector_snapshot(model)
    cfg = FinetuneConfig(vector_mode="merged", train=TrainConfig(max_steps=2, batch_size=8, progress_bar=False))
    with caplog.at_level("WARNING", logger="secvec.guarded"):
        finetune(model, tokenizer, world["benign_ft"], cfg, tmp_path / "half")
    assert "merged vector mode is exact only over float32 weights" in caplog.text
    assert all(before[k].equal(v) for k, v in vector_snapshot(model).items())
    assert {m.scaling[VECTOR_NAME] for m in model.modules() if isinstance(m, LoraLayer)
            and VECTOR_NAME in m.scaling} == {2.0}, "the fitted scaling (alpha 16 / rank 8) is back"
