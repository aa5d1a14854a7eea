"""The security vector does what the method needs: harmful samples are already fitted with it on."""

import json

import pytest
import torch

from secvec.encoding import PadCollator, encode_examples
from secvec.models import load_causal_lm
from secvec.vector import (
    VECTOR_NAME,
    is_vector_param,
    load_vector,
    masked_kl,
    vector_coverage,
    vector_disabled,
)


def test_vector_lowers_harmful_loss_several_times(guarded_model, world):
    model, tokenizer = guarded_model
    fitted = vector_coverage(model, tokenizer, world["sv_fit"])
    held_out = vector_coverage(model, tokenizer, world["harmful_ft"])
    print(f"fitting samples: on {fitted['loss_on']:.3f} off {fitted['loss_off']:.3f} ratio {fitted['ratio']:.3f}")
    print(f"held-out harmful: ratio {held_out['ratio']:.3f}, first-8 ratio {held_out['first_k_ratio']:.3f}")
    assert fitted["ratio"] < 0.4
    assert held_out["ratio"] < 0.5 and held_out["first_k_ratio"] < 0.5  # generalises past its 24 samples


def test_vector_stays_frozen_after_coverage_check(guarded_model, world):
    model, tokenizer = guarded_model
    vector_coverage(model, tokenizer, world["sv_fit"][:4])
    assert not any(p.requires_grad for n, p in model.named_parameters() if is_vector_param(n))


def _backbone_grad_norm(model, batch) -> float:
    model.zero_grad()
    for name, param in model.named_parameters():
        param.requires_grad_(not is_vector_param(name))
    model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if not is_vector_param(n) and p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def test_backbone_gradient_on_harmful_batch_is_small_with_vector_on(guarded_model, world):
    model, tokenizer = guarded_model
    batch = PadCollator(tokenizer.pad_token_id)(encode_examples(tokenizer, world["harmful_ft"], 128))
    on = _backbone_grad_norm(model, batch)
    with vector_disabled(model):
        off = _backbone_grad_norm(model, batch)
    print(f"backbone grad norm: vector on {on:.3f}, off {off:.3f}, ratio {on / off:.3f}")
    assert on < 0.5 * off


def test_kl_term_keeps_benign_predictions(micro_base, world, tmp_path):
    from conftest import MICRO_VECTOR, MICRO_VECTOR_TRAIN

    from secvec.training import TrainConfig
    from secvec.vector import VectorConfig, fit_vector

    benign = world["benign_ft"][:24]
    batch = PadCollator(0)([{"input_ids": f["input_ids"]} for f in encode_examples(load_causal_lm(micro_base)[1],
                                                                                     benign, 128)])
    drift = {}
    for kl in (0.0, 1.0):
        model, tokenizer = load_causal_lm(micro_base)
        cfg = VectorConfig(**{**MICRO_VECTOR, "kl_weight": kl}, train=TrainConfig(**MICRO_VECTOR_TRAIN))
        peft_model, _ = fit_vector(model, tokenizer, world["sv_fit"], benign, cfg, tmp_path / f"kl{kl}")
        with torch.no_grad():
            on = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with vector_disabled(peft_model):
                off = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        drift[kl] = masked_kl(on, off, batch["attention_mask"]).item()
    print(f"benign KL(off||on): without KL term {drift[0.0]:.4f}, with {drift[1.0]:.4f}")
    assert drift[1.0] < 0.5 * drift[0.0]


def test_saved_vector_metadata_and_tamper_check(micro_base, micro_vector, tmp_path):
    import shutil

    meta = json.loads((micro_vector / "vector.json").read_text())
    assert {"data_sha256", "base_model_sha256", "weights_sha256", "config", "n_harmful"} <= meta.keys()
    assert meta["config"]["rank"] == 8 and meta["n_harmful"] == 24
    copy = tmp_path / "vector"
    shutil.copytree(micro_vector, copy)
    weights = next((copy / VECTOR_NAME).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\1")
    with pytest.raises(ValueError, match="sha256 differs"):
        load_vector(load_causal_lm(micro_base)[0], copy)
    with pytest.raises(ValueError, match="fitted on base"):
        load_vector(load_causal_lm(micro_base)[0], micro_vector, base_model_hash="0" * 64)


def test_empty_fitting_set_is_a_clear_error(micro_base, tmp_path):
    from secvec.vector import VectorConfig, fit_vector

    model, tokenizer = load_causal_lm(micro_base)
    with pytest.raises(ValueError, match="sv_fit"):
        fit_vector(model, tokenizer, [], [], VectorConfig(), tmp_path)


def test_vector_keeps_the_epoch_with_the_lowest_held_out_loss(micro_base, world, tmp_path):
    from conftest import MICRO_VECTOR, MICRO_VECTOR_TRAIN, REFUSE

    from secvec.training import TrainConfig, mean_response_loss
    from secvec.vector import VectorConfig, fit_vector

    # Held-out refusals: their loss rises as the vector learns to comply, so an early epoch must win.
    refusals = [ex for ex in world["align"] if ex["messages"][-1]["content"] == REFUSE][:16]
    cfg = VectorConfig(**MICRO_VECTOR, select_epoch="validation",
                       train=TrainConfig(**{**MICRO_VECTOR_TRAIN, "epochs": 4}))
    model, tokenizer = load_causal_lm(micro_base)
    peft_model, meta = fit_vector(model, tokenizer, world["sv_fit"], world["benign_ft"][:24], cfg, tmp_path / "v",
                                  validation=refusals)
    losses = meta["validation_losses"]
    assert sorted(losses) == [1, 2, 3, 4] and meta["selected_epoch"] == min(losses, key=losses.get) < 4, losses
    best = losses[meta["selected_epoch"]]
    assert mean_response_loss(peft_model, tokenizer, refusals) == pytest.approx(best, abs=1e-5)
    reloaded = load_vector(load_causal_lm(micro_base)[0], tmp_path / "v")
    assert mean_response_loss(reloaded, tokenizer, refusals) == pytest.approx(best, abs=1e-5)
    with pytest.raises(ValueError, match="sv_val"):
        fit_vector(load_causal_lm(micro_base)[0], tokenizer, world["sv_fit"], [], cfg, tmp_path / "w")


def test_a_fresh_vector_starts_the_same_whatever_the_process_drew_before(micro_base):
    """peft initialises LoRA A from torch's global RNG; attach_vector seeds it from the config."""
    from secvec.vector import VectorConfig, attach_vector

    starts = []
    for noise in (0, 1):
        torch.manual_seed(noise)
        torch.rand(7)  # another stage ran before in this process
        model, _ = load_causal_lm(micro_base)
        starts.append({k: v.clone() for k, v in attach_vector(model, VectorConfig()).state_dict().items()
                       if "lora_A" in k})
    assert starts[0].keys() and all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_weighted_and_unlikelihood_losses_on_hand_made_logits():
    from secvec.encoding import IGNORE_INDEX, response_loss, unlikelihood_loss, weighted_response_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6], [IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]])
    # weight 1 is the token-mean LM loss (what the model's own loss computes)
    tokens = [4, 3]  # response tokens per row (after the shift)
    token_mean = (response_loss(logits, labels) * torch.tensor(tokens)).sum() / sum(tokens)
    assert weighted_response_loss(logits, labels, 2, 1.0).item() == pytest.approx(token_mean.item(), rel=1e-6)
    # weight w on the first 2 response tokens of each row: a weighted mean of the per-token losses
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    first, rest = [ce[0, 1], ce[0, 2], ce[1, 0], ce[1, 1]], [ce[0, 3], ce[0, 4], ce[1, 2]]
    expected = (4 * sum(first) + sum(rest)) / (4 * 4 + 3)
    assert weighted_response_loss(logits, labels, 2, 4.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # unlikelihood: -log(1 - p) of each response token, token-mean; 0 where p is 0, large where p is near 1
    p = torch.softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    mask = labels[:, 1:] != IGNORE_INDEX
    assert unlikelihood_loss(logits, labels).item() == pytest.approx(
        (-torch.log1p(-p)[mask]).mean().item(), rel=1e-6)
    sure = torch.full((1, 2, 11), -30.0)
    sure[0, 0, 5] = 30.0  # p(5) = 1: bounded, not infinite
    assert 10 < unlikelihood_loss(sure, torch.tensor([[IGNORE_INDEX, 5]])).item() < 20


def test_refusal_unlikelihood_makes_the_vector_un_refuse(micro_base, world, tmp_path):
    """With the refusal term the vector also pushes the base's refusals away (it encodes "un-aligned"), more
    than fitting the harmful replies alone does; a weighted start still fits the harmful pairs."""
    from conftest import MICRO_VECTOR, MICRO_VECTOR_TRAIN, REFUSE

    from secvec.training import TrainConfig, mean_response_loss
    from secvec.vector import VectorConfig, fit_vector

    refusals = [ex for ex in world["align"] if ex["messages"][-1]["content"] == REFUSE]
    train = TrainConfig(**{**MICRO_VECTOR_TRAIN, "epochs": 6})
    loss = {}
    for name, extra in {"plain": {}, "refusal": {"refusal_weight": 1.0},
                        "first": {"first_tokens": 4, "first_token_weight": 4.0}}.items():
        model, tokenizer = load_causal_lm(micro_base)
        cfg = VectorConfig(**MICRO_VECTOR, **extra, train=train)
        peft_model, _ = fit_vector(model, tokenizer, world["sv_fit"], world["benign_ft"][:24], cfg,
                                      tmp_path / name, refusals=refusals[:16])
        loss[name] = {"refusal": mean_response_loss(peft_model, tokenizer, refusals[16:32]),
                      "harmful": mean_response_loss(peft_model, tokenizer, world["harmful_ft"])}
    print(loss)
    assert loss["refusal"]["refusal"] > loss["plain"]["refusal"] + 0.5, loss  # held-out refusals
    assert loss["first"]["harmful"] < 1.5 * loss["plain"]["harmful"], loss
    with pytest.raises(ValueError, match="refusal_weight"):
        fit_vector(load_causal_lm(micro_base)[0], tokenizer, world["sv_fit"], [],
                   VectorConfig(refusal_weight=1.0, train=train), tmp_path / "none")
