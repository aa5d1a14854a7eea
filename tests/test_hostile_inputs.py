"""Hostile inputs: data files of arbitrary bytes, config paths escaping the project, and through the task
layer on a real sqlite MLflow store: weights tampered with after evaluation, several runs registering at once."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from secvec.config import ConfigError, SourceConfig, load_data_config, load_pipeline_config
from secvec.data import DataError, Example, load_role, read_jsonl, validate_examples
from secvec.data.sources import read_source
from secvec.paths import PROJECT_ROOT

# 60 examples per property keeps CI fast; SECVEC_HYPOTHESIS_EXAMPLES=2000 digs deeper (e.g. nightly).
PROPERTY = settings(max_examples=int(os.environ.get("SECVEC_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---- strategies: text and bytes a nightly job may be fed ---------------------------------------------------

ODD_CHARS = st.sampled_from(["\x00", "\x1b[2J", "\r", "\x0b", "\x1c", "\x7f", "\x85", "\u2028", "\ufeff",
                             "\ud800", "\udcff", "<|user|>", "<|end|>", '"', "\\", ","])
TEXT = st.lists(st.one_of(st.text(max_size=12), ODD_CHARS), max_size=6).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("id", "source", "role", "category", "is_harmful", "messages", "answer")


def good_example(ident: str = "a", role: str = "finetune") -> dict:
    return {"id": ident, "source": "s.csv:1", "role": role, "category": "c", "is_harmful": False,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
            "answer": None}


@st.composite
def examples(draw) -> object:
    """A schema example with up to two fields replaced, removed or added, sometimes not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON_VALUES)
    obj = good_example(draw(st.sampled_from(["a", "b", "c"]) | TEXT))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(FIELDS) | TEXT)
        if draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = draw(JSON_VALUES | st.lists(st.fixed_dictionaries({"role": TEXT, "content": TEXT})))
    return obj


def encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")  # lone surrogates become invalid UTF-8 bytes


HUGE = st.integers(10_000, 300_000)
JSONL_LINES = st.one_of(
    examples().flatmap(lambda o: st.booleans().map(lambda ascii: encode(json.dumps(o, ensure_ascii=ascii)))),
    st.binary(max_size=40),
    TEXT.map(encode),
    HUGE.map(lambda n: json.dumps(good_example() | {"category": "x" * n}).encode()),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # nesting deeper than the recursion limit
    st.integers(4000, 6000).map(lambda n: b'{"id": ' + b"7" * n + b"}"),  # int beyond Python's digit limit
)


def jsonl_files():
    return st.lists(JSONL_LINES, max_size=5).flatmap(
        lambda lines: st.sampled_from([b"\n", b"\r\n"]).map(lambda end: end.join(lines)))


# ---- checks shared by every property ----------------------------------------------------------------------


def assert_names_file_and_line(err: Exception, label: str | Path, lines: int | set[int]) -> int:
    """The message starts `label:LINE:`, stays on one line and can be printed as UTF-8; returns LINE."""
    message = str(err)
    match = re.match(re.escape(str(label)) + r":(\d+): ", message)
    assert match, f"message does not start with {label}:LINE: {message[:300]!r}"
    line = int(match.group(1))
    assert line in lines if isinstance(lines, set) else 1 <= line <= lines, (line, message[:300])
    assert "\n" not in message
    message.encode("utf-8")  # a surrogate in the message would crash the CLI's error print
    return line


def assert_valid(examples: list[dict], role: str | None = None) -> None:
    """Valid schema examples that can be written back as UTF-8 JSONL."""
    for ex in examples:
        Example.model_validate(ex)
        assert role is None or ex["role"] == role
        json.dumps(ex, ensure_ascii=False).encode("utf-8")
    assert len({ex["id"] for ex in examples}) == len(examples)


def n_lines(data: bytes, universal: bool = False) -> int:
    """Lines of a file as its reader counts them (csv also breaks lines at a lone `\\r`)."""
    if universal:
        return len(io.StringIO(data.decode("utf-8", "surrogateescape"), newline="").readlines()) + 1
    return data.count(b"\n") + 1


# ---- properties of the loaders ----------------------------------------------------------------------------


@PROPERTY
@given(data=jsonl_files())
@example(data=b"[" * 3000 + b"]" * 3000)
@example(data=b'{"a": ' + b"[" * 990 + b"]" * 990 + b"}")
@example(data=b'{"id": ' + b"1" * 5000 + b"}")
@example(data=b'{"id": "\\ud800"}')
def test_read_jsonl_gives_objects_or_names_the_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        try:
            records = list(read_jsonl(path))
        except DataError as err:
            assert_names_file_and_line(err, path, n_lines(data))
            return
    assert all(isinstance(obj, dict) for _, obj in records)
    assert [n for n, _ in records] == sorted({n for n, _ in records})
    json.dumps([obj for _, obj in records], ensure_ascii=False).encode("utf-8")  # no undecodable text kept


@PROPERTY
@given(data=jsonl_files())
@example(data=encode(json.dumps(good_example() | {"category": "\ud800"}, ensure_ascii=True)))
@example(data=json.dumps(good_example()).encode() + b"\n" + json.dumps(good_example()).encode())
def test_load_role_gives_valid_examples_or_names_the_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finetune.jsonl"
        path.write_bytes(data)
        try:
            loaded = load_role(tmp, "finetune")
        except DataError as err:
            assert_names_file_and_line(err, path, n_lines(data))
            return
    assert_valid(loaded, "finetune")
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    assert len(loaded) == sum(1 for line in text.split("\n") if line.strip())  # blank lines are skipped


@PROPERTY
@given(objs=st.lists(examples(), max_size=5), max_chars=st.none() | st.integers(1, 40),
       first=st.integers(1, 10**6))
def test_validate_examples_gives_valid_examples_or_names_the_line(objs, max_chars, first):
    lines = [first + 3 * i for i in range(len(objs))]  # e.g. the lines of a file with blank lines between
    try:
        out = validate_examples(objs, "roles/finetune.jsonl", "finetune", max_chars, lines=lines)
    except DataError as err:
        assert_names_file_and_line(err, "roles/finetune.jsonl", set(lines))
        return
    assert_valid(out, "finetune")
    assert len(out) == len(objs)


def csv_bytes(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return encode(buffer.getvalue())


CELLS = st.one_of(TEXT, st.sampled_from(["1", "x", "a"]), HUGE.map(lambda n: "y" * n))
CSV_FILES = st.one_of(
    st.lists(st.lists(CELLS, min_size=1, max_size=4), max_size=4).map(
        lambda rows: csv_bytes([["prompt", "response", "uid"], *rows])),
    st.lists(st.lists(CELLS, max_size=4), max_size=4).map(csv_bytes),
    st.binary(max_size=80),
    st.just(b"prompt\xff,response\nhi,there\n"),
)
JSONL_SOURCES = st.lists(
    st.one_of(st.fixed_dictionaries({"prompt": JSON_VALUES | TEXT, "response": JSON_VALUES | TEXT,
                                     "uid": st.sampled_from(["1", "2"]) | JSON_VALUES}).map(
                  lambda o: encode(json.dumps(o, ensure_ascii=False))),
              JSONL_LINES), max_size=4).map(b"\n".join)
TXT_FILES = st.lists(st.one_of(TEXT.map(encode), st.binary(max_size=20), HUGE.map(lambda n: b"z" * n)),
                     max_size=5).map(b"\n".join)
SOURCES = st.one_of(
    st.tuples(st.just("csv"), CSV_FILES), st.tuples(st.just("jsonl"), JSONL_SOURCES),
    st.tuples(st.just("txt"), TXT_FILES),
)


@PROPERTY
@given(source=SOURCES, with_ids=st.booleans(), max_chars=st.none() | st.integers(1, 60))
@example(source=("csv", csv_bytes([["prompt", "response"], ["hi", "x" * 200_000]])), with_ids=False,
         max_chars=None)
@example(source=("csv", b"prompt\xff,response\nhi,there\n"), with_ids=False, max_chars=None)
def test_read_source_gives_valid_records_or_names_the_line(source, with_ids, max_chars):
    fmt, data = source
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"user.{fmt}"
        path.write_bytes(data)
        config = SourceConfig(path=str(path), role="eval_harmful" if fmt == "txt" else "finetune",
                              is_harmful=True, response_field=None if fmt == "txt" else "response",
                              id_field="uid" if with_ids and fmt != "txt" else None)
        try:
            records = read_source(config, max_chars=max_chars)
        except DataError as err:
            assert_names_file_and_line(err, path, n_lines(data, universal=fmt == "csv"))
            return
    examples = [{**r, "role": config.role, "id": r.get("id") or f"{config.role}-{i:05d}"}
                for i, r in enumerate(records, 1)]
    assert_valid(validate_examples(examples, "built.jsonl", config.role, max_chars), config.role)


# ---- the loader bugs these properties found, pinned -------------------------------------------------------


@pytest.mark.parametrize("line, error", [
    (b"[" * 3000 + b"]" * 3000, "invalid JSON: nested too deeply"),
    (b'{"id": ' + b"1" * 5000 + b"}", "invalid JSON: Exceeds the limit (4300 digits)"),
    (json.dumps(good_example() | {"category": "\ud800"}).encode(), "field 'category': invalid UTF-8"),
])
def test_jsonl_edge_cases_are_data_errors(tmp_path, line, error):
    (tmp_path / "finetune.jsonl").write_bytes(json.dumps(good_example("z")).encode() + b"\n" + line + b"\n")
    with pytest.raises(DataError, match=re.escape(f"finetune.jsonl:2: {error}")):
        load_role(tmp_path, "finetune")


@pytest.mark.parametrize("data, error", [
    (b"prompt,response\nhi," + b"x" * 200_000 + b"\n", "user.csv:2: invalid CSV: field larger than field limit"),
    (b"prompt\xff,response\nhi,there\n", "user.csv:1: invalid UTF-8 in the header row"),
])
def test_csv_edge_cases_are_data_errors(tmp_path, data, error):
    (tmp_path / "user.csv").write_bytes(data)
    config = SourceConfig(path=str(tmp_path / "user.csv"), role="finetune", is_harmful=False,
                          response_field="response")
    with pytest.raises(DataError, match=re.escape(error)):
        read_source(config)


# ---- config paths escaping the project --------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PIPELINE = "name: t\ndata: configs/data/micro.yaml\n"
UP = "../" * 30  # more levels than any checkout is deep: `UP + "etc"` is /etc


@pytest.fixture(autouse=True)
def no_shared_env(monkeypatch):
    """What a config may read must not depend on the shared folder the caller happens to set."""
    monkeypatch.delenv("SECVEC_SHARED_DATASETS", raising=False)


@pytest.mark.parametrize("extra, pattern", [
    ("data_dir: /tmp/secvec-data\n", r"t.yaml:3: field 'data_dir': /tmp/secvec-data is not inside the project"),
    (f"data_dir: {UP}etc\n", r"t.yaml:3: field 'data_dir': /etc is not inside the project"),
    ("data_dir: .\n", r"t.yaml:3: field 'data_dir': .* is not inside the project"),
    ("data_dir: data/../..\n", r"t.yaml:3: field 'data_dir': .* is not inside the project"),
    ("allow_outside_project: true\ndata_dir: ../shared/datasets\n",
     r"t.yaml:4: field 'data_dir': .*/shared/datasets is not inside the project"),
    ("base_model: /etc\n", r"t.yaml:3: field 'base_model': /etc is outside the project .* allow_outside_project"),
    (f"base_model: {UP}usr/lib\n", r"t.yaml:3: field 'base_model': /usr/lib is outside the project"),
])
def test_pipeline_paths_outside_the_project_are_refused(tmp_path, extra, pattern):
    path = write(tmp_path / "conf" / "t.yaml", PIPELINE + extra)
    with pytest.raises(ConfigError, match=pattern):
        load_pipeline_config(path)


def test_pipeline_data_config_outside_the_project_is_refused(tmp_path):
    elsewhere = write(tmp_path / "elsewhere" / "d.yaml", "preset: micro\n")
    path = write(tmp_path / "conf" / "t.yaml", f"name: t\ndata: {elsewhere}\n")
    with pytest.raises(ConfigError, match=r"t.yaml:2: field 'data': .*/elsewhere/d.yaml is outside the project"):
        load_pipeline_config(path)
    write(path, f"name: t\ndata: {elsewhere}\nallow_outside_project: true\n")
    assert load_pipeline_config(path).data == elsewhere


def test_allowed_reads_outside_the_project(tmp_path):
    path = write(tmp_path / "conf" / "t.yaml", PIPELINE + "base_model: /models/m\nallow_outside_project: true\n"
                 "data_dir: data/nightly\n")
    cfg = load_pipeline_config(path)
    assert cfg.base_model == Path("/models/m") and cfg.data_dir == PROJECT_ROOT / "data" / "nightly"
    beside = write(tmp_path / "conf" / "data.yaml", "preset: micro\n")  # the config's own folder
    assert load_pipeline_config(write(path, f"name: t\ndata: {beside}\n")).data == beside


def source_yaml(path: Path, extra: str = "") -> str:
    return (f"preset: micro\n{extra}sources:\n  - path: {path}\n    format: csv\n    role: finetune\n"
            "    response_field: r\n    is_harmful: false\n")


def test_data_sources_outside_the_project_are_refused_unless_allowed(tmp_path):
    outside = write(tmp_path / "user-files" / "mine.csv", "prompt,r\nhi,there\n")
    config = write(tmp_path / "conf" / "d.yaml", source_yaml(outside))
    with pytest.raises(ConfigError, match=r"d.yaml:3: field 'sources\[0\].path': .*/user-files/mine.csv is "
                                          r"outside the project .* set allow_outside_project: true"):
        load_data_config(config)
    for escape in ("/etc/passwd", f"{UP}etc/passwd", f"configs/{UP}etc/hosts"):
        with pytest.raises(ConfigError, match=r"d.yaml:3: field 'sources\[0\].path': /etc/\w+ is outside"):
            load_data_config(write(config, source_yaml(Path(escape))))
    allowed = load_data_config(write(config, source_yaml(outside, "allow_outside_project: true\n")))
    assert allowed.sources[0].path == str(outside)
    assert "allow_outside_project" not in allowed.model_dump()  # the manifest and cache keys stay the same
    with pytest.raises(ConfigError, match=r"d.yaml:2: field 'shared_datasets': /srv/x is outside"):
        load_data_config(write(config, "preset: public\nshared_datasets: /srv/x\n"))


def test_shared_datasets_and_the_configs_folder_are_readable(tmp_path, monkeypatch):
    shared = write(tmp_path / "shared" / "extra.csv", "prompt,r\nhi,there\n")
    config = write(tmp_path / "conf" / "d.yaml", source_yaml(shared))
    with pytest.raises(ConfigError, match="outside the project"):
        load_data_config(config)
    monkeypatch.setenv("SECVEC_SHARED_DATASETS", str(shared.parent))
    assert load_data_config(config).sources[0].path == str(shared)
    beside = write(tmp_path / "conf" / "mine.csv", "prompt,r\nhi,there\n")
    assert load_data_config(write(config, source_yaml(beside))).sources


def test_symlink_out_of_the_project_is_refused(tmp_path):
    project, secret = tmp_path / "project", write(tmp_path / "secret" / "key.csv", "prompt,r\nhi,there\n")
    (project / "data").mkdir(parents=True)
    (project / "data" / "link.csv").symlink_to(secret)
    config = write(project / "configs" / "d.yaml", source_yaml(Path("data/link.csv")))
    with pytest.raises(ConfigError, match=r"field 'sources\[0\].path': .*/secret/key.csv is outside"):
        load_data_config(config, root=project)
    write(project / "data" / "real.csv", "prompt,r\nhi,there\n")
    assert load_data_config(write(config, source_yaml(Path("data/real.csv"))), root=project).sources


@pytest.mark.parametrize("kind", ["folder of other files", "file"])
def test_build_never_replaces_what_is_not_a_dataset(tmp_path, kind):
    from secvec.config import DataConfig
    from secvec.data.build import build_dataset

    out = tmp_path / "secvec"  # e.g. `data_dir: secvec` in a config: inside the project, yet not data
    if kind == "file":
        write(out, "keep me")
    else:
        write(out / "__init__.py", "keep me")
    with pytest.raises(DataError, match=r"secvec: exists and is not a dataset folder \(no manifest.json\)"):
        build_dataset(DataConfig(preset="micro"), out)
    assert (out if kind == "file" else out / "__init__.py").read_text() == "keep me"
    if kind == "file":
        out.unlink()
    else:
        (out / "__init__.py").unlink()  # an empty folder may be built into
    assert build_dataset(DataConfig(preset="micro"), out).counts["finetune"] == 200
    assert build_dataset(DataConfig(preset="micro"), out).counts["finetune"] == 200  # a build replaces a build


SHIPPED = sorted([*(PROJECT_ROOT / "configs").glob("*.yaml"), *(PROJECT_ROOT / "configs" / "ablations").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_pipeline_config_loads(path):
    cfg = load_pipeline_config(path)
    assert cfg.data.is_file() and cfg.data.resolve().is_relative_to(PROJECT_ROOT.resolve())
    load_data_config(cfg.data)


BENCH_AND_ATTACK = sorted([*(PROJECT_ROOT / "configs" / "bench").glob("*.yaml"),
                           *(PROJECT_ROOT / "configs" / "attack").glob("*.yaml")])


@pytest.mark.parametrize("path", BENCH_AND_ATTACK, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_bench_and_attack_config_loads_with_its_pipeline(path):
    """Bench and attack presets name a pipeline preset: both must load (and the bench's cells expand)."""
    from secvec.bench.cells import expand_cells
    from secvec.config import load_attack_config, load_bench_config

    cfg = (load_bench_config if path.parent.name == "bench" else load_attack_config)(path)
    load_pipeline_config(cfg.pipeline)
    if path.parent.name == "bench":
        assert expand_cells(cfg)


def test_presets_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"default", "micro", "public", "local-model.example"}


# ---- registry through the task layer: tampered weights, two runs at once -------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real sqlite tracking/registry store for the module (creating it takes seconds)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment("hostile", artifact_location=str(root / "artifacts"))


@pytest.fixture
def tracking(store, monkeypatch):
    """The task's `mlflow.MlflowClient()` reads MLFLOW_TRACKING_URI (a URI pinned by another test is unset)."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    uri, client, experiment = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    return client, experiment


def write_model(path: Path, seed: int) -> Path:
    # a loadable chat model: registered versions are MLflow transformers models
    from tiny_chat_model import write_chat_model

    return write_chat_model(path, seed)


POLICY = {"metric": "utility", "higher_is_better": True, "min_improvement": 0.0,
          "harmful_metric": "harmful_rate", "harmful_tolerance": 0.0}


@pytest.fixture
def no_run_logger():
    """The task's body runs outside a flow run (`register.fn`); its run logger is switched off meanwhile."""
    from prefect.logging import disable_run_logger

    import tasks.register  # noqa: F401 - imported before disabling: its imports set logging up afresh

    with disable_run_logger():  # process-wide, so entered once around every thread of a test
        yield


def register_task(client, experiment, model_dir: Path, name: str, metrics: dict, expected: dict) -> dict:
    """What one pipeline run does after its gate passed: the register task on a new MLflow run."""
    from secvec.config import ChampionPolicy
    from secvec.refs import ModelRef
    from tasks.register import register

    run_id = client.create_run(experiment).info.run_id
    return register.fn(run_id, ModelRef.of(model_dir), name, {"metrics": metrics}, expected, metrics,
                       ChampionPolicy(**POLICY))


def test_task_refuses_weights_changed_after_evaluation(tracking, no_run_logger, tmp_path):
    from secvec.registry import WeightsMismatchError, weights_sha256

    client, experiment = tracking
    model_dir = write_model(tmp_path / "clean", seed=0)
    evaluated = weights_sha256(model_dir)  # what the evaluate task recorded
    save_file({"w": torch.zeros(4, 4)}, model_dir / "model.safetensors")  # then the file changes
    with pytest.raises(WeightsMismatchError, match="model.safetensors"):
        register_task(client, experiment, model_dir, "tampered", {"utility": 1.0, "harmful_rate": 0.0}, evaluated)
    assert client.search_registered_models(filter_string="name = 'tampered'") == []
    assert client.search_model_versions("name = 'tampered'") == []
    # the same call with the evaluated weights registers: the refusal above is the hash check's doing
    result = register_task(client, experiment, model_dir, "tampered", {"utility": 1.0, "harmful_rate": 0.0},
                           weights_sha256(model_dir))
    assert result == {"name": "tampered", "version": "1", "aliases": ["candidate", "champion"]}


def test_task_rerun_with_the_same_weights_reuses_the_version(tracking, no_run_logger, tmp_path):
    from secvec.registry import weights_sha256

    client, experiment = tracking
    model_dir, metrics = write_model(tmp_path / "clean", seed=1), {"utility": 0.5, "harmful_rate": 0.0}
    first = register_task(client, experiment, model_dir, "rerun", metrics, weights_sha256(model_dir))
    again = register_task(client, experiment, model_dir, "rerun", metrics, weights_sha256(model_dir))  # new run
    assert first == again == {"name": "rerun", "version": "1", "aliases": ["candidate", "champion"]}
    assert len(client.search_model_versions("name = 'rerun'")) == 1


def test_runs_registering_at_once_leave_consistent_aliases(tracking, no_run_logger, tmp_path):
    from secvec.config import ChampionPolicy
    from secvec.registry import beats, weights_sha256

    client, experiment = tracking
    name = "concurrent"
    plans = {  # three pipeline runs, two models each (utility, harmful rate); the best is 0.9 at harm 0
        "a": [(0.5, 0.0), (0.9, 0.0)],
        "b": [(0.6, 0.0), (0.95, 0.3)],  # more useful but more harmful than the champion: never promoted
        "c": [(0.7, 0.0), (0.8, 0.0)],
    }
    step, errors, results = threading.Barrier(len(plans), timeout=60), [], []

    def pipeline_run(label: str) -> None:
        try:
            for i, (utility, harm) in enumerate(plans[label]):
                model = write_model(tmp_path / f"{label}{i}", seed=10 * ord(label) + i)
                step.wait()  # all runs register (and promote) at the same moment, round after round
                metrics = {"utility": utility, "harmful_rate": harm}
                results.append(register_task(client, experiment, model, name, metrics, weights_sha256(model)))
        except Exception as err:  # noqa: BLE001 - reported below with the run's label
            errors.append(f"{label}: {type(err).__name__}: {err}")
            step.abort()  # the other runs stop waiting for this one

    threads = [threading.Thread(target=pipeline_run, args=(label,)) for label in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors

    versions = {str(v.version): json.loads(v.tags["metrics"]) for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions, key=int) == [str(i) for i in range(1, 7)]  # one version per model, no gaps
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases["candidate"] == "6", aliases  # the newest: version creation and alias move are one step
    champion = versions[aliases["champion"]]
    assert champion == {"utility": 0.9, "harmful_rate": 0.0}, (aliases, versions)
    policy = ChampionPolicy(**POLICY)
    assert not any(beats(m, champion, policy)[0] for m in versions.values()), "a better version is not champion"
    assert all("champion_decision" in v.tags for v in client.search_model_versions(f"name = '{name}'"))
    assert len(results) == 6 and set(aliases) == {"candidate", "champion"}
