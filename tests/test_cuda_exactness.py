"""`benchmarks/cuda_exactness.py`: its cache-state comparison reports what differs where, and on the CPU (where the
Inductor path is exact) it runs end to end and finds the Inductor path's logits and cache equal to the references."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import benchmark_script


@pytest.fixture(scope="module")
def exactness():
    with benchmark_script("cuda_exactness") as module:
        yield module


def _state(positions: list[list[list[int]]], seed: int = 0) -> dict:
    """A cache state of `len(positions)` layers; each slot's K/V rows are a function of its position, so states
    holding the same positions in other slots hold the same rows."""
    layers = []
    for layer, rows in enumerate(positions):
        pos = torch.tensor(rows)
        generator = torch.Generator().manual_seed(seed + layer)
        table = torch.randn(2, 2, 16, 4, generator=generator)  # per row and head, a K row for each position
        keys = torch.stack([table[row][:, pos[row].clamp_min(0)] for row in range(pos.shape[0])])
        layers.append({"positions": pos, "keys": keys, "values": keys * 2})
    return {"layers": layers, "seen": torch.tensor([4, 4]), "tokens": torch.tensor([[5, 8], [6, 8]]),
            "step_slot": [torch.tensor([3, 3])]}


REFERENCE = [[[0, 1, 2, 3, -1], [0, 1, 2, 3, -1]], [[0, 1, 2, 3, -1], [0, 1, 2, 3, -1]]]


def _found(exactness, state: dict) -> list[tuple]:
    divergences, _ = exactness.compare_states(_state(REFERENCE), state, tolerance=1e-4)
    return [(d["layer"], d["row"], d["kind"], d["positions"]) for d in divergences]


def test_the_same_positions_in_other_slots_agree(exactness):
    assert _found(exactness, _state([[[3, 2, 1, 0, -1], [-1, 0, 1, 2, 3]], REFERENCE[1]])) == []


def test_a_missing_position(exactness):
    assert _found(exactness, _state([REFERENCE[0], [[0, 1, 2, 3, -1], [0, 1, 2, -1, -1]]])) == [(1, 1, "missing", [3])]


def test_a_duplicated_position(exactness):
    assert _found(exactness, _state([[[0, 1, 2, 3, 2], [0, 1, 2, 3, -1]], REFERENCE[1]])) == [
        (0, 0, "duplicated", [2])]


def test_an_overwritten_position(exactness):
    assert _found(exactness, _state([REFERENCE[0], [[0, 4, 2, 3, -1], [0, 1, 2, 3, -1]]])) == [
        (1, 0, "missing", [1]), (1, 0, "extra", [4])]


def test_a_changed_key_row_and_the_report_order(exactness):
    state = _state([REFERENCE[0], [[0, 1, 2, 3, -1], [0, 1, 2, -1, -1]]])
    state["layers"][0]["keys"][1, :, 2] += 0.01  # row 1's position 2, both heads
    state["tokens"] = torch.tensor([[5, 8], [6, 9]])  # the last token is an output, not fed to any step: no report
    assert _found(exactness, state) == [(0, 1, "keys", [2]), (1, 1, "missing", [3])]
    state["tokens"] = torch.tensor([[5, 8], [7, 9]])  # row 1's first decode step was fed another token
    assert _found(exactness, state)[0] == (None, 1, "tokens", [])


def test_placement_names_the_slot_a_step_wrote(exactness):
    before, after = _state(REFERENCE), _state([[[0, 5, 2, 3, -1], [0, 1, 2, 3, 4]], REFERENCE[1]])
    assert exactness.placement(before, after)[0] == [["slot 1: position 1 -> 5"], ["slot 4: position -1 -> 4"]]
    assert exactness.placement(None, before)[1] == [["4 positions held"], ["4 positions held"]]


def test_on_the_cpu_the_inductor_path_equals_the_references(exactness, tmp_path, capsys):
    out = tmp_path / "llava.json"
    exactness.main(["--model", "llava7b", "--tiny", "--device", "cpu", "--paths", "hae_inductor", "--new-tokens", "4",
                    "--out", str(out)])
    result = json.loads(out.read_text())
    assert list(result["paths"]) == ["hf", "hae_eager", "hae_inductor"]
    prompt = result["prompt"]
    for name in ("hae_eager", "hae_inductor"):
        per_n = result["paths"][name]["per_n"]
        assert [len(entry["max_abs_dlogit"]) for entry in per_n] == [1, 2, 3, 4]
        assert max(max(entry["max_abs_dlogit"]) for entry in per_n) < 1e-4, name
        # full capacity: the prefill holds the prompt, then decode step k writes position prompt + k - 1 into the
        # first free slot, in every layer and row
        assert per_n[0]["placement"] == [[[f"{prompt} positions held"]] * 2] * 2
        for entry in per_n[1:]:
            new = prompt + entry["n"] - 2
            assert entry["placement"] == [[[f"slot {new}: position -1 -> {new}"]] * 2] * 2, entry["placement"]
    inductor = result["paths"]["hae_inductor"]
    assert inductor["first_divergence_from_hae_eager"] is None
    assert all(entry["divergences"] == [] for entry in inductor["per_n"])
    assert all(gap["max_abs_dk"] < 1e-4 for entry in inductor["per_n"] for gap in entry["cache_gaps"])
    assert "cache state equals hae_eager's after every step" in capsys.readouterr().out


def test_a_compiled_step_that_overwrites_a_kept_token_is_reported(exactness, tmp_path, monkeypatch, capsys):
    """Fault injection: the Inductor path's decode steps take slot 0 (position 0) instead of the first free slot;
    the report names the first step, the lost position and the slot that step wrote."""
    from hae_fx.policies import base

    run_path = exactness.run_path

    def faulty(name, *args):
        with monkeypatch.context() as patch:
            if name == "hae_inductor":  # read when the decode graph is traced, inside this generate
                patch.setattr(base, "first_free_slot", lambda slot_pos: torch.zeros_like(slot_pos[..., 0]))
            return run_path(name, *args)

    monkeypatch.setattr(exactness, "run_path", faulty)
    out = tmp_path / "faulty.json"
    exactness.main(["--model", "llava7b", "--tiny", "--device", "cpu", "--paths", "hae_inductor", "--new-tokens", "2",
                    "--out", str(out)])
    first = json.loads(out.read_text())["paths"]["hae_inductor"]["first_divergence_from_hae_eager"]
    assert (first["n"], first["layer"], first["row"], first["kind"], first["positions"]) == (2, 0, 0, "missing", [0])
    printed = capsys.readouterr().out
    assert "after decode step 1 (n=2): layer 0 row 0 missing at positions [0]" in printed
    assert "what it wrote at layer 0 row 0: ['slot 0: position 0 -> 81']; hae_eager: ['slot 81: position -1 -> 81']" \
        in printed
