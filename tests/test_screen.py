"""Vector screening: the security vector as a detector of the fine-tuning set's harmful samples."""

from __future__ import annotations

import pytest

from secvec.screen import auroc, balanced_threshold, screen_report, vector_scores


def test_auroc_counts_pairs_and_ties():
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1], [True, False]) == 0.0
    assert auroc([1, 1], [True, False]) == 0.5
    assert auroc([1, 2], [True, True]) is None


def test_balanced_threshold_separates_the_known_sets_and_prefers_flagging_less():
    assert balanced_threshold([2.0, 3.0], [0.0, 1.0]) == 1.5
    assert 0.0 < balanced_threshold([1.0], [0.0]) < 1.0
    with pytest.raises(ValueError, match="both score sets"):
        balanced_threshold([], [0.1])


def test_report_lists_the_top_samples_and_agreement_with_labels():
    examples = [{"id": f"x{i}", "is_harmful": i < 2} for i in range(4)]
    report = screen_report(examples, [0.9, 0.2, 0.8, 0.0], threshold=0.5, top=2)
    assert report["flagged"] == 2 and [t["id"] for t in report["top"]] == ["x0", "x2"]
    assert report["precision"] == 0.5 and report["recall"] == 0.5 and report["auroc"] == 0.75


def test_the_micro_vector_scores_harmful_samples_above_benign_ones(guarded_model, world):
    model, tokenizer = guarded_model
    harmful, benign = world["harmful_ft"][:24], world["benign_ft"][:24]
    scores = vector_scores(model, tokenizer, harmful + benign)
    labels = [True] * len(harmful) + [False] * len(benign)
    assert auroc(scores, labels) > 0.9, scores
    threshold = balanced_threshold(vector_scores(model, tokenizer, world["sv_fit"][:12]), scores[len(harmful):])
    report = screen_report([{"id": str(i), "is_harmful": y} for i, y in enumerate(labels)], scores, threshold, 5)
    assert report["recall"] > 0.8 and report["precision"] > 0.8, report


def test_drop_mode_trains_on_a_screened_copy_of_the_dataset(micro_base, micro_vector, tmp_path, monkeypatch):
    """The stage's body (no Prefect run needed): flagged samples leave `finetune`, every other role stays."""
    import json

    from secvec.config import DataConfig, RuntimeConfig, ScreenConfig
    from secvec.data import ROLES, load_role
    from secvec.data.build import build_dataset
    from secvec.refs import DataRef, ModelRef, VectorRef
    from tasks.screen import screen

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / "cache"))
    build_dataset(DataConfig(preset="micro"), tmp_path / "data")
    data, base = DataRef.of(tmp_path / "data"), ModelRef.of(micro_base)
    vector = VectorRef(dir=str(micro_vector), sha256="micro")
    result = screen.task.fn(base, vector, data, ScreenConfig(mode="drop"), RuntimeConfig())
    report, kept = result.report, load_role(result.data.dir, "finetune")
    assert len(kept) == report["kept"] == report["n"] - report["flagged"] and report["calibration"]["sv_val"] == 20
    assert result.data.md5 != data.md5 or report["flagged"] == 0
    assert all(load_role(result.data.dir, r) == load_role(data.dir, r) for r in ROLES if r != "finetune")
    assert json.loads((result.data.path / "manifest.json").read_text())["config"]["screened_from"] == data.md5
    assert screen.stored(screen.out_dir(base, vector, data, ScreenConfig(mode="drop"), RuntimeConfig())) == result


def test_a_bench_cell_is_screened_with_a_given_threshold_and_keeps_only_its_roles(micro_base, micro_vector,
                                                                                  tmp_path, monkeypatch):
    """secvec_screen: a cell's data holds no `align` / `sv_fit` to calibrate on, so the bench passes the
    vector's cut; the screened copy has the cell's roles and no others."""
    from secvec.config import DataConfig, RuntimeConfig, ScreenConfig
    from secvec.data import load_role
    from secvec.data.build import build_dataset, write_dataset
    from secvec.data.schema import Manifest
    from secvec.refs import DataRef, ModelRef, VectorRef
    from tasks.screen import screen

    monkeypatch.setenv("SECVEC_CACHE", str(tmp_path / "cache"))
    build_dataset(DataConfig(preset="micro"), tmp_path / "data")
    roles = {r: load_role(tmp_path / "data", r) for r in ("finetune", "eval_harmful", "eval_utility")}
    write_dataset(roles, tmp_path / "cell", Manifest.of(roles, "bench-cell", 0, {}))
    cell, base = DataRef.of(tmp_path / "cell"), ModelRef.of(micro_base)
    vector = VectorRef(dir=str(micro_vector), sha256="micro")
    result = screen.task.fn(base, vector, cell, ScreenConfig(mode="drop", threshold=0.5), RuntimeConfig())
    assert result.report["threshold"] == 0.5 and result.report["calibration"] == {}
    assert sorted(p.stem for p in result.data.path.glob("*.jsonl")) == ["eval_harmful", "eval_utility", "finetune"]
    assert len(load_role(result.data.dir, "finetune")) == result.report["kept"] < len(roles["finetune"])
