"""The one training loop every stage uses: transformers' Trainer with response-only loss on CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from datasets import Dataset
from pydantic import BaseModel, ConfigDict, Field
from transformers import Trainer, TrainerCallback, TrainingArguments

from secvec.encoding import PadCollator

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimisation settings shared by bootstrap, vector fitting and fine-tuning."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float = Field(3e-4, gt=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = 1.0
    max_length: int = Field(128, ge=8)
    seed: int = 0
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(0, ge=0)  # 0: no intermediate checkpoints
    progress_bar: bool = True


class LossHistory(TrainerCallback):
    """Keeps every logged training record (step, loss, learning rate, ...) for MLflow and plots."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.records.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


def training_arguments(cfg: TrainConfig, out_dir: str | Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress_bar,
    )


def train(
    model: torch.nn.Module,
    features: Sequence[dict],
    cfg: TrainConfig,
    out_dir: str | Path,
    pad_id: int,
    trainer_cls: type[Trainer] = Trainer,
    callbacks: Sequence[TrainerCallback] = (),
    on_trainer: Callable[[Trainer], None] | None = None,
) -> list[dict[str, float]]:
    """Train `model` in place on encoded features; returns the logged loss history.

    Args:
        features: dicts of token-id lists (`input_ids`, `labels`, optionally `kl_input_ids`).
        trainer_cls: a Trainer subclass when the stage needs its own loss.
        on_trainer: called with the trainer before training (e.g. to attach extra state).
    """
    if not features:
        raise ValueError("no training examples (empty dataset)")
    history = LossHistory()
    trainer = trainer_cls(
        model=model,
        args=training_arguments(cfg, out_dir),
        train_dataset=Dataset.from_list(list(features)),
        data_collator=PadCollator(pad_id),
        callbacks=[history, *callbacks],
    )
    if on_trainer:
        on_trainer(trainer)
    model.train()
    trainer.train()
    model.eval()
    return history.records
