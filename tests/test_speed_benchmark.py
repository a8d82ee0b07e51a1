"""`benchmarks/speed.py --device cpu --quick` runs end to end and writes what it promises: one row per
configuration, `full` with HF's static-cache tokens, eviction with the bytes it claims."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.conftest import BENCHMARKS, benchmark_script

BENCHMARK = BENCHMARKS / "speed.py"
CONFIGS = ["hf_static", "full", "full_hf_loop", "hae50", "streaming50"]


def test_quick_run_writes_table_csv_and_plot(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARK), "--device", "cpu", "--quick", "--batch", "2",
                          "--configs", *CONFIGS, "--policies", "h2o", "--capacity", "24",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| config | batch |" in run.stdout
    with open(tmp_path / "speed_tiny_llava.csv") as handle:
        rows = {row["config"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted([*CONFIGS, "h2o@24"])
    assert float(rows["full"]["token_agreement"]) == 1.0
    assert float(rows["full_hf_loop"]["token_agreement"]) == 1.0
    full_bytes = int(rows["full"]["kv_bytes"])
    assert int(rows["hae50"]["kv_bytes"]) == int(rows["streaming50"]["kv_bytes"]) < 0.55 * full_bytes
    assert int(rows["h2o@24"]["kv_bytes"]) < 0.5 * full_bytes
    for row in rows.values():
        assert float(row["decode_ms"]) > 0 and float(row["floor_ratio"]) > 0
    assert (tmp_path / "speed_tiny_llava.png").stat().st_size > 0
    assert (tmp_path / "speed_tiny_llava.json").exists()


def test_jobs_compile_together_and_are_timed_in_turn(tmp_path):
    """`--jobs 3`: three processes; their rows equal a serial run's in kind, and no two timed parts overlap."""
    run = subprocess.run([sys.executable, str(BENCHMARK), "--device", "cpu", "--quick", "--batch", "2",
                          "--configs", "hf_static", "full", "--policies", "h2o", "--capacity", "24", "--jobs", "3",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "speed_tiny_llava.json").read_text())
    rows = {row["config"]: row for row in saved["results"]}
    assert list(rows) == ["hf_static", "full", "h2o@24"] and saved["failures"] == {}
    assert rows["full"]["token_agreement"] == 1.0 and rows["h2o@24"]["kv_bytes"] < rows["full"]["kv_bytes"]
    spans = sorted(tuple(row["extra"]["timed_unix_s"]) for row in rows.values())
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans


def test_busy_share_is_the_union_of_kernel_spans():
    """Overlapping kernels (two streams) count once; gaps between them are idle."""
    with benchmark_script("speed") as speed:
        assert speed.busy_share(100.0, [(0.0, 10.0), (5.0, 20.0), (50.0, 60.0)]) == 0.3
        assert speed.busy_share(100.0, []) is None
