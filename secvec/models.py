"""Load local Hugging Face causal LMs safely, find LoRA targets, and hash model directories."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
HASHED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class ModelLoadError(ValueError):
    """A model directory that cannot be used, with the reason and the path."""


def _weight_files(model_dir: Path, globs: tuple[str, ...]) -> list[Path]:
    return sorted(p for g in globs for p in model_dir.glob(g))


def check_model_dir(model_dir: str | Path, allow_pickle: bool = False) -> Path:
    """Validate that a directory holds a causal LM we are willing to load.

    Raises:
        ModelLoadError: missing directory, config or weights; pickle-only weights (unless allowed);
            a config that is not a causal LM.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    if not _weight_files(path, WEIGHT_GLOBS):
        if _weight_files(path, PICKLE_GLOBS) and not allow_pickle:
            raise ModelLoadError(
                f"{path}: only pickle weights (*.bin/*.pt), which can run code when loaded; "
                "convert them to safetensors or pass allow_pickle=True if you trust the source"
            )
        if not _weight_files(path, PICKLE_GLOBS):
            raise ModelLoadError(f"{path}: no weight files (*.safetensors)")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if raw.get("auto_map"):
        raise ModelLoadError(f"{path}/config.json: field 'auto_map' needs remote code, which secvec never runs")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # transformers raises several types for unknown configs
        raise ModelLoadError(f"{path}/config.json: cannot be read as a transformers config: {err}") from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{path}/config.json: field 'model_type' is {config.model_type!r}, which is not a causal LM"
        )
    return path


def load_tokenizer(model_dir: str | Path):
    """Load a tokenizer that has a chat template and a pad token."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{path}: tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: str | Path, allow_pickle: bool = False):
    """Load `(model, tokenizer)` from a local directory: float32, CPU, eval mode, no remote code."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(model_dir, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=False, use_safetensors=not allow_pickle or None
    )
    model.eval()
    log.info("loaded %s (%s, %.2fM params)", path, model.config.model_type, count_params(model) / 1e6)
    return model, tokenizer


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the largest ModuleList in it."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModelLoadError(f"{type(model).__name__}: no ModuleList of decoder blocks found")
    return max(lists, key=len)


def find_lora_targets(model: nn.Module) -> list[str]:
    """Names (relative suffixes) of every nn.Linear inside the decoder blocks, e.g. ['q_proj', ...].

    Suffixes are used when they only occur inside the blocks; otherwise full module paths, so that
    heads and embeddings outside the blocks are never targeted.
    """
    blocks = decoder_blocks(model)
    block_ids = {id(m) for m in blocks.modules()}
    inside, outside = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            (inside if id(module) in block_ids else outside).add(name)
    suffixes = {n.rsplit(".", 1)[-1] for n in inside}
    if not suffixes & {n.rsplit(".", 1)[-1] for n in outside}:
        return sorted(suffixes)
    return sorted(inside)


def hash_model_dir(model_dir: str | Path) -> str:
    """sha256 over the weight, config and tokenizer files of a model directory (name + bytes)."""
    path = Path(model_dir)
    files = _weight_files(path, WEIGHT_GLOBS + PICKLE_GLOBS) + [
        path / f for f in HASHED_FILES if (path / f).is_file()
    ]
    digest = hashlib.sha256()
    for f in sorted(set(files)):
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
