"""Security vector: a LoRA adapter fitted on harmful pairs with the backbone frozen (step 1 of the method).

With the vector on, the model already gives the harmful responses, so guarded fine-tuning finds little
left to learn from harmful samples. An optional KL term on benign chats keeps the vector from changing
benign behaviour.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback

from secvec.config import VectorConfig
from secvec.data import load_role
from secvec.device import CPU, Hardware
from secvec.encoding import encode_examples, unlikelihood_loss, weighted_response_loss
from secvec.models import find_lora_targets, load_causal_lm, lora_fan_in_fan_out, sha256_file
from secvec.training import SecvecTrainer, mean_response_loss, train

log = logging.getLogger(__name__)

VECTOR_NAME = "security_vector"
METADATA_FILE = "vector.json"


def is_vector_param(name: str) -> bool:
    return f".{VECTOR_NAME}." in name


def examples_hash(*groups: Sequence[dict]) -> str:
    """sha256 of examples as canonical JSON: the identity of a vector's fitting data."""
    digest = hashlib.sha256()
    for group in groups:
        for ex in group:
            digest.update(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def kl_examples(data_dir: str | Path, n: int) -> list[dict]:
    """Benign chats for the KL term: the base's own benign alignment data, else the user's benign data."""
    benign = [ex for ex in load_role(data_dir, "align") if not ex["is_harmful"]]
    benign = benign or [ex for ex in load_role(data_dir, "finetune") if not ex["is_harmful"]]
    return benign[:n]


def attach_vector(model, cfg: VectorConfig) -> PeftModel:
    """Wrap `model` with a fresh, trainable `security_vector` LoRA; the backbone is frozen."""
    targets = cfg.target_modules or find_lora_targets(model)
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,  # dropout would make the vector's effect differ between fitting and guarding
        target_modules=targets,
        fan_in_fan_out=lora_fan_in_fan_out(model, targets),  # GPT-2's Conv1D stores weights as (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )
    # peft draws A from torch's global RNG: seeded here, the vector's start depends on its config alone, not
    # on what the process computed before (a cached base or a fresh bootstrap)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        peft_model = get_peft_model(model, lora, adapter_name=VECTOR_NAME)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    if not trainable or not all(is_vector_param(n) for n in trainable):
        raise RuntimeError(f"vector fitting must train only the vector, got {sorted(trainable)[:5]}")
    return peft_model


def masked_kl(logits_on: torch.Tensor, logits_off: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(p_off || p_on): how far the vector moves benign next-token predictions."""
    log_on = F.log_softmax(logits_on.float(), dim=-1)
    log_off = F.log_softmax(logits_off.float(), dim=-1)
    kl = F.kl_div(log_on, log_off, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


class VectorTrainer(SecvecTrainer):
    """Response-only LM loss on harmful pairs (first tokens optionally weighted) + kl_weight * KL on benign
    chats (adapter on vs off) + refusal_weight * unlikelihood of the base's refusals (adapter on)."""

    cfg: VectorConfig = VectorConfig()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kl_ids = inputs.pop("kl_input_ids", None)
        kl_mask = inputs.pop("kl_attention_mask", None)
        refusal = {k.removeprefix("refusal_"): inputs.pop(k) for k in list(inputs) if k.startswith("refusal_")}
        outputs = model(**inputs)
        loss = outputs.loss
        if self.cfg.first_tokens:
            loss = weighted_response_loss(outputs.logits, inputs["labels"], self.cfg.first_tokens,
                                          self.cfg.first_token_weight)
        if refusal and self.cfg.refusal_weight > 0:
            logits = model(input_ids=refusal["input_ids"], attention_mask=refusal["attention_mask"]).logits
            loss = loss + self.cfg.refusal_weight * unlikelihood_loss(logits, refusal["labels"])
        if kl_ids is not None and self.cfg.kl_weight > 0:
            peft_model = self.accelerator.unwrap_model(model)
            with torch.no_grad(), peft_model.disable_adapter():
                logits_off = model(input_ids=kl_ids, attention_mask=kl_mask).logits
            logits_on = model(input_ids=kl_ids, attention_mask=kl_mask).logits
            loss = loss + self.cfg.kl_weight * masked_kl(logits_on, logits_off, kl_mask)
        return (loss, outputs) if return_outputs else loss


class BestEpoch(TrainerCallback):
    """After every epoch, the vector's mean loss on held-out harmful pairs; keeps the weights of the best."""

    def __init__(self, model: PeftModel, tokenizer, examples: Sequence[dict]) -> None:
        self.model, self.tokenizer, self.examples = model, tokenizer, examples
        self.losses: dict[int, float] = {}  # epoch -> held-out loss (epochs of this process: a resumed
        self.best: dict[str, torch.Tensor] = {}  # run picks among the epochs it trained)

    def on_epoch_end(self, args, state, control, **kwargs):
        loss = mean_response_loss(self.model, self.tokenizer, self.examples)
        if loss <= min(self.losses.values(), default=loss):
            self.best = {n: p.detach().clone() for n, p in self.model.named_parameters() if is_vector_param(n)}
        self.losses[round(state.epoch)] = loss

    def restore(self) -> int:
        """Put the best epoch's weights back; returns that epoch."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.best:
                    param.copy_(self.best[name])
        return min(self.losses, key=lambda epoch: (self.losses[epoch], -epoch))


def _fitting_features(tokenizer, harmful, benign, refusals, cfg: VectorConfig) -> list[dict]:
    """Each harmful pair, with a benign chat (KL) and a refusal (unlikelihood) beside it, both cycled."""
    features = encode_examples(tokenizer, harmful, cfg.train.max_length)
    if benign and cfg.kl_weight > 0:
        benign_ids = [f["input_ids"] for f in encode_examples(tokenizer, benign, cfg.train.max_length)]
        for i, f in enumerate(features):
            f["kl_input_ids"] = benign_ids[i % len(benign_ids)]
    if cfg.refusal_weight > 0:
        encoded = encode_examples(tokenizer, refusals, cfg.train.max_length)
        for i, f in enumerate(features):
            refusal = encoded[i % len(encoded)]
            f["refusal_input_ids"], f["refusal_labels"] = refusal["input_ids"], refusal["labels"]
    return features


def fit_vector(
    model,
    tokenizer,
    harmful: Sequence[dict],
    benign: Sequence[dict],
    cfg: VectorConfig,
    out_dir: str | Path,
    base_model_hash: str = "",
    callbacks: Sequence = (),
    validation: Sequence[dict] = (),
    hardware: Hardware = CPU,
    refusals: Sequence[dict] = (),
) -> tuple[PeftModel, dict]:
    """Fit the security vector on harmful (prompt, response) chats and save it with its metadata.

    Args:
        model: the aligned backbone (it is wrapped, not copied).
        harmful: chats ending in the harmful response (the `sv_fit` role).
        benign: benign chats for the KL term (may be empty: no KL term).
        out_dir: where the adapter and `vector.json` go.
        base_model_hash: recorded so a vector is never used on a different backbone by mistake.
        callbacks: extra Trainer callbacks (e.g. progress reporting).
        validation: held-out harmful chats (`sv_val`) that pick the epoch when `cfg.select_epoch` is
            "validation".
        hardware: device and precision of the training loop (default: CPU, fp32).
        refusals: the base's refusals of harmful prompts, for `cfg.refusal_weight`'s unlikelihood term.

    Returns:
        The backbone wrapped with the active vector (frozen after fitting) and the metadata dict.
    """
    if not harmful:
        raise ValueError("vector fitting needs harmful examples (the 'sv_fit' role is empty)")
    if cfg.select_epoch == "validation" and not validation:
        raise ValueError("vector.select_epoch 'validation' needs held-out harmful examples (the 'sv_val' role)")
    if cfg.refusal_weight > 0 and not refusals:
        raise ValueError("vector.refusal_weight > 0 needs refusals of harmful prompts (harmful `align` chats)")
    out = Path(out_dir)
    peft_model = attach_vector(model, cfg)
    best = BestEpoch(peft_model, tokenizer, validation) if cfg.select_epoch == "validation" else None
    features = _fitting_features(tokenizer, harmful, benign, refusals, cfg)
    log.info("vector: fitting on %d harmful chats, KL weight %.2f on %d benign", len(harmful), cfg.kl_weight,
             len(benign) if "kl_input_ids" in features[0] else 0)

    def set_objective(trainer: VectorTrainer) -> None:
        trainer.cfg = cfg

    history = train(peft_model, features, cfg.train, out.with_name(out.name + "-ckpt"),
                    pad_id=tokenizer.pad_token_id, trainer_cls=VectorTrainer, on_trainer=set_objective,
                    callbacks=[*callbacks, best] if best else callbacks, hardware=hardware)
    freeze_vector(peft_model)
    selected = {}
    if best:
        selected = {"selected_epoch": best.restore(), "validation_losses": best.losses}
        log.info("vector: epoch %d has the lowest held-out harmful loss (%.3f)", selected["selected_epoch"],
                 min(best.losses.values()))
    metadata = {
        "data_sha256": examples_hash(harmful, benign if cfg.kl_weight > 0 else [], validation if best else [],
                                     *([refusals] if cfg.refusal_weight > 0 else [])),
        "base_model_sha256": base_model_hash,
        "n_harmful": len(harmful),
        "n_benign": len(benign) if cfg.kl_weight > 0 else 0,
        "config": cfg.model_dump(),
        "final_loss": next((r["train_loss"] for r in reversed(history) if "train_loss" in r), None),
        **selected,
    }
    save_vector(peft_model, out, metadata)
    return peft_model, {**metadata, "history": history}


def freeze_vector(peft_model: PeftModel) -> None:
    """Keep the vector active but frozen (peft's disable_adapter/set_adapter re-enable its gradients)."""
    for name, param in peft_model.named_parameters():
        if is_vector_param(name):
            param.requires_grad_(False)


@contextmanager
def vector_disabled(peft_model: PeftModel) -> Iterator[None]:
    """Run with the vector off and any other adapter (a task LoRA) still on; restore every requires_grad.

    peft's own switches (disable_adapter, set_adapter) silently make adapters trainable again, which
    would let guarded fine-tuning update the vector, so the gradient flags are put back exactly.
    """
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    active = list(peft_model.base_model.active_adapters)
    others = [a for a in active if a != VECTOR_NAME]
    try:
        if others:
            peft_model.base_model.set_adapter(others)
            yield
        else:
            with peft_model.disable_adapter():
                yield
    finally:
        if others:
            peft_model.base_model.set_adapter(active)
        for name, param in peft_model.named_parameters():
            param.requires_grad_(flags[name])


def save_vector(peft_model: PeftModel, out_dir: Path, metadata: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, selected_adapters=[VECTOR_NAME], safe_serialization=True)
    weights = next((out_dir / VECTOR_NAME).glob("*.safetensors"))
    metadata["weights_sha256"] = sha256_file(weights)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def load_vector(model, vector_dir: str | Path, base_model_hash: str | None = None) -> PeftModel:
    """Attach a saved security vector to `model`, active and frozen.

    Raises:
        ValueError: the vector was fitted on a different backbone, or its weights were altered.
    """
    path = Path(vector_dir)
    meta = json.loads((path / METADATA_FILE).read_text())
    if base_model_hash and meta.get("base_model_sha256") and meta["base_model_sha256"] != base_model_hash:
        raise ValueError(f"{path}: vector was fitted on base {meta['base_model_sha256'][:12]}, "
                         f"not on this backbone ({base_model_hash[:12]})")
    weights = next((path / VECTOR_NAME).glob("*.safetensors"))
    if sha256_file(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights}: sha256 differs from the one recorded in {METADATA_FILE}")
    peft_model = PeftModel.from_pretrained(model, path / VECTOR_NAME, adapter_name=VECTOR_NAME, is_trainable=False)
    freeze_vector(peft_model)
    return peft_model


def load_with_vector(base_dir: str | Path, vector_dir: str | Path, base_sha256: str, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[PeftModel, object]:
    """The base model from its directory with the saved vector attached (active, frozen), and its tokenizer."""
    model, tokenizer = load_causal_lm(base_dir, device=device, dtype=dtype)
    return load_vector(model, vector_dir, base_sha256), tokenizer


def vector_coverage(peft_model: PeftModel, tokenizer, examples: Sequence[dict], first_k: int = 8) -> dict:
    """Harmful-response loss with the vector on and off, over the whole response and its first k tokens.

    A ratio well below 1 means the vector already "knows" these samples, so guarded fine-tuning will not
    learn them. A ratio near 1 means the vector only memorised its own fitting data and protects nothing.
    """
    loss_on = mean_response_loss(peft_model, tokenizer, examples)
    first_on = mean_response_loss(peft_model, tokenizer, examples, first_k)
    with vector_disabled(peft_model):
        loss_off = mean_response_loss(peft_model, tokenizer, examples)
        first_off = mean_response_loss(peft_model, tokenizer, examples, first_k)
    return {
        "n": len(examples),
        "loss_on": loss_on,
        "loss_off": loss_off,
        "ratio": loss_on / loss_off,
        "first_k": first_k,
        "first_k_loss_on": first_on,
        "first_k_loss_off": first_off,
        "first_k_ratio": first_on / first_off,
    }
