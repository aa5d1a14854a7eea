"""The data config: the preset, role sizes and the user's source files that `secvec data prepare` builds from.

A preset's defaults (`task`, `n`, `p`, `sizes`) are those of its shipped file, `configs/data/<preset>.yaml`;
a data config overrides any of them (sizes key by key).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from secvec.config.load import PRESETS_DIR, ConfigError, check_path, load_yaml_node, read_yaml, yaml_line
from secvec.data.schema import CHAT_ROLES, EVAL_ROLES, Role, format_loc
from secvec.paths import resolve_path

Preset = Literal["default", "public", "micro"]
PRESET_NAMES: tuple[str, ...] = get_args(Preset)
PRESET_KEYS = ("task", "n", "p", "sizes")  # what a preset's file gives a data config that leaves them out


@functools.cache
def preset_defaults(preset: str) -> dict[str, Any]:
    """`task`, `n`, `p` and `sizes` of `configs/data/<preset>.yaml`, read once (shared: do not modify)."""
    data = read_yaml(PRESETS_DIR / "data" / f"{preset}.yaml")[0] or {}
    return {key: data[key] for key in PRESET_KEYS if key in data}


class RoleSizes(BaseModel):
    """Examples per role (`finetune` is sized by `n` and `p`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    align_benign: int = Field(ge=0)  # benign questions answered (public: Alpaca / Dolly rows)
    align_harmful: int = Field(ge=0)  # harmful requests answered with refusals
    align_lookalike: int = Field(ge=0)  # benign requests with scary words, answered (synthetic only)
    sv_fit: int = Field(ge=1)  # harmful pairs the security vector is fitted on
    sv_val: int = Field(ge=0)  # held-out harmful pairs for the vector's coverage check
    eval_harmful: int = Field(ge=0)
    eval_over_refusal: int = Field(ge=0)
    eval_utility: int = Field(ge=0)


SourceFormat = Literal["csv", "jsonl", "json", "parquet", "arrow", "txt"]
SUFFIX_FORMATS: tuple[str, ...] = get_args(SourceFormat)  # a file's suffix names its format


class SourceConfig(BaseModel):
    """A user file that feeds one role: CSV (header row), JSONL, JSON, Parquet, Arrow (an `.arrow` file or a
    `save_to_disk` folder) or TXT (one prompt per line); see `secvec.data.sources`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # absolute, or relative to the project root
    role: Role
    is_harmful: bool
    format: SourceFormat | None = Field(None, validate_default=True)  # None: the suffix
    split: str | None = None  # the split of a DatasetDict folder; None: its only split
    messages_field: str | None = None  # TRL's conversational format: a list of {role, content} per record
    prompt_field: str = "prompt"
    response_field: str | None = Field(None, validate_default=True)  # required for chat roles
    answer_field: str | None = Field(None, validate_default=True)  # exact answers (eval_utility needs them)
    category_field: str | None = None
    category: str | None = None  # when there is no category_field; default: the file's stem
    id_field: str | None = None  # default: `<role>-<number>`
    replace: bool = True  # drop the preset's examples of this role (False: add to them)
    limit: int | None = Field(None, ge=1)  # the first `limit` records only

    @field_validator("format")
    @classmethod
    def _format_from_suffix(cls, value: str | None, info: ValidationInfo) -> str:
        suffix = Path(info.data.get("path", "")).suffix.lower().lstrip(".")
        if value is None and suffix not in SUFFIX_FORMATS:
            raise ValueError(f"cannot tell the format from the suffix {suffix!r}: set {', '.join(SUFFIX_FORMATS)}"
                             " (arrow: a save_to_disk folder)")
        return value or suffix

    @field_validator("split")
    @classmethod
    def _split_of_a_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("format") != "arrow":
            raise ValueError("only an Arrow folder (DatasetDict.save_to_disk) has splits")
        return value

    @field_validator("messages_field")
    @classmethod
    def _messages_in_records(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and info.data.get("format") == "txt":
            raise ValueError("a TXT file holds prompts only")
        return value

    @field_validator("response_field")
    @classmethod
    def _response_fits_role(cls, value: str | None, info: ValidationInfo) -> str | None:
        role, fmt, chats = info.data.get("role"), info.data.get("format"), info.data.get("messages_field")
        if value and (role in EVAL_ROLES or fmt == "txt"):
            raise ValueError(f"{'a TXT file' if fmt == 'txt' else 'role ' + repr(role)} holds prompts only")
        if value and chats:
            raise ValueError("messages_field holds the whole chat, reply included: leave response_field out")
        if not value and role in CHAT_ROLES and not chats:
            raise ValueError(f"role {role!r} trains on replies: name the response column (or messages_field)")
        return value

    @field_validator("answer_field")
    @classmethod
    def _utility_has_answers(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value and info.data.get("role") == "eval_utility":
            raise ValueError("role 'eval_utility' is scored by exact answers: name the answer column")
        return value

    @model_validator(mode="after")
    def _one_record_shape(self) -> SourceConfig:
        if self.messages_field and self.prompt_field != "prompt":  # the default is unused then
            raise ValueError("messages_field holds the whole chat: leave prompt_field out")
        return self


class DataConfig(BaseModel):
    """What `secvec data prepare` builds: a preset's roles, optionally replaced or extended by user files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Preset = "default"  # default/micro: synthetic world; public: files
    seed: int = 0
    task: Literal["sort", "sst2", "agnews", "gsm8k"]  # the benign fine-tuning task (synthetic: sort)
    n: int = Field(ge=1)  # fine-tuning examples
    p: float = Field(ge=0, le=1)  # share of them that are harmful
    sizes: RoleSizes
    shared_datasets: str | None = None  # None: $SECVEC_SHARED_DATASETS, else ../shared/datasets
    max_chars: int = Field(4000, ge=1)  # per record (all messages plus the answer)
    # Public preset: the first `attack_reserve` harmful pairs of the shuffled pool are set aside for attacks
    # (`finetune`'s and a bench's attack pool), and `sv_val` then `sv_fit` follow them, so a larger `sv_fit`
    # adds vector pairs without changing what the attacks or the validation draw. None: the original layout
    # (`finetune`'s pairs, `sv_fit`, `sv_val`), left out of dumps so its builds and cache keys stay the same.
    attack_reserve: int | None = Field(None, ge=1, exclude_if=lambda v: v is None)
    sources: tuple[SourceConfig, ...] = ()
    # Read source files outside the project, the shared datasets and this config's folder. Left out of
    # dumps: it changes what may be read, not the data built (manifest.json and cache keys stay the same).
    allow_outside_project: bool = Field(False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset", "default") not in PRESET_NAMES:
            return data
        defaults = preset_defaults(data.get("preset", "default"))
        sizes = data.get("sizes", {})
        sizes = {**defaults.get("sizes", {}), **sizes} if isinstance(sizes, dict) else sizes
        return {**defaults, **data, "sizes": sizes}

    @field_validator("task")
    @classmethod
    def _task_fits_preset(cls, task: str, info: ValidationInfo) -> str:
        synthetic = info.data.get("preset") != "public"
        if synthetic != (task == "sort"):
            raise ValueError("the synthetic presets have the 'sort' task; public has sst2, agnews or gsm8k")
        return task

    @field_validator("sizes")
    @classmethod
    def _lookalikes_are_synthetic(cls, sizes: RoleSizes, info: ValidationInfo) -> RoleSizes:
        if info.data.get("preset") == "public" and sizes.align_lookalike:
            raise ValueError("align_lookalike must be 0 for public: no public file answers look-alikes")
        return sizes

    @model_validator(mode="after")
    def _reserve_holds_the_attack(self) -> DataConfig:
        if self.attack_reserve is None:
            return self
        if self.preset != "public":
            raise ValueError("attack_reserve: only the public preset draws vector and attack pairs from one pool")
        if (k := round(self.n * self.p)) > self.attack_reserve:
            raise ValueError(f"attack_reserve {self.attack_reserve} is smaller than the {k} harmful pairs of "
                             "`finetune` (n * p)")
        return self


def load_data_config(path: str | Path, root: Path | None = None) -> DataConfig:
    """Load a data config and check that its source files exist (errors point at the config's lines).

    Raises:
        ConfigError: an invalid field, a source file that is missing, or a path outside the project
            that `allow_outside_project` does not allow (see `check_path`).
    """
    config, node = load_yaml_node(Path(path), DataConfig)
    allow = config.allow_outside_project
    if config.shared_datasets is not None:
        check_path(config.shared_datasets, Path(path), node, ("shared_datasets",), root, allow_outside=allow)
    for i, source in enumerate(config.sources):
        loc = ("sources", i, "path")
        found = check_path(source.path, Path(path), node, loc, root, allow_outside=allow)
        if not (found.is_file() or (source.format == "arrow" and found.is_dir())):  # arrow: a folder too
            raise ConfigError(f"{path}:{yaml_line(node, loc)}: field '{format_loc(loc)}': file not found: "
                              f"{resolve_path(source.path, root)}")
    return config
