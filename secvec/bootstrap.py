"""Bootstrap a small aligned base: a BPE tokenizer and a Llama model trained from scratch on chat data
(sizes micro/tiny), or the pretrained MiniLM encoder run as a decoder (size minilm, see secvec.minilm).

This is what the embedded presets run on; real users point the pipeline at a local model instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from secvec.config import BootstrapConfig
from secvec.device import CPU, Hardware
from secvec.encoding import CHAT_TEMPLATE, EOT, PAD, ROLE_TOKENS, encode_examples
from secvec.minilm import build_minilm
from secvec.training import train

log = logging.getLogger(__name__)

# hidden, layers, heads, intermediate, vocab
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "micro": (64, 2, 4, 176, 512),  # ~0.1M params: tests, trains in seconds
    "tiny": (256, 6, 4, 688, 2048),  # ~5M params: the embedded default
}


def _texts(examples: Sequence[dict]) -> list[str]:
    return [m["content"] for ex in examples for m in ex["messages"]]


def build_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOT, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, eos_token=EOT, additional_special_tokens=list(ROLE_TOKENS)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, size: str, seed: int = 0):
    """A freshly initialised LlamaForCausalLM of a size preset, sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, intermediate, _ = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def bootstrap_base(
    examples: Sequence[dict],
    cfg: BootstrapConfig,
    out_dir: str | Path,
    vocab_texts: Sequence[str] = (),
    callbacks: Sequence = (),
    hardware: Hardware = CPU,
) -> list[dict]:
    """Train the aligned base of `cfg.size` on `align` chats, save it (safetensors + tokenizer) to
    `out_dir`, and return the training log records.

    Args:
        vocab_texts: extra text the tokenizer should cover (e.g. every role of the dataset). Only the
            vocabulary sees it, never the model: a real model's tokenizer covers all text too.
    """
    if not examples:
        raise ValueError("bootstrap needs alignment examples (the 'align' role is empty)")
    out = Path(out_dir)
    texts = [*_texts(examples), *vocab_texts]
    if cfg.size == "minilm":
        model, tokenizer = build_minilm(texts, seed=cfg.train.seed)
    else:
        tokenizer = build_tokenizer(texts, SIZES[cfg.size][4])
        model = build_model(tokenizer, cfg.size, seed=cfg.train.seed)
    log.info("bootstrap: %s model, %d examples, vocab %d", cfg.size, len(examples), len(tokenizer))
    features = encode_examples(tokenizer, examples, cfg.train.max_length)
    history = train(model, features, cfg.train, out.with_name(out.name + "-ckpt"), pad_id=tokenizer.pad_token_id,
                    callbacks=callbacks, hardware=hardware)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("bootstrap: final loss %.3f, saved to %s", history[-1].get("train_loss", float("nan")), out)
    return history
