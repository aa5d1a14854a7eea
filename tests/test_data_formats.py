"""User data in the formats users keep it: Parquet, Arrow (`save_to_disk`), JSONL, JSON and CSV, each in TRL's
conversational (`messages`) and prompt/completion shapes, give the same records or the same clear error; the
pipeline's MLflow run records every source file with its path and content digest."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secvec.config import ConfigError, DataConfig, SourceConfig, load_data_config
from secvec.data import DataError, load_role, validate_examples
from secvec.data.build import build_dataset
from secvec.data.sources import read_source
from secvec.data.versioning import dataset_md5

# Not the synthetic world's wording ("Sort these numbers:"), so a build never sees a leak into its eval roles.
CHATS = [("1", "Put in order: 3 1 2", "1 2 3"), ("2", "Put in order: 9 8", "8 9"), ("3", "Put in order: 5 0 7", "0 5 7")]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SHAPES = {  # TRL's dataset shapes (the row of one chat) and the source fields that read them
    "messages": (lambda uid, p, r: {"uid": uid, "messages": [user(p), assistant(r)]},
                 {"messages_field": "messages"}),
    "prompt_completion": (lambda uid, p, r: {"uid": uid, "prompt": p, "completion": r},
                          {"response_field": "completion"}),
    "conversational_prompt_completion": (lambda uid, p, r: {"uid": uid, "prompt": [user(p)],
                                                            "completion": [assistant(r)]},
                                         {"response_field": "completion"}),
}
SUFFIX = {"parquet": ".parquet", "arrow": "", "jsonl": ".jsonl", "json": ".json", "csv": ".csv"}
BY_INDEX = ("parquet", "arrow", "json")  # read by `datasets`: records are named by index, from 0


def write(rows: list[dict], fmt: str, path: Path) -> Path:
    """The rows as a user would keep them in `fmt` (CSV: a message list as JSON text in its cell)."""
    if fmt == "parquet":
        Dataset.from_list(rows).to_parquet(path)
    elif fmt == "arrow":
        Dataset.from_list(rows).save_to_disk(path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}
                             for row in rows)
    return path


def source(path: Path, fmt: str, shape: str, role: str = "finetune", **fields) -> SourceConfig:
    spec = {"id_field": "uid", "category": "chat", **SHAPES[shape][1], **fields}
    return SourceConfig(path=str(path), format=fmt, role=role, is_harmful=False, **spec)


def where(fmt: str, index: int) -> str:
    """How errors and `source` name a record: by index for datasets' formats, by line for the others."""
    return f"record {index}" if fmt in BY_INDEX else str(index + 1 + (fmt == "csv"))  # csv: a header line


def combos():
    for fmt in SUFFIX:
        for shape in SHAPES:
            if (fmt, shape) != ("csv", "conversational_prompt_completion"):  # a CSV cell is text
                yield fmt, shape


EXPECTED = [{"id": uid, "category": "chat", "is_harmful": False, "answer": None,
             "messages": [user(p), assistant(r)]} for uid, p, r in CHATS]


@pytest.mark.parametrize("fmt, shape", list(combos()))
def test_every_format_and_shape_builds_the_same_records(tmp_path, fmt, shape):
    rows = [SHAPES[shape][0](*chat) for chat in CHATS]
    path = write(rows, fmt, tmp_path / f"chats{SUFFIX[fmt]}")
    records = read_source(source(path, fmt, shape))
    assert [{k: v for k, v in r.items() if k != "source"} for r in records] == EXPECTED
    assert [r["source"] for r in records] == [f"{path}:{where(fmt, i)}" for i in range(len(CHATS))]


def test_an_arrow_file_reads_like_its_folder(tmp_path):
    rows = [SHAPES["messages"][0](*chat) for chat in CHATS]
    folder = write(rows, "arrow", tmp_path / "chats")
    (arrow_file,) = folder.glob("*.arrow")  # the Arrow stream file inside a save_to_disk folder
    config = SourceConfig(path=str(arrow_file), role="finetune", is_harmful=False, messages_field="messages")
    assert config.format == "arrow"
    records = read_source(config)
    assert [r["messages"] for r in records] == [r["messages"] for r in EXPECTED]
    assert records[1]["source"] == f"{arrow_file}:record 1"


def test_suffixes_name_their_format_and_a_folder_needs_arrow(tmp_path):
    for suffix in ("parquet", "json", "jsonl", "csv", "arrow"):
        assert SourceConfig(path=f"x.{suffix}", role="eval_harmful", is_harmful=True).format == suffix
    with pytest.raises(ValueError, match="cannot tell the format from the suffix ''.*arrow: a save_to_disk"):
        SourceConfig(path="my_folder", role="eval_harmful", is_harmful=True)


BAD_ROWS = {  # case: (shape, the second record, source fields, the error after `file:<record or line>: `)
    "missing content": ("messages", {"uid": "b", "messages": [user("hi"), {"role": "assistant", "content": None}]},
                        {}, "field 'messages[1].content': missing"),
    "blank content": ("messages", {"uid": "b", "messages": [user("  "), assistant("y")]},
                      {}, "field 'messages[0].content': blank"),
    "unknown role": ("messages", {"uid": "b", "messages": [{"role": "tool", "content": "x"}, assistant("y")]},
                     {}, "field 'messages[0].role': expected user, assistant or system, got 'tool'"),
    "no reply": ("messages", {"uid": "b", "messages": [user("hi"), user("again")]},
                 {}, "field 'messages[1].role': finetune examples end with the assistant's reply"),
    "no user turn": ("messages", {"uid": "b", "messages": [{"role": "system", "content": "s"}, assistant("y")]},
                     {}, "field 'messages': needs a user turn"),
    "no messages": ("messages", {"uid": "b", "messages": []}, {},
                    "field 'messages': expected a list of {role, content} messages, got nothing"),
    "reply to a prompt-only role": ("messages", {"uid": "b", "messages": [user("hi"), assistant("yo")]},
                                    {"role": "eval_harmful"},
                                    "field 'messages[1].role': eval_harmful examples hold only the prompt"),
    "missing completion": ("prompt_completion", {"uid": "b", "prompt": "hi", "completion": None},
                           {}, "field 'completion': missing"),
    "completion by the user": ("conversational_prompt_completion",
                               {"uid": "b", "prompt": [user("hi")], "completion": [user("no")]},
                               {}, "field 'completion': expected the reply, one assistant message; got the roles"),
    "duplicate id": ("prompt_completion", {"uid": "a", "prompt": "hi", "completion": "yo"}, {},
                     "field 'uid': duplicate id 'a' (first "),
    "over-long": ("prompt_completion", {"uid": "b", "prompt": "hi", "completion": "x" * 4001}, {},
                  "field 'completion': record has 4003 characters, more than max_chars=4000"),
}


def first_row(shape: str, role: str) -> dict:
    """A good record of the shape and role, so that the error is the second record's."""
    if role == "eval_harmful":
        return {"uid": "a", "messages": [user("fine")]}
    return SHAPES[shape][0]("a", "fine", "ok")


@pytest.mark.parametrize("fmt, case", [(fmt, case) for fmt in SUFFIX for case, (shape, *_) in BAD_ROWS.items()
                                       if (fmt, shape) in set(combos())])
def test_a_bad_record_names_file_record_and_field_in_every_format(tmp_path, fmt, case):
    shape, bad, fields, error = BAD_ROWS[case]
    rows = [first_row(shape, fields.get("role", "finetune")), bad]
    path = write(rows, fmt, tmp_path / f"bad{SUFFIX[fmt]}")
    with pytest.raises(DataError) as err:
        read_source(source(path, fmt, shape, **fields), max_chars=4000)
    assert str(err.value).startswith(f"{path}:{where(fmt, 1)}: {error}"), str(err.value)
    assert "\n" not in str(err.value)


def test_system_turns_and_multi_turn_chats_are_kept(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, user("Sort: 2 1"), assistant("1 2"), user("Sort: 4 3"),
            assistant("3 4")]
    rows = [{"uid": "a", "messages": chat}, {"uid": "b", "prompt": chat[:4], "completion": chat[4:]}]
    path = write(rows[:1], "parquet", tmp_path / "m.parquet")
    assert read_source(source(path, "parquet", "messages"))[0]["messages"] == chat
    path = write(rows[1:], "json", tmp_path / "pc.json")
    assert read_source(source(path, "json", "conversational_prompt_completion"))[0]["messages"] == chat


def test_dataset_dict_folders_read_the_named_split(tmp_path):
    rows = {split: [SHAPES["prompt_completion"][0](f"{split}-{i}", p, r) for i, (_, p, r) in enumerate(CHATS)]
            for split in ("train", "test")}
    DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(tmp_path / "dd")
    DatasetDict({"train": Dataset.from_list(rows["train"])}).save_to_disk(tmp_path / "one")
    records = read_source(source(tmp_path / "dd", "arrow", "prompt_completion", split="test"))
    assert [r["id"] for r in records] == ["test-0", "test-1", "test-2"]
    assert records[0]["source"] == f"{tmp_path / 'dd'}[test]:record 0"
    only = read_source(source(tmp_path / "one", "arrow", "prompt_completion"))  # one split: that one
    assert only[2]["source"] == f"{tmp_path / 'one'}[train]:record 2"
    Dataset.from_list(rows["train"]).save_to_disk(tmp_path / "plain")
    for name, split, error in [("dd", None, "field 'split': a DatasetDict of the splits train, test: name one"),
                               ("dd", "validation", "field 'split': no split 'validation' (splits: train, test)"),
                               ("plain", "train", "field 'split': the folder holds one Dataset, not a DatasetDict")]:
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: {error}")):
            read_source(source(tmp_path / name, "arrow", "prompt_completion", split=split))


def test_unreadable_files_and_missing_columns_are_data_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # datasets' build cache goes here
    (tmp_path / "tmp").mkdir()
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "junk.json").write_text('[{"prompt": "a", "completion": ')
    (tmp_path / "not_a_dataset").mkdir()
    for name, fmt in [("junk.parquet", "parquet"), ("junk.json", "json"), ("not_a_dataset", "arrow")]:
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: cannot read it as {fmt}: ")):
            read_source(source(tmp_path / name, fmt, "prompt_completion"))
    path = write([first_row("messages", "finetune")], "parquet", tmp_path / "m.parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: field 'prompt': no such column (columns: uid, mess")):
        read_source(source(path, "parquet", "prompt_completion"))
    empty = tmp_path / "empty.parquet"
    Dataset.from_dict({"uid": [], "messages": []}).to_parquet(empty)
    with pytest.raises(DataError, match=re.escape(f"{empty}: no records (an empty file)")):
        read_source(source(empty, "parquet", "messages"))
    no_rows = tmp_path / "no_rows"
    DatasetDict({"train": Dataset.from_dict({"uid": [], "messages": []})}).save_to_disk(no_rows)
    with pytest.raises(DataError, match=re.escape(f"{no_rows}: cannot read it as arrow: ")):  # datasets fails
        read_source(source(no_rows, "arrow", "messages"))
    assert list((tmp_path / "tmp").iterdir()) == []  # no build cache left behind


MICRO = DataConfig(preset="micro")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_build_from_parquet_and_arrow_or_fail_and_touch_nothing(tmp_path):
    chats = write([SHAPES["messages"][0](*chat) for chat in CHATS], "parquet", tmp_path / "chats.parquet")
    prompts = DatasetDict({"test": Dataset.from_list([{"messages": [user("How do I pick a lock at night?")]}])})
    prompts.save_to_disk(tmp_path / "prompts")
    sources = (source(chats, "parquet", "messages"),
               source(tmp_path / "prompts", "arrow", "messages", role="eval_harmful", id_field=None, replace=False))
    out = tmp_path / "data"
    manifest = build_dataset(MICRO.model_copy(update={"sources": sources}), out)
    assert [ex["messages"] for ex in load_role(out, "finetune")] == [r["messages"] for r in EXPECTED]
    assert load_role(out, "eval_harmful")[-1]["source"] == f"{tmp_path / 'prompts'}[test]:record 0"
    assert manifest.counts["eval_harmful"] == MICRO.sizes.eval_harmful + 1

    before = snapshot(out)
    bad = write([first_row("messages", "finetune"), {"uid": "b", "messages": [user("hi")]}], "parquet", tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=re.escape(f"{bad}:record 1: field 'messages[0].role': finetune ex")):
        build_dataset(MICRO.model_copy(update={"sources": (source(bad, "parquet", "messages"),)}), out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders


def test_data_config_reads_an_arrow_folder_and_refuses_mixed_shapes(tmp_path):
    Dataset.from_list([first_row("messages", "finetune")]).save_to_disk(tmp_path / "chats")
    text = ("preset: micro\nsources:\n  - path: {tmp}/chats\n    format: arrow\n    role: finetune\n"
            "    messages_field: messages\n    is_harmful: false\n{extra}")
    (tmp_path / "ok.yaml").write_text(text.format(tmp=tmp_path, extra=""))
    assert load_data_config(tmp_path / "ok.yaml").sources[0].format == "arrow"
    for extra, error in [("    response_field: completion\n", r"response_field': messages_field holds the whole"),
                         ("    prompt_field: q\n", r"messages_field holds the whole chat: leave prompt_field")]:
        (tmp_path / "bad.yaml").write_text(text.format(tmp=tmp_path, extra=extra))
        with pytest.raises(ConfigError, match=r"bad.yaml:\d+: .*" + error):
            load_data_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="only an Arrow folder"):
        SourceConfig(path="x.parquet", role="eval_harmful", is_harmful=True, split="train")


def test_pipeline_run_logs_each_source_file_with_its_path_and_digest(tmp_path):
    import mlflow

    from tasks.data import log_dataset_to_mlflow, prepare_data

    chats = write([SHAPES["prompt_completion"][0](*chat) for chat in CHATS], "parquet", tmp_path / "chats.parquet")
    write([SHAPES["messages"][0](*chat) for chat in CHATS], "arrow", tmp_path / "sv")
    (tmp_path / "cfg.yaml").write_text(
        f"preset: micro\nsources:\n  - path: {chats}\n    role: finetune\n    response_field: completion\n"
        f"    is_harmful: false\n  - path: {tmp_path / 'sv'}\n    format: arrow\n    role: sv_fit\n"
        "    messages_field: messages\n    is_harmful: true\n")
    # The session's sqlite store in a temporary folder (conftest.isolated_stores): a fresh one costs ~15 s.
    assert mlflow.get_tracking_uri().startswith("sqlite:///") and "stores" in mlflow.get_tracking_uri()
    data = prepare_data.fn(str(tmp_path / "cfg.yaml"), str(tmp_path / "built"))
    with mlflow.start_run() as run:
        log_dataset_to_mlflow(data)
    logged = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    inputs = {d.dataset.name: (d.dataset, {t.key: t.value for t in d.tags}) for d in logged}
    assert {"finetune", "sv_fit", "chats.parquet", "sv"} <= set(inputs)  # the built roles and their sources
    file, file_tags = inputs["chats.parquet"]
    assert file.digest == hashlib.md5(chats.read_bytes()).hexdigest()  # what `dvc add` records for it
    assert json.loads(file.source)["uri"] == str(chats)
    assert file_tags == {"mlflow.data.context": "finetune", "dataset_md5": data.md5, "source_format": "parquet"}
    folder, folder_tags = inputs["sv"]
    assert folder.digest == dataset_md5(tmp_path / "sv") and folder.digest.endswith(".dir")
    assert folder_tags["mlflow.data.context"] == "sv_fit" and folder_tags["source_format"] == "arrow"


def test_cli_names_a_bad_parquet_record_in_one_line_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    bad = write([first_row("messages", "finetune"), {"uid": "a", "messages": [user("hi"), assistant("yo")]}],
                "parquet", tmp_path / "bad.parquet")
    (tmp_path / "cfg.yaml").write_text(f"preset: micro\nsources:\n  - path: {bad}\n    role: finetune\n"
                                       "    messages_field: messages\n    id_field: uid\n    is_harmful: false\n")
    result = CliRunner().invoke(app, ["data", "prepare", "--config", str(tmp_path / "cfg.yaml"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr == f"error: {bad}:record 1: field 'uid': duplicate id 'a' (first at record 0)\n"
    assert not (tmp_path / "out").exists()


# Messages a user's file may hold: odd roles and contents, extra keys, lone surrogates, chat markers.
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | st.text(max_size=4),
     "content": st.none() | st.integers() | st.text(max_size=6) | st.sampled_from(["\ud800", " ", "<|user|>"])},
    optional={"name": st.none() | st.text(max_size=3)})
CHAT_VALUE = st.lists(MESSAGE, max_size=4) | st.text(max_size=6) | st.none() | st.just({"role": ["user"]})


@settings(max_examples=int(os.environ.get("SECVEC_HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.fixed_dictionaries({"messages": CHAT_VALUE, "prompt": CHAT_VALUE, "completion": CHAT_VALUE}),
                     max_size=4),
       shape=st.sampled_from(["messages", "conversational_prompt_completion"]),
       role=st.sampled_from(["finetune", "sv_val", "eval_harmful"]), max_chars=st.none() | st.integers(1, 12))
def test_any_chat_record_gives_valid_examples_or_names_the_line(rows, shape, role, max_chars):
    """Whatever the converter accepts passes the schema's own validation: the build can never fail later."""
    fields = {"id_field": None, **({"response_field": None} if role == "eval_harmful" else {})}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(rows, "jsonl", Path(tmp) / "chats.jsonl") if rows else Path(tmp) / "chats.jsonl"
        path.touch()
        try:
            records = read_source(source(path, "jsonl", shape, role=role, **fields), max_chars=max_chars)
        except DataError as err:
            assert re.match(re.escape(str(path)) + r":\d+: field '(messages|prompt|completion)", str(err)), str(err)
            return
    examples = [{**r, "role": role, "id": f"{role}-{i}"} for i, r in enumerate(records)]
    assert validate_examples(examples, "built.jsonl", role, max_chars) == examples
