"""`benchmarks/export_gpu.py --quick --device cpu`: the package built in one process (`--stage export`) and loaded
and measured in another (`--stage measure`) generates the `transform()` path's tokens, greedy and sampled."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import BENCHMARKS


def test_export_and_measure_in_two_processes(tmp_path):
    out, package = tmp_path / "export.json", tmp_path / "model.pt2"
    common = [sys.executable, str(BENCHMARKS / "export_gpu.py"), "--quick", "--device", "cpu", "--batch", "2",
              "--new-tokens", "8", "--image-features", "--out", str(out), "--package", str(package)]
    for stage in ("export", "measure"):
        run = subprocess.run([*common, "--stage", stage], capture_output=True, text=True, timeout=900, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        if stage == "export":
            built = json.loads(out.read_text())
            assert package.stat().st_size == built["package_bytes"] and "tokens_equal" not in built
    measured = json.loads(out.read_text())
    assert measured["loaded_in"] == "a fresh process" and measured["export_s"] == built["export_s"]
    assert measured["tokens_equal"] and measured["sampled_tokens_equal"]
