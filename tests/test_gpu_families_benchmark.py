"""`benchmarks/gpu_families.py --fp32-reference` on the CPU: in fp32 every path reproduces the reference's logits
on its token path (the forced steps line up), and in bf16 hae `full` stays as close to fp32 as HF's own bf16 path
while eviction does not."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ARGS = ["--model", "qwen2_5_vl_7b", "--tiny", "--device", "cpu", "--fp32-reference", "--hae-compiler", "eager",
        "--batch", "2", "--new-tokens", "6", "--initializer-range", "0.2"]


@pytest.fixture(scope="module")
def gpu_families():
    spec = importlib.util.spec_from_file_location("gpu_families", BENCHMARKS / "gpu_families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(gpu_families, monkeypatch, tmp_path: Path, *extra: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["gpu_families.py", *ARGS, *extra, "--out", str(tmp_path)])
    gpu_families.main()
    (path,) = tmp_path.glob("*_vs_fp32.json")
    return json.loads(path.read_text())


def test_in_float32_every_path_reproduces_the_reference(gpu_families, monkeypatch, tmp_path):
    result = _run(gpu_families, monkeypatch, tmp_path, "--dtype", "float32", "--configs", "full")
    assert result["hf_error"]["max_abs"] == 0.0
    assert result["full"]["error"]["max_abs"] < 1e-4


def test_in_bfloat16_full_is_as_close_to_float32_as_hf(gpu_families, monkeypatch, tmp_path):
    result = _run(gpu_families, monkeypatch, tmp_path, "--dtype", "bfloat16", "--configs", "full", "streaming_half")
    assert result["hf_error"]["max_abs"] > 0.01  # bf16 rounding is visible: the comparison is not vacuous
    assert result["full"]["max_abs_vs_hf"] < 2.0
    assert result["streaming_half"]["error"]["max_abs"] > 5 * result["full"]["error"]["max_abs"]
