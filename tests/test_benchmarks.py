"""The benchmark harness on a micro model: well-formed result lines (a shape test, not a timing test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder of scripts, not installed

from benchmarks.common import to_line
from benchmarks.generation import generation_speedup
from benchmarks.training import fit_exponent


def test_generation_benchmark_prints_one_json_line_with_name_value_unit():
    (record,) = generation_speedup(size="micro", n_prompts=8, max_new_tokens=4, rounds=1)
    line = to_line(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["name"] == "generation_speedup"
    assert isinstance(parsed["value"], float) and parsed["value"] > 0
    assert isinstance(parsed["unit"], str) and parsed["unit"]
    assert parsed["prompts"] == 8 and parsed["batched_s"] > 0


def test_a_record_without_value_is_refused():
    with pytest.raises(TypeError, match="value"):
        to_line({"name": "x", "unit": "s"})


def test_fit_exponent_recovers_a_power_law():
    xs = [1_000, 4_000, 16_000]
    assert fit_exponent(xs, [2e-3 * x for x in xs]) == pytest.approx(1.0)
    assert fit_exponent(xs, [5.0 * x**0.5 for x in xs]) == pytest.approx(0.5)
