"""The one training loop every stage uses: transformers' Trainer with response-only loss, on the configured
device and precision (secvec.device)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import safetensors.torch
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments

from secvec.config import TrainConfig
from secvec.device import CPU, Hardware
from secvec.encoding import PadCollator, encode_examples, response_loss

log = logging.getLogger(__name__)
CHECKPOINT_WEIGHTS = "model.safetensors"  # a guarded or LoRA model's whole weights in a checkpoint


class LossHistory(TrainerCallback):
    """Keeps every logged training record (step, loss, learning rate, ...) for MLflow and plots."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run starts with the checkpoint's log (its steps are not trained again): without it the
        # history would begin at the checkpoint and differ from an uninterrupted run's.
        self.records = [{"step": r["step"], **{k: float(v) for k, v in r.items() if k != "step"}}
                        for r in state.log_history]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.records.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def training_arguments(cfg: TrainConfig, out_dir: str | Path, hardware: Hardware = CPU) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.scheduler if cfg.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        **({"optim": "sgd"} if cfg.optimizer == "sgd" else {}),  # adamw: the Trainer's default AdamW
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=hardware.device == "cpu",
        bf16=hardware.precision == "bf16",  # autocast over fp32 master weights
        fp16=hardware.precision == "fp16",
        # non-reentrant: gradients reach a LoRA whose frozen backbone's inputs need none (vector fitting)
        **({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
           if hardware.gradient_checkpointing else {}),
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress_bar,
    )


class SecvecTrainer(Trainer):
    """Trainer whose checkpoints hold the whole model, also when it is wrapped by peft.

    Trainer saves only adapter weights for a PeftModel, which would lose the backbone that guarded
    fine-tuning trains; resuming loads this file back with safetensors' `load_model`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Data-parallel ranks (secvec.launch) match one process only when each rank's summed token loss is
        # divided by the token count of all ranks' batches (num_items_in_batch, gathered); a model whose
        # forward takes no loss kwargs gets the mean of per-rank means instead.
        token_mean = self.model_accepts_loss_kwargs and self.args.average_tokens_across_devices
        if self.args.world_size > 1 and not token_mean:
            log.warning("%d processes: the loss is not averaged over all ranks' tokens, so the gradient "
                        "differs from one process's", self.args.world_size)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        safetensors.torch.save_model(model, os.path.join(output_dir, CHECKPOINT_WEIGHTS))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(self.model if model is None else model)
        if not isinstance(model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # The file `_save` wrote, read by its counterpart: it knows which tied weights (embeddings shared with
        # the LM head) the file leaves out, where Trainer's loader warns they are missing; strict, it raises
        # for any other missing weight.
        safetensors.torch.load_model(model, os.path.join(resume_from_checkpoint, CHECKPOINT_WEIGHTS))


def last_checkpoint(out_dir: str | Path) -> str | None:
    """The newest complete checkpoint (trainer state written, which Trainer does last), if any."""
    done = [p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()
            and p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def train(
    model: torch.nn.Module,
    features: Sequence[dict],
    cfg: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
    trainer_cls: type[Trainer] = SecvecTrainer,
    callbacks: Sequence[TrainerCallback] = (),
    on_trainer: Callable[[Trainer], None] | None = None,
    hardware: Hardware = CPU,
) -> list[dict[str, float]]:
    """Train `model` in place on encoded features; returns the logged loss history.

    A run killed mid-way and started again with the same out_dir resumes from its last checkpoint
    (weights, optimizer, scheduler, RNG and data position); checkpoints are removed after success.

    Args:
        features: dicts of token-id lists (`input_ids`, `labels`, optionally `kl_input_ids`).
        trainer_cls: a Trainer subclass when the stage needs its own loss.
        on_trainer: called with the trainer before training (e.g. to attach extra state).
        hardware: device, precision and gradient checkpointing (default: the CPU in fp32).
    """
    if not features:
        raise ValueError("no training examples (empty dataset)")
    history = LossHistory()
    trainer = trainer_cls(
        model=model,
        args=training_arguments(cfg, out_dir, hardware),
        train_dataset=Dataset.from_list(list(features)),
        data_collator=PadCollator(pad_id),
        callbacks=[history, *callbacks],
    )
    if on_trainer:
        on_trainer(trainer)
    resume = last_checkpoint(out_dir)
    if resume:  # a warning: an earlier attempt died here, which the user should hear about
        log.warning("resuming from %s, the last checkpoint of an interrupted attempt", resume)
    model.train()
    trainer.train(resume_from_checkpoint=resume)
    # Mixed precision wraps model.forward in autocast for good; later evaluation and the strip check must see
    # the model's own forward (full precision), so the wrapper goes.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()
    # Under torchrun every rank must be done writing (its RNG state) before rank 0 removes the checkpoints.
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        for checkpoint in Path(out_dir).glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    return history.records


@torch.no_grad()
def response_losses(model, tokenizer, examples: Sequence[dict], first_k: int | None = None,
                    batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """Per-example response loss (mean over all response tokens, or the first k), in example order."""
    features = encode_examples(tokenizer, examples, max_length)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[i : i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.append(response_loss(logits.float(), batch["labels"], first_k).cpu())
    model.train(was_training)
    return torch.cat(losses)


def mean_response_loss(model, tokenizer, examples: Sequence[dict], first_k: int | None = None,
                       batch_size: int = 32, max_length: int = 256) -> float:
    """Mean over examples of the per-example response loss (all response tokens, or the first k)."""
    return response_losses(model, tokenizer, examples, first_k, batch_size, max_length).mean().item()
