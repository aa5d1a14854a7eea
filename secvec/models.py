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


# A chat format for a model directory that has none (see load_tokenizer): ChatML-style role headers as
# plain text and the tokenizer's own eos as the end of every turn. No token is added (no embedding resize,
# no untrained rows), generation stops at the eos the model already has, and since eos is a special token
# that data cannot contain (secvec.encoding escapes it) a record cannot end a turn early. The headers are
# ordinary text, so a record may imitate one, but only inside its own turn.
EOS_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tokenizer(model_dir: str | Path):
    """Load a tokenizer that has a chat template and a pad token (eos when it has none).

    A tokenizer without a chat template is an error, never silently given one: a base model that was
    not chat-tuned has no chat format, and whichever template is chosen becomes part of what fine-tuning
    teaches it. The error says how to fix it: put a template in the model directory, the model's own if
    it has one, else e.g. `EOS_CHAT_TEMPLATE` written to `<model_dir>/chat_template.jinja`. Kept in the
    directory, the template is hashed with the model (`hash_model_dir`), so runs record which one was used.

    Raises:
        ModelLoadError: the tokenizer has no chat template.
    """
    from transformers import AutoTokenizer

    path = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"{path}: tokenizer has no chat template, and secvec trains and evaluates on chats. Add the "
            f"template the model was chat-tuned with as {path / 'chat_template.jinja'} (or the 'chat_template' "
            "field of tokenizer_config.json). For a base model that has none, a generic one with the "
            "model's eos as end of turn is secvec.models.EOS_CHAT_TEMPLATE: "
            f"Path({str(path / 'chat_template.jinja')!r}).write_text(EOS_CHAT_TEMPLATE). Fine-tuning then "
            "also teaches the model that format."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_dir: str | Path, allow_pickle: bool = False, device: str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from a local directory: eval mode, no remote code.

    Stages that train load float32 master weights whatever the precision (autocast does the rest); stages
    that only evaluate may load the compute dtype (see secvec.device).
    """
    from transformers import AutoModelForCausalLM

    path = check_model_dir(model_dir, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=False, use_safetensors=not allow_pickle or None
    )
    model.to(device)
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


def _is_projection(module: nn.Module) -> bool:
    """A weight matrix LoRA can wrap: nn.Linear (incl. subclasses such as FalconLinear) or transformers'
    Conv1D (GPT-2's c_attn/c_proj/c_fc, weight stored as (in, out))."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _matches(name: str, targets) -> bool:
    # peft's rule for a list of target names: the full module path, or a suffix after a dot
    return name in targets or any(name.endswith("." + t) for t in targets)


def find_lora_targets(model: nn.Module) -> list[str]:
    """Every projection inside the decoder blocks, e.g. ['down_proj', 'gate_proj', ..., 'v_proj'].

    Projections are nn.Linear and transformers' Conv1D (GPT-2: ['c_attn', 'c_fc', 'c_proj']), fused ones
    included (Phi-3 'qkv_proj'/'gate_up_proj', GPT-NeoX/Falcon 'query_key_value'). Embeddings, the lm_head
    and anything else outside the blocks are never targeted, nor a module that is also reachable from
    outside them (a tied head). Bare suffixes are returned when peft's suffix matching would hit exactly
    these modules; otherwise full module paths.
    """
    blocks = decoder_blocks(model)
    prefix = next(name for name, m in model.named_modules() if m is blocks) + "."
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    inside = {name for name, module in model.named_modules(remove_duplicate=False)
              if _is_projection(module) and all(p.startswith(prefix) for p in paths[id(module)])}
    suffixes = {n.rsplit(".", 1)[-1] for n in inside}
    every = {name for name, _ in model.named_modules(remove_duplicate=False)}
    if {n for n in every if _matches(n, suffixes)} == inside:
        return sorted(suffixes)
    return sorted(inside)


def lora_fan_in_fan_out(model: nn.Module, target_modules) -> bool:
    """LoraConfig's `fan_in_fan_out` for these targets: True when they are all Conv1D (weight (in, out)).

    peft would flip the flag itself per Conv1D layer (with a warning, mutating the config); setting it
    keeps the saved adapter config truthful. A model mixing both kinds is left to peft's per-layer flip.
    """
    from transformers.pytorch_utils import Conv1D

    kinds = {isinstance(getattr(m, "base_layer", m), Conv1D)  # a peft-wrapped layer: its base layer
             for name, m in model.named_modules() if _matches(name, target_modules)
             and _is_projection(getattr(m, "base_layer", m))}
    return kinds == {True}


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
