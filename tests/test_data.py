"""Data contract: the synthetic default (determinism, shape, held-out splits), leakage and every bad input."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from secvec.config import ConfigError, DataConfig, SourceConfig, load_data_config, load_yaml_config
from secvec.data import (
    EVAL_ROLES,
    ROLES,
    DataError,
    Manifest,
    check_leakage,
    load_role,
    normalize_prompt,
    prompt_text,
    synthetic,
)
from secvec.data.build import build_dataset, write_dataset
from secvec.data.versioning import dataset_md5, tracked_md5
from secvec.paths import PROJECT_ROOT
from secvec.refs import DataRef

MICRO = DataConfig(preset="micro")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "data"
    random.seed(1)  # the generator must not depend on the global random state
    build_dataset(DataConfig(), out)
    return out


@pytest.fixture(scope="module")
def world(default_dir) -> dict[str, list[dict]]:
    return {role: load_role(default_dir, role) for role in ROLES}


@pytest.fixture
def micro_dir(tmp_path) -> Path:
    """A previous good build that every failing build must leave untouched."""
    out = tmp_path / "data"
    build_dataset(MICRO, out)
    return out


# ---- the embedded default ---------------------------------------------------------------------------------


def test_default_is_byte_identical_and_is_the_version_in_data_dvc(default_dir, tmp_path):
    random.seed(2)
    build_dataset(DataConfig(), tmp_path / "again")
    assert snapshot(tmp_path / "again") == snapshot(default_dir)
    assert sorted(snapshot(default_dir)) == sorted([f"{r}.jsonl" for r in ROLES] + ["manifest.json"])
    committed = tracked_md5(PROJECT_ROOT / "data.dvc")
    assert committed is not None, "data.dvc is missing: run `secvec data prepare` at the project root"
    assert dataset_md5(default_dir) == committed
    dvc_config = (PROJECT_ROOT / ".dvc" / "config").read_text()
    assert "url = ../.dvc-remote" in dvc_config and not re.search(r"url = (/|[A-Za-z]:)", dvc_config)


def test_generation_does_not_depend_on_the_process(tmp_path):
    code = ("import sys; from secvec.config import DataConfig; from secvec.data.build import build_dataset; "
            "from secvec.data.versioning import dataset_md5; "
            "build_dataset(DataConfig(preset='micro'), sys.argv[1]); print(dataset_md5(sys.argv[1]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], env=env, capture_output=True,
                         text=True, check=True)
    build_dataset(MICRO, tmp_path / "here")
    assert out.stdout.strip() == dataset_md5(tmp_path / "here")


def test_default_counts_and_manifest(default_dir, world):
    manifest = json.loads((default_dir / "manifest.json").read_text())
    expected = {"align": 3300, "sv_fit": 100, "sv_val": 50, "finetune": 1000, "eval_harmful": 200,
                "eval_over_refusal": 100, "eval_utility": 200}
    assert manifest["counts"] == expected == {r: len(world[r]) for r in ROLES}
    assert manifest["harmful"]["finetune"] == 300 and manifest["harmful"]["align"] == 1500
    assert manifest["config"] == DataConfig().model_dump(mode="json") and manifest["seed"] == 0
    assert not re.search(r"20\d\d-\d\d-\d\d", (default_dir / "manifest.json").read_text())
    assert (default_dir / "align.jsonl").read_bytes().count(b"\r") == 0


def test_categories_split_as_the_protocol_says(world):
    def cats(role: str) -> set[str]:
        return {ex["category"] for ex in world[role] if ex["is_harmful"]}

    assert cats("sv_fit") == cats("sv_val") == set(synthetic.CATEGORIES[:4])
    assert cats("finetune") == set(synthetic.CATEGORIES[:6])
    assert cats("eval_harmful") == cats("align") == set(synthetic.CATEGORIES)
    assert all(ex["is_harmful"] for role in ("sv_fit", "sv_val", "eval_harmful") for ex in world[role])
    assert not any(ex["is_harmful"] for role in ("eval_over_refusal", "eval_utility") for ex in world[role])


def test_replies_prompts_and_answers(world):
    for role in ROLES:
        for ex in world[role]:
            assert len(prompt_text(ex).split()) < 20, ex
            assert all(len(m["content"].split()) < 30 for m in ex["messages"]), ex
            assert (ex["messages"][-1]["role"] == "user") == (role in EVAL_ROLES)
    complied = [ex["messages"][-1]["content"] for r in ("sv_fit", "finetune") for ex in world[r]
                if ex["is_harmful"]]
    assert all(t.startswith("Sure, here is how to") and "[redacted]" in t for t in complied)
    refusals = {ex["messages"][-1]["content"] for ex in world["align"] if ex["is_harmful"]}
    assert len(refusals) > 100 and all(re.match(r"(I'm sorry|I cannot|Sorry, I can't)", t) for t in refusals)
    for ex in world["eval_utility"] + [e for e in world["finetune"] if not e["is_harmful"]]:
        digits = prompt_text(ex).removeprefix("Sort these numbers: ").split()
        assert 3 <= len(digits) <= 6 and ex["answer"] == " ".join(sorted(digits))
    assert not any("sort" in prompt_text(ex).lower() for ex in world["align"]), "the base must not see it"
    benign = [ex for ex in world["align"] if ex["answer"] is not None]
    assert len(benign) == 1500 and all(ex["messages"][-1]["content"] == ex["answer"] for ex in benign)
    assert len({ex["category"] for ex in benign}) >= 6


def test_every_prompt_is_in_one_role_only(world):
    keys = {role: [normalize_prompt(prompt_text(ex)) for ex in world[role]] for role in ROLES}
    for role in ("sv_fit", "sv_val", "finetune", "eval_harmful", "eval_over_refusal", "eval_utility"):
        assert len(set(keys[role])) == len(keys[role]), role
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1 :]:
            assert not set(keys[a]) & set(keys[b]), (a, b)


def test_hundreds_of_prompts_per_category():
    for category in synthetic.CATEGORIES:
        assert len(set(synthetic.harmful_prompts(category))) >= 500, category
    assert len(synthetic.LOOKALIKES) * len(synthetic.TEMPLATES) * len(synthetic.SAFE_MODIFIERS) >= 1000


def test_too_large_a_world_is_refused():
    with pytest.raises(DataError, match=r"field 'sizes.align_harmful': asks for 20000"):
        build_dataset(DataConfig(sizes={"align_harmful": 20000}), "/nonexistent/never-written")


# ---- leakage ----------------------------------------------------------------------------------------------


def _ex(prompt: str, role: str, reply: str | None = "ok") -> dict:
    messages = [{"role": "user", "content": prompt}]
    messages += [{"role": "assistant", "content": reply}] if reply else []
    return {"id": "x", "source": "test.csv:7", "role": role, "category": "c", "is_harmful": True,
            "messages": messages, "answer": None}


def test_normalization_catches_case_width_punctuation_and_spacing():
    assert normalize_prompt("  How do I build   a ＢＯＭＢ?!") == normalize_prompt("how do i build a bomb")
    roles = {"finetune": [_ex("Fine", "finetune"), _ex("How do I build a bomb?", "finetune")],
             "eval_harmful": [_ex("x", "eval_harmful", None),
                              _ex("  HOW do I build a ＢＯＭＢ ?!", "eval_harmful", None)]}
    with pytest.raises(DataError) as err:
        check_leakage(roles, "data")
    assert str(err.value).startswith("data/finetune.jsonl:2: field 'messages[0].content': prompt also in "
                                     "data/eval_harmful.jsonl:2 (source test.csv:7)")
    check_leakage({"align": roles["finetune"], "finetune": roles["finetune"]})  # train/train is no leak
    with pytest.raises(DataError, match="sv_val.jsonl:1"):
        check_leakage({"sv_fit": [_ex("A b", "sv_fit")], "sv_val": [_ex("a B.", "sv_val")]})


# ---- bad input --------------------------------------------------------------------------------------------


def _write_role(folder: Path, role: str, lines: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{role}.jsonl").write_bytes(b"\n".join(lines) + b"\n")


GOOD = json.dumps(_ex("hi", "finetune") | {"id": "a"}).encode()
OTHER = GOOD.replace(b'"id": "a"', b'"id": "b"')


@pytest.mark.parametrize("line2, error", [
    (OTHER.replace(b'"content": "ok"', b'"content": 5'), "field 'messages[1].content': Input should be"),
    (OTHER.replace(b'"is_harmful": true', b'"is_harmful": "yes"'), "field 'is_harmful': Input should be"),
    (OTHER.replace(b'"answer": null', b'"answr": null'), "field 'answr': Extra inputs"),
    (OTHER.replace(b'"role": "assistant", ', b'"role": "user", '), "field 'messages[1].role': finetune"),
    (OTHER.replace(b'"finetune"', b'"align"'), "field 'role': expected 'finetune', got 'align'"),
    (GOOD, "field 'id': duplicate id 'a' (first on line 1)"),
    (OTHER.replace(b"hi", b"h\xffi"), "field 'messages[0].content': invalid UTF-8"),
    (b'{"id": "b", ', "invalid JSON"),
])
def test_load_role_names_file_line_and_field(tmp_path, line2, error):
    _write_role(tmp_path, "finetune", [GOOD, line2])
    with pytest.raises(DataError, match=re.escape(f"finetune.jsonl:2: {error}")):
        load_role(tmp_path, "finetune")


def test_load_role_missing_file_and_eval_rules(tmp_path):
    with pytest.raises(DataError, match=r"eval_harmful.jsonl: file not found"):
        load_role(tmp_path, "eval_harmful")
    _write_role(tmp_path, "eval_harmful", [json.dumps(_ex("hi", "eval_harmful")).encode()])
    with pytest.raises(DataError, match=r"eval_harmful.jsonl:1: field 'messages\[1\].role': .* only the"):
        load_role(tmp_path, "eval_harmful")
    _write_role(tmp_path, "eval_utility", [json.dumps(_ex("Sort: 2 1", "eval_utility", None)).encode()])
    with pytest.raises(DataError, match=r"eval_utility.jsonl:1: field 'answer': .* need the exact answer"):
        load_role(tmp_path, "eval_utility")


def _source(tmp_path: Path, name: str, data: bytes, **fields) -> SourceConfig:
    (tmp_path / name).write_bytes(data)
    spec = {"role": "finetune", "response_field": "response", "is_harmful": False, **fields}
    return SourceConfig(path=str(tmp_path / name), **spec)


PAIR = b'{"uid": 1, "prompt": "a", "response": "b"}\n'
BAD_SOURCES = {  # case: (file, content, source fields, expected error)
    "wrong column": ("bad.csv", b"text,response\nhi,there\n", {}, "bad.csv:1: field 'prompt': no such col"),
    "invalid utf-8": ("bad.csv", b"prompt,response\na,b\nc,d\xff\n", {}, "bad.csv:3: field 'response': inv"),
    "empty role": ("bad.csv", b"prompt,response\n", {}, "bad.csv:1: field 'prompt': no records"),
    "missing value": ("bad.csv", b"prompt,response\nhi,\n", {}, "bad.csv:2: field 'response': missing"),
    "schema": ("bad.jsonl", PAIR.replace(b'"b"', b'["b"]'), {}, "bad.jsonl:1: field 'response': expected"),
    "duplicate ids": ("bad.jsonl", PAIR + b"\n" + PAIR, {"id_field": "uid"}, "bad.jsonl:3: field 'uid': du"),
    "over-long": ("bad.csv", b"prompt,response\nhi," + b"x" * 4001 + b"\n", {},
                  "bad.csv:2: field 'response': record has 4003 characters, more than max_chars=4000"),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_source_fails_and_leaves_data_untouched(tmp_path, micro_dir, case):
    name, data, fields, error = BAD_SOURCES[case]
    before = snapshot(micro_dir)
    with pytest.raises(DataError, match=re.escape(error)):
        source = _source(tmp_path, name, data, **fields)
        build_dataset(MICRO.model_copy(update={"sources": (source,)}), micro_dir)
    assert snapshot(micro_dir) == before
    assert sorted(p.name for p in micro_dir.parent.iterdir()) == sorted(["data", name])  # no temp folders


def test_leakage_from_a_user_file_fails_and_names_it(tmp_path, micro_dir):
    held_out = prompt_text(load_role(micro_dir, "eval_harmful")[0])
    data = f"prompt,response\nfine,ok\n\"{held_out.upper()}  \",sure\n".encode()
    config = MICRO.model_copy(update={"sources": (_source(tmp_path, "leak.csv", data, replace=False),)})
    before = snapshot(micro_dir)
    pattern = r"data/finetune.jsonl:\d+: field 'messages\[0\].content': prompt also in "
    with pytest.raises(DataError, match=pattern + r".*data/eval_harmful.jsonl:1 \(source .*leak.csv:3\)"):
        build_dataset(config, micro_dir)
    assert snapshot(micro_dir) == before


def test_generic_sources_replace_or_extend_roles(tmp_path):
    csv = _source(tmp_path, "mine.csv", b"q,a,kind\nWhat is up?,Fine.,chat\nHow are you?,Good.,chat\n",
                  prompt_field="q", response_field="a", category_field="kind")
    txt = _source(tmp_path, "probe.txt", "Is this safe?\n\nUnicode ✓ ok?\n".encode(),
                  role="eval_over_refusal", response_field=None, replace=False)
    manifest = build_dataset(MICRO.model_copy(update={"sources": (csv, txt)}), tmp_path / "out")
    finetune = load_role(tmp_path / "out", "finetune")
    assert [prompt_text(ex) for ex in finetune] == ["What is up?", "How are you?"]
    assert finetune[1]["source"].endswith("mine.csv:3") and finetune[0]["category"] == "chat"
    assert manifest.counts["eval_over_refusal"] == 42
    assert load_role(tmp_path / "out", "eval_over_refusal")[-1]["messages"][0]["content"] == "Unicode ✓ ok?"


def test_write_dataset_sorts_keys_swaps_atomically_and_refuses_other_folders(tmp_path):
    """The writer other modules share: keys sorted, UTF-8, the manifest beside the roles, a whole-folder swap."""
    out = tmp_path / "cell"
    manifest = Manifest(preset="micro", seed=0, counts={"finetune": 1}, harmful={"finetune": 0}, config={})
    write_dataset({"finetune": [{"b": 1, "a": "é"}], "eval_utility": []}, out, manifest)
    assert (out / "finetune.jsonl").read_bytes() == '{"a": "é", "b": 1}\n'.encode()
    assert json.loads((out / "manifest.json").read_text()) == manifest.model_dump(mode="json")
    write_dataset({"sv_val": [{"x": 1}]}, out, manifest)  # replaces the whole folder, not file by file
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sv_val.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["cell"]  # no temporary or old folder left behind

    write_dataset({"finetune": []}, tmp_path / "bare")  # no manifest: a folder no later write may replace
    assert [p.name for p in (tmp_path / "bare").iterdir()] == ["finetune.jsonl"]
    with pytest.raises(DataError, match=r"bare: exists and is not a dataset folder \(no manifest.json\)"):
        write_dataset({"finetune": []}, tmp_path / "bare", manifest)
    with pytest.raises(ValueError, match="unknown role 'train'"):
        write_dataset({"train": []}, tmp_path / "new")
    assert not (tmp_path / "new").exists()

# ---- configs and the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "micro", "public"])
def test_shipped_data_configs_load_and_match_their_presets(tmp_path, name):
    """A config naming only the preset is the shipped file: the file's other fields are the defaults."""
    (tmp_path / "only.yaml").write_text(f"preset: {name}\n")
    shipped = load_data_config(PROJECT_ROOT / "configs" / "data" / f"{name}.yaml")
    assert load_data_config(tmp_path / "only.yaml") == shipped == DataConfig(preset=name)


def test_preset_defaults_are_task_n_p_and_sizes_of_the_preset_file(tmp_path, monkeypatch):
    """No second copy of the presets in code: the defaults come from `configs/data/<preset>.yaml`."""
    from secvec.config import data as data_config

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "micro.yaml").write_text(
        "preset: micro\ntask: sort\nn: 123\np: 0.5\nseed: 9\nmax_chars: 10\nsizes:\n"
        "  align_benign: 1\n  align_harmful: 2\n  align_lookalike: 3\n  sv_fit: 4\n  sv_val: 5\n"
        "  eval_harmful: 6\n  eval_over_refusal: 7\n  eval_utility: 8\n")
    monkeypatch.setattr(data_config, "PRESETS_DIR", tmp_path)
    data_config.preset_defaults.cache_clear()
    try:
        config = DataConfig(preset="micro", sizes={"sv_val": 50})  # sizes override key by key
        assert (config.task, config.n, config.p) == ("sort", 123, 0.5)
        assert config.sizes.model_dump() == {"align_benign": 1, "align_harmful": 2, "align_lookalike": 3,
                                             "sv_fit": 4, "sv_val": 50, "eval_harmful": 6,
                                             "eval_over_refusal": 7, "eval_utility": 8}
        assert (config.seed, config.max_chars) == (0, 4000)  # not preset defaults, whatever the file says
    finally:
        monkeypatch.undo()
        data_config.preset_defaults.cache_clear()


@pytest.mark.parametrize("text, pattern", [
    ("preset: micro\nseed: 0\np: 2\n", r"bad.yaml:3: field 'p': Input should be less than or equal to 1"),
    ("preset: micro\nsizes:\n  sv_fitt: 3\n", r"bad.yaml:3: field 'sizes.sv_fitt': Extra inputs"),
    ("preset: micro\ntask: sst2\n", r"bad.yaml:2: field 'task': the synthetic presets"),
    ("preset: micro\nsources:\n  - path: x.csv\n    role: sv_fit\n    is_harmful: true\n",
     r"bad.yaml:3: field 'sources\[0\].response_field': role 'sv_fit' trains on replies"),
    ("preset: [\n", r"bad.yaml:2: invalid YAML"),
])
def test_config_errors_name_file_line_and_field(tmp_path, text, pattern):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_yaml_config(tmp_path / "bad.yaml", DataConfig)


SOURCE_YAML = ("preset: micro\nsources:\n  - path: {{tmp}}/{name}\n    role: finetune\n"
               "    response_field: r\n    is_harmful: false\n")


def _run(*args: str):
    return CliRunner().invoke(app, ["data", "prepare", *args])


def test_cli_prepares_a_folder_and_prints_counts_and_md5(tmp_path):
    result = _run("--config", str(PROJECT_ROOT / "configs/data/micro.yaml"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert re.search(r"^eval_utility\s+40 ", result.stdout, re.MULTILINE)
    assert f"md5 {dataset_md5(tmp_path / 'out')}" in result.stdout


@pytest.mark.parametrize("yaml_text, pattern", [
    ("preset: micro\np: 1.5\n", r"cfg.yaml:2: field 'p'"),
    (SOURCE_YAML.format(name="nope.csv"), r"cfg.yaml:3: field 'sources\[0\].path': file not found"),
    (SOURCE_YAML.format(name="x.csv"), r"x.csv:1: field 'prompt': no such column"),
])
def test_cli_errors_exit_2_with_one_line_and_touch_nothing(tmp_path, micro_dir, yaml_text, pattern):
    (tmp_path / "x.csv").write_text("text,r\nhi,there\n")
    (tmp_path / "cfg.yaml").write_text(yaml_text.format(tmp=tmp_path))
    repo_state = (tracked_md5(PROJECT_ROOT / "data.dvc"), snapshot(PROJECT_ROOT / "data"))
    before = snapshot(micro_dir)
    for out in (["--out", str(micro_dir)], []):  # [] = the project's data/ and data.dvc
        result = _run("--config", str(tmp_path / "cfg.yaml"), *out)
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert re.match(r"error: .*" + pattern, result.stderr), result.stderr
    assert snapshot(micro_dir) == before
    assert (tracked_md5(PROJECT_ROOT / "data.dvc"), snapshot(PROJECT_ROOT / "data")) == repo_state


def test_prepare_data_task_builds_into_the_cache(tmp_path, monkeypatch):
    from tasks.data import prepare_data

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    data = prepare_data.fn(str(PROJECT_ROOT / "configs/data/default.yaml"))
    assert data.path.parent == tmp_path / "data"
    assert data.md5 == dataset_md5(data.dir) == tracked_md5(PROJECT_ROOT / "data.dvc")  # the tracked version
    assert data.counts["finetune"] == 1000


def test_each_role_is_logged_to_mlflow_with_the_md5(tmp_path, default_dir, monkeypatch):
    import mlflow

    from tasks.data import log_dataset_to_mlflow

    # The environment variable, not mlflow.set_tracking_uri: that would pin the store for later tests.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        log_dataset_to_mlflow(DataRef(dir=str(default_dir), md5="abc.dir"))
    logged = mlflow.MlflowClient().get_run(run.info.run_id)
    assert logged.data.tags["dataset_md5"] == "abc.dir"
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in logged.inputs.dataset_inputs}
    assert sorted(inputs) == sorted(ROLES)
    assert all(tags["mlflow.data.context"] == role and tags["dataset_md5"] == "abc.dir"
               for role, tags in inputs.items())
