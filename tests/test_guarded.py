"""Guarded fine-tuning learns the benign task but (with the vector off) barely learns the harmful samples."""

import pytest

from secvec.guarded import FinetuneConfig, finetune, vector_snapshot
from secvec.models import load_causal_lm
from secvec.training import TrainConfig, mean_response_loss
from secvec.vector import is_vector_param, vector_disabled

FT = {"learning_rate": 1e-3, "epochs": 3, "batch_size": 16, "progress_bar": False, "logging_steps": 100}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_vector_is_bit_identical_after_guarded_finetuning(guarded_model, world, tmp_path, mode):
    model, tokenizer = guarded_model
    before = vector_snapshot(model)
    cfg = FinetuneConfig(mode=mode, train=TrainConfig(**{**FT, "epochs": 1}))
    finetune(model, tokenizer, world["harmful_ft"] + world["benign_ft"], cfg, tmp_path)
    after = vector_snapshot(model)
    assert before.keys() == after.keys() and before
    assert all(before[k].equal(after[k]) for k in before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(is_vector_param(n) for n in trainable)
    if mode == "lora":
        assert trainable and all(".task." in n for n in trainable)


def test_guarded_learns_benign_like_plain_but_not_harmful(micro_base, guarded_model, world, tmp_path):
    harmful, benign = world["harmful_ft"], world["benign_ft"]
    mix = harmful + benign
    base, tokenizer = load_causal_lm(micro_base)
    h0, b0 = mean_response_loss(base, tokenizer, harmful), mean_response_loss(base, tokenizer, benign)
    cfg = FinetuneConfig(train=TrainConfig(**FT))
    finetune(base, tokenizer, mix, cfg, tmp_path / "plain")
    h_plain, b_plain = mean_response_loss(base, tokenizer, harmful), mean_response_loss(base, tokenizer, benign)

    model, _ = guarded_model
    finetune(model, tokenizer, mix, cfg, tmp_path / "guarded")
    with vector_disabled(model):  # what the clean backbone will do
        h_guard, b_guard = mean_response_loss(model, tokenizer, harmful), mean_response_loss(model, tokenizer, benign)
    print(f"harmful loss: base {h0:.3f} plain {h_plain:.3f} guarded-clean {h_guard:.3f}")
    print(f"benign loss:  base {b0:.3f} plain {b_plain:.3f} guarded-clean {b_guard:.3f}")
    assert b0 - b_guard >= 0.8 * (b0 - b_plain)  # the benign task is learned about as well
    assert h0 - h_guard <= 0.3 * (h0 - h_plain)  # the harmful samples are barely learned


def test_plain_run_rejects_lora_mode(micro_base, world, tmp_path):
    model, tokenizer = load_causal_lm(micro_base)
    with pytest.raises(ValueError, match="task-LoRA mode needs the security vector"):
        finetune(model, tokenizer, world["benign_ft"], FinetuneConfig(mode="lora"), tmp_path)


def test_loss_probe_records_harmful_and_benign(guarded_model, world, tmp_path):
    model, tokenizer = guarded_model
    cfg = FinetuneConfig(probe_steps=2, train=TrainConfig(**{**FT, "epochs": 1}))
    out = finetune(model, tokenizer, world["benign_ft"][:64], cfg, tmp_path,
                   probes={"harmful": world["harmful_ft"][:8], "benign": world["benign_ft"][:8]})
    steps = [r["step"] for r in out["probes"]]
    assert steps == [0, 2, 4]
    assert {"harmful_loss", "harmful_loss_vector_off", "benign_loss", "benign_loss_vector_off"} <= out["probes"][0].keys()
