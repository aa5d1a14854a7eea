"""What stages hand each other: small frozen records whose identity is a content hash, never a path.

A stage's cache key is built from the identities of its inputs (`identity`), so the same weights or data
found in another folder are the same input.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from secvec.data.versioning import dataset_md5
from secvec.models import hash_model_dir


class Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def identity(self) -> str:
        raise NotImplementedError

    @property
    def path(self) -> Path:
        return Path(self.dir)  # type: ignore[attr-defined]


class HashedDir(Ref):
    """A folder of weights and the sha256 that identifies its contents."""

    dir: str
    sha256: str

    @property
    def identity(self) -> str:
        return self.sha256


class ModelRef(HashedDir):
    """A Hugging Face model directory; sha256 over its weights and tokenizer (`models.hash_model_dir`)."""

    @classmethod
    def of(cls, model_dir: str | Path) -> ModelRef:
        return cls(dir=str(model_dir), sha256=hash_model_dir(model_dir))


class DataRef(Ref):
    """A dataset folder (one `<role>.jsonl` per role) and its DVC md5 (`data.versioning.dataset_md5`)."""

    dir: str
    md5: str
    counts: dict[str, int] | None = None  # examples per role, where the stage that built it counted them

    @property
    def identity(self) -> str:
        return self.md5

    @classmethod
    def of(cls, data_dir: str | Path, counts: dict[str, int] | None = None) -> DataRef:
        return cls(dir=str(data_dir), md5=dataset_md5(data_dir), counts=counts)


class VectorRef(HashedDir):
    """A saved security vector (`vector.save_vector`); sha256 of its adapter weights."""


class GuardedRef(HashedDir):
    """A guarded model (`guarded.save_guarded`: backbone + adapters); sha256 of all its files."""


class TrainedBase(BaseModel):
    """The bootstrapped aligned base."""

    model_config = ConfigDict(frozen=True)

    model: ModelRef
    params: int
    history: list[dict[str, Any]] = Field(default_factory=list)


class FittedVector(BaseModel):
    """A fitted security vector, its training log and metadata (`vector.json`)."""

    model_config = ConfigDict(frozen=True)

    vector: VectorRef
    history: list[dict[str, Any]] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


class FinetuneResult(BaseModel):
    """Guarded fine-tuning (backbone + adapters: `guarded`) or plain fine-tuning (`model`)."""

    model_config = ConfigDict(frozen=True)

    arm: str  # guarded | plain
    guarded: GuardedRef | None = None
    model: ModelRef | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    probes: list[dict[str, Any]] = Field(default_factory=list)


class CleanModel(BaseModel):
    """The stripped backbone and the check that stripping left a plain model."""

    model_config = ConfigDict(frozen=True)

    model: ModelRef
    strip_check: dict[str, Any]


def identity(value: Any) -> Any:
    """What a cache key sees of a stage input: a ref's content hash, a config's fields, anything else as is."""
    if isinstance(value, Ref):
        return value.identity
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [identity(v) for v in value]
    if isinstance(value, dict):
        return {k: identity(v) for k, v in value.items()}
    return value


def digest(*parts: Any) -> str:
    """sha256 (hex) of the parts' identities: what a cache key or a study name is made of."""
    return hashlib.sha256(json.dumps(identity(list(parts)), sort_keys=True, default=str).encode()).hexdigest()
