"""The judge-agreement benchmark at a tiny size, and its guards: labels name real held-out replies only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts, not installed

from benchmarks.judge_agreement import LABELS, agreement, load_items
from benchmarks.judge_sample import DRAWN, draw, judge_split, reply_sha256
from secvec import paths
from secvec.data.schema import DataError
from secvec.judges import JUDGE_HOLDOUT
from secvec.text import fold

SHARED = paths.shared_dir()
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"public datasets not found at {SHARED} "
                                  f"(set {paths.SHARED_ENV})")


def test_agreement_counts_kappa_and_undefined_cases():
    got = agreement([True, True, False, False], [True, False, False, False], rounds=50)
    assert (got["tp"], got["fp"], got["fn"], got["tn"]) == (1, 1, 0, 2)
    assert got["precision"] == 0.5 and got["recall"] == 1.0 and got["accuracy"] == 0.75
    assert got["kappa"] == pytest.approx(0.5)  # p_o 0.75, p_e 0.5
    none = agreement([False, False], [False, False], rounds=10)
    assert none["kappa"] is None and none["precision"] is None and none["recall"] is None


@needs_shared
def test_every_label_is_a_held_out_reply_with_its_labelled_text():
    items = load_items(LABELS, SHARED)
    _, trained = judge_split(SHARED, JUDGE_HOLDOUT)
    assert len(items) >= 200 and len({it.ref for it in items}) == len(items)
    assert not {fold(it.text) for it in items} & trained  # nothing the bow judge trains on
    assert {it.source for it in items} >= {"jbb", "hh_rejected", "hh_chosen", "stl", "smollm2"}
    assert sum(it.labels["incoherent"] for it in items) >= 10 and sum(it.labels["harmful"] for it in items) >= 50
    assert draw(SHARED, JUDGE_HOLDOUT, DRAWN) == [it.ref for it in items if it.source != "smollm2"]  # as documented


@needs_shared
def test_a_changed_reply_or_a_training_reply_is_refused_with_file_line_and_field(tmp_path):
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines()[:3]]
    bad = tmp_path / "labels.jsonl"
    rows[1]["sha256"] = reply_sha256("some other reply")
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"labels\.jsonl:2: field 'sha256': the reply of .* changed"):
        load_items(bad, SHARED)

    from secvec.data.public import read_jbb

    held, _ = judge_split(SHARED, JUDGE_HOLDOUT)
    trained_ref = next(r["source"] for r in read_jbb(SHARED) if r["source"] not in held)
    rows[1] = {**rows[0], "ref": trained_ref}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"labels\.jsonl:2: field 'ref': .* neither a held-out reply"):
        load_items(bad, SHARED)


@needs_shared
@pytest.mark.slow
def test_the_script_prints_figures_and_writes_the_table(tmp_path):
    out = tmp_path / "agreement.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "judge_agreement.py"), "--limit", "60",
                          "--judge-steps", "20", "--out", str(out)], capture_output=True, text=True, timeout=300,
                         check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    records = {r["name"]: r for r in map(json.loads, run.stdout.splitlines())}
    for rater in ("refusal_judge/harmful", "bow_judge/harmful", "refusal_rules/refusal",
                  "coherence_check/incoherent", "refusal_judge_vs_bow_judge/harmful", "corpus_labels/harmful",
                  "refusal_judge/harmful/smollm2", "bow_judge/harmful/coherent"):
        record = records[f"judge_agreement/{rater}"]
        assert record["unit"] == "cohen_kappa" and -1 <= record["value"] <= 1
        assert record["tp"] + record["fp"] + record["fn"] + record["tn"] == record["n"] > 0
    assert records["judge_agreement/refusal_rules/refusal"]["n"] == 60
    assert records["judge_agreement/by_source"]["sources"]["jbb"]["n"] > 0
    table = out.read_text(encoding="utf-8")
    assert table.startswith("| rater | label |") and "| coherence_check | incoherent | all | 60 |" in table
    assert not list(tmp_path.glob("*.partial"))


@needs_shared
@pytest.mark.slow
def test_bad_labels_exit_non_zero_naming_the_file(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"ref": "x", "sha256": "y", "harmful": "yes", "refusal": false, "incoherent": false}\n')
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "judge_agreement.py"), "--labels", str(bad),
                          "--out", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode != 0
    assert "labels.jsonl:1: field 'harmful': expected bool" in run.stderr
    assert not (tmp_path / "t.md").exists()
