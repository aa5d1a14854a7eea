"""Our guarded fine-tuning vs a stock transformers Trainer run of the same job, set up the naive way."""

from __future__ import annotations

import tempfile

from datasets import Dataset
from transformers import Trainer, TrainingArguments, default_data_collator

from benchmarks.common import StepMeter, paired_ratio, result, with_vector, workload
from benchmarks.common import build_model as build
from benchmarks.training import Run, alternate, timed_finetune
from secvec.config import TrainConfig
from secvec.encoding import IGNORE_INDEX, encode_examples


def padded_features(examples: list[dict], max_length: int) -> Dataset:
    """The same token ids and response-only labels as ours, padded to max_length as a naive setup does."""
    tokenizer = workload().tokenizer
    rows = []
    for feature in encode_examples(tokenizer, examples, max_length):
        fill = max_length - len(feature["input_ids"])
        rows.append({"input_ids": feature["input_ids"] + [tokenizer.pad_token_id] * fill,
                     "attention_mask": [1] * len(feature["input_ids"]) + [0] * fill,
                     "labels": feature["labels"] + [IGNORE_INDEX] * fill})
    return Dataset.from_list(rows)


def reference_run(model, examples: list[dict], cfg: TrainConfig) -> Run:
    """Plain `Trainer` with `default_data_collator` on max_length-padded rows, same optimiser settings."""
    meter = StepMeter(model, workload().tokenizer.pad_token_id)
    dataset = padded_features(examples, cfg.max_length)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.batch_size,
                                 learning_rate=cfg.learning_rate, max_steps=cfg.max_steps,
                                 lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, seed=cfg.seed,
                                 use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                          callbacks=[meter])
        model.train()
        trainer.train()
        model.eval()
    return Run(meter.tokens_per_s, meter.wasted_share, 0.0)


def vs_reference_trainer(size: str = "tiny", steps: int = 8, rounds: int = 3, batch_size: int = 32,
                         max_length: int = 128) -> list[dict]:
    """Real (non-pad) tokens/s of secvec's guarded fine-tuning over the reference Trainer run.

    Same architecture and initial weights, data and order, batch size, max length, learning rate and
    schedule; the reference trains the plain model, so the ratio also carries the vector's cost.
    """
    tokenizer = workload().tokenizer
    examples = workload().examples(steps * batch_size)
    cfg = TrainConfig(learning_rate=3e-4, batch_size=batch_size, max_steps=steps, max_length=max_length)
    ours, theirs = with_vector(build(tokenizer, size)), build(tokenizer, size)
    arms = {"secvec_guarded": lambda: timed_finetune(ours, examples, steps, batch_size),
            "reference_trainer": lambda: reference_run(theirs, examples, cfg)}
    alternate({"secvec_guarded": lambda: timed_finetune(ours, examples[: 2 * batch_size], 2, batch_size),
               "reference_trainer": lambda: reference_run(theirs, examples[: 2 * batch_size],
                                                          cfg.model_copy(update={"max_steps": 2}))}, 1)
    runs = alternate(arms, rounds)
    tps = {arm: [r.tokens_per_s for r in runs[arm]] for arm in arms}
    ratio = paired_ratio(tps["secvec_guarded"], tps["reference_trainer"])
    return [result("vs_reference_trainer", ratio["median"], "ratio of real tokens/s (secvec guarded / reference)",
                   target=">= 1.0", passed=ratio["median"] >= 1.0, model=size, steps_per_run=steps,
                   batch_size=batch_size, max_length=max_length, rounds=rounds, ratio=ratio,
                   tokens_per_s={arm: round(sorted(v)[len(v) // 2], 1) for arm, v in tps.items()},
                   wasted_token_share={arm: round(runs[arm][0].wasted_share, 4) for arm in arms},
                   reference="stock Trainer, rows padded to max_length, default_data_collator, plain model")]
