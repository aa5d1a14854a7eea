"""The layering: the library never imports Prefect, the tasks or the flows, and its imports form no cycle;
a stage's output folder (its cache key) is computed from its own inputs' identities."""

from __future__ import annotations

import ast
from pathlib import Path

from secvec.config import RuntimeConfig, VectorConfig
from secvec.refs import DataRef, ModelRef

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "tasks", "flows")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def library_graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in (ROOT / "secvec").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for imported in _imports(path):
            # `from secvec.data import x` depends on the package secvec.data (or its module secvec.data.x)
            target = imported if imported in files else imported.rpartition(".")[0]
            if target in files and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def test_library_imports_no_prefect_tasks_or_flows():
    bad = {_module(p): sorted(i for i in _imports(p) if i.split(".")[0] in FORBIDDEN)
           for p in (ROOT / "secvec").rglob("*.py")}
    assert not {m: i for m, i in bad.items() if i}


def test_library_import_graph_has_no_cycle():
    graph, state, cycles = library_graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_stage_folder_is_keyed_on_input_identities_not_paths(tmp_path, monkeypatch):
    from tasks.vector import fit_security_vector

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    data, cfg, rt = DataRef(dir="/a/data", md5="m.dir"), VectorConfig(), RuntimeConfig(device="cpu", precision="fp32")
    out = fit_security_vector.out_dir(ModelRef(dir="/a/base", sha256="s1"), data, cfg, rt)
    assert out.parent == tmp_path / "fit-security-vector"
    assert out == fit_security_vector.out_dir(ModelRef(dir="/elsewhere", sha256="s1"), data.model_copy(
        update={"dir": "/b"}), cfg, rt)  # the same weights and data in other folders: the same stage
    assert out != fit_security_vector.out_dir(ModelRef(dir="/a/base", sha256="s2"), data, cfg, rt)
    assert out != fit_security_vector.out_dir(ModelRef(dir="/a/base", sha256="s1"), data, VectorConfig(rank=4), rt)
    # threads change the bits, so they change the stage
    two = rt.model_copy(update={"threads": 2})
    assert out != fit_security_vector.out_dir(ModelRef(dir="/a/base", sha256="s1"), data, cfg, two)


def test_labels_do_not_change_the_stage_folder(tmp_path, monkeypatch):
    from tasks.evaluate import evaluate

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    model, data = ModelRef(dir="/m", sha256="s"), DataRef(dir="/d", md5="m.dir")
    from secvec.config import EvalConfig

    rt = RuntimeConfig()
    assert evaluate.out_dir("base", model, data, EvalConfig(), rt) == evaluate.out_dir("clean", model, data, EvalConfig(), rt)


def test_a_new_knob_at_its_neutral_value_keeps_the_cached_stages(tmp_path, monkeypatch):
    """`finetune.vector_scale` arrived after stages were cached: at 1 it is not part of the key."""
    from secvec.config import FinetuneConfig
    from tasks.finetune import finetune_backbone

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path))
    base, data, rt = ModelRef(dir="/m", sha256="s"), DataRef(dir="/d", md5="m.dir"), RuntimeConfig()
    assert "vector_scale" not in FinetuneConfig().model_dump(mode="json")
    assert FinetuneConfig(vector_scale=1.0) == FinetuneConfig()
    scaled = FinetuneConfig(vector_scale=1.5)
    assert finetune_backbone.out_dir(base, None, data, scaled, rt) != finetune_backbone.out_dir(
        base, None, data, FinetuneConfig(), rt)


def test_prefect_never_serves_a_stage_result_made_for_another_cache_root(tmp_path, monkeypatch):
    """Prefect's result store outlives a cache root (a test session's temp folder): its records are keyed on
    the root too, or a finished stage would come back pointing at folders that are gone."""
    from tasks.vector import fit_security_vector

    inputs = (ModelRef(dir="/m", sha256="s"), DataRef(dir="/d", md5="m.dir"), VectorConfig(), RuntimeConfig())
    keys = []
    for root in ("a", "b", "a"):
        monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / root))
        keys.append((fit_security_vector.out_dir(*inputs).name, fit_security_vector.prefect_key(*inputs)))
    assert keys[0][0] == keys[1][0]  # the same stage folder name under either root
    assert keys[0][1] != keys[1][1] and keys[0] == keys[2]
