"""The effectiveness benchmark's config (`secvec bench`): arms and protocols (expanded into cells by
`secvec.bench.cells`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from secvec.config.load import PRESETS_DIR, load_yaml_config, preset_path
from secvec.config.stages import EvalConfig, TrainConfig

# secvec_screen: vector screening in `drop` mode (samples the vector explains leave the data), then secvec
ARMS = ("base", "plain", "secvec", "secvec_screen", "secvec_lora", "forgetfilter")
Arm = Literal["base", "plain", "secvec", "secvec_screen", "secvec_lora", "forgetfilter"]
PROTOCOLS = ("paper", "sweep", "durability")


class Cell(BaseModel):
    """One fine-tuning job of a protocol: how much harmful and benign data, how hard the attack trains."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    protocol: str
    name: str  # unique within its protocol; used in MLflow metric names
    harmful: int = Field(ge=0)
    benign: int = Field(ge=0)
    lr_scale: float = Field(1.0, gt=0)
    epochs: float | None = Field(None, gt=0)  # None: the bench's fine-tuning epochs
    seeds: int = Field(1, ge=1)
    arms: tuple[Arm, ...] = ARMS


class Protocol(BaseModel):
    """A bench protocol's settings: strict and frozen like every config."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PaperProtocol(Protocol):
    """Zhou et al. 2023: vector from ~100 harmful samples, attack with 1000 harmful samples + the benign task."""

    harmful: int = Field(1000, ge=1)
    benign: int = Field(1000, ge=1)
    seeds: int = Field(3, ge=1)  # the headline rows: mean and std over seeds
    arms: tuple[Arm, ...] = ARMS


class SweepProtocol(Protocol):
    """The field's protocol (Vaccine, Lisa, Booster): n fine-tuning samples, a share p of them harmful."""

    n: int = Field(1000, ge=1)
    p: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)
    seeds: int = Field(1, ge=1)
    arms: tuple[Arm, ...] = ARMS


class DurabilityProtocol(Protocol):
    """A stronger attacker: learning rate x scale and more epochs, then many more harmful samples."""

    harmful: int = Field(1000, ge=1)
    benign: int = Field(1000, ge=0)
    lr_scale: tuple[float, ...] = (1.0, 3.0, 10.0)
    epochs: tuple[float, ...] = (1.0, 3.0)
    max_harmful: int | None = Field(5000, ge=1)  # one more cell: this many harmful samples, lr x1, fewest epochs
    arms: tuple[Arm, ...] = ("base", "plain", "secvec")


class ForgetFilterConfig(BaseModel):
    """Zhao et al. 2023: fine-tune on the noisy data, then briefly on safe data; drop what was forgotten."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    safe_examples: int = Field(200, ge=1)  # refusals from `align`
    safe_train: TrainConfig = Field(default_factory=lambda: TrainConfig(learning_rate=3e-4, epochs=1, batch_size=16))
    threshold: float = Field(0.3, gt=0, le=1)  # drop examples whose ROUGE-1 to their response fell more than this
    max_new_tokens: int = Field(48, ge=1)


class BenchConfig(BaseModel):
    """`secvec bench`: every arm on every cell of the protocols, on one pipeline preset's data and base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pipeline: str = "default"  # preset or pipeline YAML: data, base, vector, fine-tuning and evaluation
    epochs: float | None = Field(None, gt=0)  # fine-tuning epochs of every cell; None: the pipeline's
    # Independently bootstrapped bases (bootstrap seeds 0..bases-1; base 0 is the pipeline's): every cell and
    # seed runs on each, so the spread covers the base too. 1 with a configured base_model.
    bases: int = Field(1, ge=1)
    lora_learning_rate: float = Field(1e-3, gt=0)  # secvec_lora: the task LoRA learns at this rate (x lr_scale)
    paper: PaperProtocol | None = Field(default_factory=PaperProtocol)
    sweep: SweepProtocol | None = Field(default_factory=SweepProtocol)
    durability: DurabilityProtocol | None = Field(default_factory=DurabilityProtocol)
    forgetfilter: ForgetFilterConfig = Field(default_factory=ForgetFilterConfig)
    base_task_examples: int = Field(200, ge=1)  # `align` benign chats that measure stability
    eval: EvalConfig | None = None  # None: the pipeline's evaluation (e.g. fewer prompts for a CPU run)
    experiment: str = "secvec-bench"


def load_bench_config(name_or_path: str | Path) -> BenchConfig:
    """A bench preset (configs/bench/NAME.yaml) or a bench YAML file."""
    return load_yaml_config(preset_path(name_or_path, PRESETS_DIR / "bench"), BenchConfig)
