"""`benchmarks/max_batch.py`: the line through two measured peaks picks the largest batch, and a run is sized for
the whole context but stops after a few steps, with hae's cache at the exact batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import BENCHMARKS, benchmark_script


@pytest.fixture(scope="module")
def max_batch():
    with benchmark_script("max_batch") as module:
        yield module


@pytest.mark.parametrize(("limit", "expected"), [(100.0, 43), (29.0, 8), (28.9, 7)])
def test_largest_batch_on_the_line_through_two_points(max_batch, limit, expected):
    points = [{"batch": 8, "peak_gib": 29.0}, {"batch": 4, "peak_gib": 21.0}]  # 13 GiB + 2 GiB per row
    assert max_batch.largest_batch(points, limit) == expected


def test_quick_run_stops_early_with_caches_sized_for_the_context(max_batch, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "max_batch.py"), "--device", "cpu", "--quick",
                          "--batches", "3", "5", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "max_batch_llava7b_128.json").read_text())
    points = {(p["config"], p["batch"]): p for p in summary["points"]}
    assert sorted(points) == [("hae50", 3), ("hae50", 5), ("hf_static", 3), ("hf_static", 5)]
    assert all(p["steps"] == max_batch.STEPS for p in points.values())
    assert points["hae50", 3]["capacity"] == 64 and points["hf_static", 3]["capacity"] == 128


def test_search_brackets_the_largest_batch(max_batch):
    """From the H200's case (105 ran out of memory, the measured points were 4 and 8): 99, then halving the gap;
    a run that fits steps up; adjacent bounds end the search."""
    assert max_batch.next_batch(8, 105, 0.05) == 99
    assert max_batch.next_batch(99, 105, 0.05) == 102
    assert max_batch.next_batch(102, 105, 0.05) == 103
    assert max_batch.next_batch(100, None, 0.05) == 105
    assert max_batch.next_batch(104, 105, 0.05) is None


def test_bracket_continues_one_configuration_only(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "max_batch.py"), "--configs", "hae50", "hf_static",
                          "--bracket", "100", "105", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2 and "--bracket RAN FAILED continues the search of one configuration" in run.stderr
