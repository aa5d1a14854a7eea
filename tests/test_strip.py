"""Stripping leaves exactly the plain architecture, behaving like the guarded model with the vector off."""

import pytest
import torch

from secvec.guarded import FinetuneConfig, finetune
from secvec.models import load_causal_lm
from secvec.strip import save_clean, strip_vector
from secvec.training import TrainConfig
from secvec.vector import vector_disabled


def _probe(tokenizer, world):
    text = tokenizer.apply_chat_template(world["harmful_ft"][0]["messages"], tokenize=False)
    return tokenizer([text], return_tensors="pt").input_ids


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_strip_after_guarded_finetuning(guarded_model, world, tmp_path, mode):
    model, tokenizer = guarded_model
    cfg = FinetuneConfig(mode=mode, train=TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, progress_bar=False))
    finetune(model, tokenizer, world["benign_ft"], cfg, tmp_path / "ft")
    probe = _probe(tokenizer, world)
    with torch.no_grad(), vector_disabled(model):
        expected = model(input_ids=probe).logits
    clean, check = strip_vector(model, probe)
    assert check["passed"], check
    assert check["adapter_keys"] == [] and check["architecture_mismatches"] == []
    assert check["max_abs_diff"] <= (1e-6 if mode == "full" else 1e-4)
    with torch.no_grad():
        assert (clean(input_ids=probe).logits - expected).abs().max().item() <= check["tolerance"]

    reloaded, _ = load_causal_lm(save_clean(clean, tokenizer, tmp_path / "clean"))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, clean(input_ids=probe).logits)
    assert set(reloaded.state_dict()) == set(clean.state_dict())


def test_strip_without_finetuning_returns_the_base(micro_base, guarded_model, world):
    model, tokenizer = guarded_model
    probe = _probe(tokenizer, world)
    clean, check = strip_vector(model, probe)
    base, _ = load_causal_lm(micro_base)
    assert check["passed"] and check["max_abs_diff"] == 0.0
    for (name, a), (_, b) in zip(sorted(clean.state_dict().items()), sorted(base.state_dict().items())):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_saved_guarded_model_strips_to_the_same_clean_backbone(guarded_model, world, tmp_path, mode):
    from secvec.guarded import load_guarded, save_guarded

    model, tokenizer = guarded_model
    cfg = FinetuneConfig(mode=mode, train=TrainConfig(learning_rate=1e-3, epochs=1, batch_size=16, progress_bar=False))
    finetune(model, tokenizer, world["benign_ft"][:48], cfg, tmp_path / "ft")
    probe = _probe(tokenizer, world)
    with torch.no_grad():
        guarded_logits = model(input_ids=probe).logits
    reloaded, _ = load_guarded(save_guarded(model, tokenizer, tmp_path / "guarded"))
    with torch.no_grad():
        assert (reloaded(input_ids=probe).logits - guarded_logits).abs().max().item() <= 1e-6
    direct, _ = strip_vector(model, probe)
    clean, check = strip_vector(reloaded, probe)
    assert check["passed"]
    for (name, a), (_, b) in zip(sorted(clean.state_dict().items()), sorted(direct.state_dict().items())):
        assert torch.equal(a, b), name
