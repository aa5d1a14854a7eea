"""Guarded fine-tuning (step 2 of the method): train the backbone with the security vector active and frozen.

Harmful samples are already fitted by the vector, so their loss is low and the backbone barely moves
toward them; benign samples are learned as usual.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from secvec.config import FinetuneConfig
from secvec.data import load_role
from secvec.device import CPU, Hardware
from secvec.encoding import encode_examples
from secvec.models import find_lora_targets, load_causal_lm, lora_fan_in_fan_out, sha256_file
from secvec.training import mean_response_loss, train
from secvec.vector import VECTOR_NAME, is_vector_param, vector_disabled

log = logging.getLogger(__name__)

TASK_ADAPTER = "task"


def vector_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if is_vector_param(n)}


def assert_vector_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Raise unless every vector weight equals the snapshot bit for bit."""
    current = {n: p.detach() for n, p in model.named_parameters() if is_vector_param(n)}
    if current.keys() != snapshot.keys():
        raise RuntimeError("the set of security-vector parameters changed during fine-tuning")
    changed = [n for n, t in snapshot.items() if not torch.equal(t, current[n])]
    if changed:
        raise RuntimeError(f"security-vector weights changed during fine-tuning: {changed[:3]}")


def _set_trainable(model: PeftModel, mode: str) -> None:
    for name, param in model.named_parameters():
        is_task = f".{TASK_ADAPTER}." in name
        param.requires_grad_(is_task if mode == "lora" else not (is_vector_param(name) or is_task))


def add_task_lora(model: PeftModel, cfg: FinetuneConfig) -> None:
    """Add a trainable task LoRA beside the vector; both are active in the forward pass."""
    targets = model.peft_config[VECTOR_NAME].target_modules
    targets = sorted(targets) if targets else find_lora_targets(model.get_base_model())
    lora = LoraConfig(r=cfg.task_rank, lora_alpha=cfg.task_alpha, lora_dropout=0.0, target_modules=targets,
                      fan_in_fan_out=lora_fan_in_fan_out(model.get_base_model(), targets),
                      bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # its start depends on the config alone (see attach_vector)
        torch.manual_seed(cfg.train.seed)
        model.add_adapter(TASK_ADAPTER, lora)
    model.base_model.set_adapter([VECTOR_NAME, TASK_ADAPTER])


class VectorGuard(TrainerCallback):
    """Asserts when training starts and ends that the vector is frozen and bit-identical."""

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.snapshot = vector_snapshot(model)

    def on_train_begin(self, args, state, control, **kwargs):
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad and is_vector_param(n)]
        if trainable:
            raise RuntimeError(f"security vector is trainable at the start of fine-tuning: {trainable[:3]}")
        assert_vector_unchanged(self.model, self.snapshot)

    def on_train_end(self, args, state, control, **kwargs):
        assert_vector_unchanged(self.model, self.snapshot)


class LossProbe(TrainerCallback):
    """Every N steps, mean response loss of probe sets (e.g. harmful / benign samples) as training sees them
    and, for a guarded model, with the vector off (what the clean backbone will do)."""

    def __init__(self, model, tokenizer, probes: dict[str, Sequence[dict]], every: int,
                 vector_off: Callable[[], AbstractContextManager] | None = None) -> None:
        self.model, self.tokenizer, self.probes, self.every = model, tokenizer, probes, every
        self.vector_off = vector_off  # None: a plain model, nothing to switch off
        self.records: list[dict[str, float]] = []

    def _measure(self, step: int) -> None:
        record: dict[str, float] = {"step": step}
        for name, examples in self.probes.items():
            record[f"{name}_loss"] = mean_response_loss(self.model, self.tokenizer, examples)
            if self.vector_off:
                with self.vector_off():
                    record[f"{name}_loss_vector_off"] = mean_response_loss(self.model, self.tokenizer, examples)
        self.records.append(record)

    def on_train_begin(self, args, state, control, **kwargs):
        self._measure(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._measure(state.global_step)


class WeightDecayCorrection(TrainerCallback):
    """AdamW decays W + dW in merged mode; add back lr * wd * dW after each step so only W decays."""

    def __init__(self, deltas: Mapping[torch.nn.Parameter, torch.Tensor]) -> None:
        self.deltas = deltas

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        with torch.no_grad():
            for group in optimizer.param_groups:
                if group["weight_decay"]:
                    for param in group["params"]:
                        if param in self.deltas:
                            param.add_(self.deltas[param], alpha=group["lr"] * group["weight_decay"])


class VectorDeltas(Mapping):
    """Target weight -> the vector's dW, recomputed from the frozen adapter on each access.

    B·A costs rank x in x out per layer, far less than a training step, and holding no copy of dW keeps
    merged mode's memory at plain fine-tuning's (a stored dW per weight would add one model's worth).
    """

    def __init__(self, layers: Sequence[LoraLayer]) -> None:
        self._layers = {m.get_base_layer().weight: m for m in layers}

    def __getitem__(self, weight: torch.nn.Parameter) -> torch.Tensor:
        return self._layers[weight].get_delta_weight(VECTOR_NAME).detach()

    def __contains__(self, weight: object) -> bool:
        return weight in self._layers

    def __iter__(self) -> Iterator[torch.nn.Parameter]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


@contextmanager
def deltas_removed(deltas: Mapping[torch.nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Briefly take a merged vector back out of the weights (for a vector-off measurement), bit-exact."""
    saved = {w: w.detach().clone() for w in deltas}
    with torch.no_grad():
        for weight, delta in deltas.items():
            weight.sub_(delta)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, copy in saved.items():
                weight.copy_(copy)


@contextmanager
def vector_merged(model: PeftModel) -> Iterator[VectorDeltas]:
    """Fold the vector into its target weights (W += dW) with its adapter path off; undo at exit.

    Frozen weights (task-LoRA mode) are restored bit for bit; trained weights get dW subtracted, which
    leaves the backbone the adapter path would have trained, up to float32 rounding.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and VECTOR_NAME in m.lora_A]
    deltas = VectorDeltas(layers)
    frozen = {w: w.detach().clone() for w in deltas if not w.requires_grad}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with vector_disabled(model), torch.no_grad():
        for weight, delta in deltas.items():
            weight.add_(delta)
        for name, param in model.named_parameters():  # peft's switch above resets them
            param.requires_grad_(flags[name])
        try:
            with torch.enable_grad():
                yield deltas
        finally:
            for weight, delta in deltas.items():
                weight.copy_(frozen[weight]) if weight in frozen else weight.sub_(delta)


@contextmanager
def vector_scaled(model: torch.nn.Module, scale: float) -> Iterator[None]:
    """The vector's LoRA scaling x `scale` inside the block (both paths read it: the adapter's forward and
    merged mode's dW); the fitted value back at exit, so the saved vector is the fitted one."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and VECTOR_NAME in m.scaling]
    fitted = [m.scaling[VECTOR_NAME] for m in layers]
    for m in layers:
        m.scaling[VECTOR_NAME] *= scale
    try:
        yield
    finally:
        for m, value in zip(layers, fitted, strict=True):
            m.scaling[VECTOR_NAME] = value


def _drop_vector_dropout(model: torch.nn.Module) -> None:
    # A vector with dropout would behave differently here than when it was fitted (and than merged mode).
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and VECTOR_NAME in dropouts:
            dropouts[VECTOR_NAME] = torch.nn.Identity()


def finetune(
    model,
    tokenizer,
    examples: Sequence[dict],
    cfg: FinetuneConfig,
    out_dir: str | Path,
    probes: dict[str, Sequence[dict]] | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    hardware: Hardware = CPU,
) -> dict:
    """Fine-tune on `examples`: guarded when `model` carries the security vector, plain otherwise.

    The same function serves the plain reference arm, so both arms share loop, data order and settings.
    Merged mode needs float32 master weights to be exact (W + dW - dW); with weights held in a half dtype
    it falls back to the adapter path, with a warning (bf16/fp16 precision trains fp32 masters under
    autocast, so it keeps merged mode).

    Returns:
        {"history": trainer log records, "probes": probe records}
    """
    guarded = isinstance(model, PeftModel) and VECTOR_NAME in model.peft_config
    callbacks = list(callbacks)
    if guarded:
        _drop_vector_dropout(model)
        if cfg.mode == "lora":
            add_task_lora(model, cfg)
        _set_trainable(model, cfg.mode)
        callbacks.append(VectorGuard(model))
    elif cfg.mode == "lora":
        raise ValueError("task-LoRA mode needs the security vector attached (plain runs use mode 'full')")
    merged = guarded and cfg.vector_mode == "merged"
    if merged and (half := {p.dtype for p in model.parameters() if p.requires_grad} - {torch.float32}):
        log.warning("finetune: merged vector mode is exact only over float32 weights, these are %s: "
                    "using the adapter path", sorted(map(str, half)))
        merged = False
    probe = None
    if probes and cfg.probe_steps:
        probe = LossProbe(model, tokenizer, probes, cfg.probe_steps)
        callbacks.append(probe)
        if guarded and not merged:
            probe.vector_off = lambda: vector_disabled(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("finetune: %s, mode %s (vector %s), %d examples, %.2fM trainable params",
             "guarded" if guarded else "plain", cfg.mode, cfg.vector_mode if guarded else "-", len(examples),
             n_train / 1e6)
    features = encode_examples(tokenizer, examples, cfg.train.max_length)

    def run() -> list[dict]:
        return train(model, features, cfg.train, Path(out_dir), pad_id=tokenizer.pad_token_id, callbacks=callbacks,
                     hardware=hardware)

    with vector_scaled(model, cfg.vector_scale if guarded else 1.0):
        if merged:
            with vector_merged(model) as deltas:
                callbacks.append(WeightDecayCorrection(deltas))
                if probe:
                    probe.vector_off = lambda: deltas_removed(deltas)
                history = run()
        else:
            history = run()
    return {"history": history, "probes": probe.records if probe else []}


PROBE_SIZE = 32


def probe_sets(data_dir: str | Path) -> dict[str, list[dict]]:
    """Harmful and benign samples of the fine-tuning set whose loss is tracked during training (`sv_val`
    stands in for the harmful ones when the fine-tuning set has none)."""
    examples = load_role(data_dir, "finetune")
    harmful = [ex for ex in examples if ex["is_harmful"]] or load_role(data_dir, "sv_val")
    return {"harmful": harmful[:PROBE_SIZE], "benign": [ex for ex in examples if not ex["is_harmful"]][:PROBE_SIZE]}


def guarded_sha256(guarded_dir: str | Path) -> str:
    """sha256 over every file of a saved guarded model (backbone weights, tokenizer, adapters)."""
    root = Path(guarded_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def save_guarded(model: PeftModel, tokenizer, out_dir: str | Path) -> Path:
    """Save a guarded model as `backbone/` (plain weights) + `adapters/<name>/` (vector, task LoRA)."""
    out = Path(out_dir)
    base = model.get_base_model()
    # Inside peft, a wrapped layer's own weight is `<name>.base_layer.weight`; the plain name drops it.
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(out / "backbone", state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out / "backbone")
    model.save_pretrained(out / "adapters", safe_serialization=True)
    return out


def load_guarded(guarded_dir: str | Path, device: str = "cpu") -> tuple[PeftModel, object]:
    """Rebuild a guarded model saved by `save_guarded`: vector (and task LoRA) active and frozen."""
    path = Path(guarded_dir)
    backbone, tokenizer = load_causal_lm(path / "backbone", device=device)
    model = PeftModel.from_pretrained(backbone, path / "adapters" / VECTOR_NAME, adapter_name=VECTOR_NAME)
    if (path / "adapters" / TASK_ADAPTER).is_dir():
        model.load_adapter(path / "adapters" / TASK_ADAPTER, adapter_name=TASK_ADAPTER)
        model.base_model.set_adapter([VECTOR_NAME, TASK_ADAPTER])
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model, tokenizer
