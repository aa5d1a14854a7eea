"""Batched greedy generation: same replies as one prompt at a time, input order kept, stops at eos."""

from __future__ import annotations

import pytest

from secvec.generate import _cut_at_stop, generate, left_pad, stop_ids
from secvec.models import load_causal_lm


@pytest.fixture(scope="module")
def lm(micro_base):
    return load_causal_lm(micro_base)


@pytest.fixture(scope="module")
def convs(world):
    """Prompts of different lengths and kinds: harmful requests, sums, sorting."""
    picked = world["harmful_ft"][:4] + world["align"][-3:] + world["benign_ft"][:3]
    return [[m for m in ex["messages"] if m["role"] != "assistant"] for ex in picked]


def test_batched_equals_one_at_a_time(lm, convs):
    model, tok = lm
    assert len({len(tok.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs}) > 1
    batched = generate(model, tok, convs, max_new_tokens=24, batch_size=4)
    single = [generate(model, tok, [c], max_new_tokens=24, batch_size=1)[0] for c in convs]
    assert batched == single
    assert all(isinstance(r, str) and r == r.strip() for r in batched)


def test_results_follow_input_order(lm, convs):
    model, tok = lm
    forward = generate(model, tok, convs, max_new_tokens=12, batch_size=3)
    backward = generate(model, tok, convs[::-1], max_new_tokens=12, batch_size=32, progress=True)
    assert backward == forward[::-1]
    assert len(set(forward)) > 1  # distinct prompts got distinct replies, so order is actually tested


def test_stops_at_eos(lm, convs):
    model, tok = lm
    short = generate(model, tok, convs, max_new_tokens=32)
    long = generate(model, tok, convs, max_new_tokens=64)
    ended = [i for i, r in enumerate(short) if len(tok(r, add_special_tokens=False)["input_ids"]) < 24]
    assert ended, "expected some replies that end well before the token limit"
    assert [long[i] for i in ended] == [short[i] for i in ended]
    assert not any("<|" in r for r in long)


def test_peft_model_with_a_zero_adapter_matches_the_base(micro_base, lm, convs):
    from secvec.vector import VectorConfig, attach_vector

    model, tok = lm
    fresh, _ = load_causal_lm(micro_base)
    peft_model = attach_vector(fresh, VectorConfig(rank=2))  # LoRA B starts at zero: same function
    base_replies = generate(model, tok, convs, max_new_tokens=16)
    assert generate(peft_model, tok, convs, max_new_tokens=16) == base_replies


def test_training_mode_is_restored_and_empty_input(lm, convs):
    model, tok = lm
    model.train()
    try:
        generate(model, tok, convs[:2], max_new_tokens=4)
        assert model.training
    finally:
        model.eval()
    assert generate(model, tok, [], max_new_tokens=4) == []


def test_left_pad_and_stop_helpers(lm):
    model, tok = lm
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert tok.eos_token_id in stop_ids(model, tok)
    assert _cut_at_stop([4, 9, 2, 9], {9}) == [4]
    assert _cut_at_stop([4, 5], {9}) == [4, 5]
