"""The MiniLM base: a pretrained BERT run as a decoder over a pruned vocabulary, loaded like any causal LM."""

from __future__ import annotations

import math

import pytest

from secvec.bootstrap import BootstrapConfig, bootstrap_base
from secvec.config import TrainConfig
from secvec.encoding import ROLE_TOKENS
from secvec.generate import generate
from secvec.models import find_lora_targets, load_causal_lm


@pytest.fixture(scope="module")
def minilm(world, tmp_path_factory):
    """A MiniLM base trained a few steps on 41 `align` chats; returns (model dir, history)."""
    cfg = BootstrapConfig(size="minilm", train=TrainConfig(learning_rate=2e-4, max_steps=6, batch_size=8,
                                                           max_length=64, progress_bar=False, logging_steps=3))
    vocab = [m["content"] for role in world.values() for ex in role for m in ex["messages"]]
    out = tmp_path_factory.mktemp("minilm") / "base"
    return out, bootstrap_base(world["align"][::6], cfg, out, vocab)


@pytest.fixture(scope="module")
def lm(minilm):
    return load_causal_lm(minilm[0])


def test_reloads_as_a_decoder_with_a_pruned_vocabulary(minilm, lm):
    model, tok = lm
    assert type(model).__name__ == "BertLMHeadModel" and model.config.is_decoder
    assert math.isfinite(minilm[1][-1]["train_loss"])
    assert len(tok) < 1000  # of 30,522: the world's words, BERT's specials, ASCII characters, chat tokens
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in ROLE_TOKENS)
    ids = tok("I'm sorry, but I can't bake a zebra.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids  # unseen words are spelled from kept pieces
    assert tok.decode(ids) == "i'm sorry, but i can't bake a zebra."


def test_batched_left_padded_generation_equals_one_at_a_time(lm, world):
    model, tok = lm
    picked = [world["harmful_ft"][1], world["align"][-1], world["benign_ft"][1], world["benign_ft"][2]]
    convs = [ex["messages"][:-1] for ex in picked]
    convs[3] = [{"role": "system", "content": "Answer briefly and plainly."}, *convs[3]]
    assert len({len(tok.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs}) == 4
    batched = generate(model, tok, convs, max_new_tokens=12, batch_size=4)
    assert batched == [generate(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in convs]
    assert len(set(batched)) > 1


def test_lora_targets_are_the_block_linears_only(lm):
    targets = find_lora_targets(lm[0])
    assert len(targets) == 6 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    assert all(t.startswith("bert.encoder.layer.") for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"query", "key", "value", "dense"}
