"""`benchmarks/accuracy.py --quick` runs end to end on the shipped SynthVLM and writes what it promises.

The sweep itself is the measurement (docs/benchmarks.md); this checks its bookkeeping: every registered policy
appears (policies with a `prune_hidden` field in both modes) at every budget, budgets become the KV fractions reported,
the files are written, conversations are scored per turn, at 100% every policy answers like the full cache, and the
statistics (inert kinds, the paired bootstrap) mean what the report says.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hae_fx.models.synthvlm import data
from hae_fx.models.synthvlm.scenes import cells_named
from hae_fx.policies import available, get_policy
from tests.conftest import needs_gemma

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_variants_cover_every_policy(accuracy_module) -> None:
    names = [v.name for v in accuracy_module.variants()]
    for policy in available():
        assert policy in names
        assert (f"{policy}_prune" in names) == ("prune_hidden" in accuracy_module.config_fields(policy))


def test_kv_dtype_adds_a_quantized_row_per_variant(accuracy_module) -> None:
    plain = accuracy_module.variants()
    quantized = [v for v in accuracy_module.variants(["int8"]) if v.kv_dtype]
    assert [v.name for v in quantized] == [f"{v.name}+int8" for v in plain]
    for variant in quantized:
        assert accuracy_module.config_for(variant, 95).kv_dtype == "int8"
    assert all(accuracy_module.config_for(v, 95).kv_dtype is None for v in plain)


def test_config_rule_is_valid_at_every_budget(accuracy_module) -> None:
    for variant in accuracy_module.variants():
        for capacity in (16, 24, 33, 95, 140, 237):
            config = accuracy_module.config_for(variant, capacity)
            assert config.capacity == capacity and getattr(config, "prune_hidden", False) == variant.prune_hidden


def test_ablate_adds_hae_taken_apart(accuracy_module) -> None:
    args, _ = accuracy_module.parse_args(["--policies", "hae", "--ablate"])
    chosen = {v.name: v for v in accuracy_module.selected_variants(args)}
    assert list(chosen) == ["hae", "dap_streaming", "streaming_ddes", "fastv_ddes", "hae_no_visual_first",
                            "hae_greedy_bin"]
    config_for, Variant = accuracy_module.config_for, accuracy_module.Variant
    for capacity in (16, 33, 95, 237):
        alone = {name: config_for(Variant(name), capacity) for name in ("hae", "streaming", "fastv")}
        halves = {"dap_streaming": ("hae", "streaming"), "streaming_ddes": ("streaming", "hae"),
                  "fastv_ddes": ("fastv", "hae")}
        for label, (prefill, decode) in halves.items():  # each half as that policy runs on its own
            config = config_for(chosen[label], capacity)
            assert (config.policy, config.capacity) == ("composed", capacity)
            assert (config.prefill, config.decode) == (alone[prefill], alone[decode]), label
            get_policy("composed")(config)  # ComposedConfig and the policy accept the pair
        assert config_for(chosen["fastv_ddes"], capacity).prefill.prune_hidden is False  # KV-only, like `fastv`
        assert config_for(chosen["hae_no_visual_first"], capacity) == dataclasses.replace(alone["hae"],
                                                                                       visual_first=0.0)
        assert config_for(chosen["hae_greedy_bin"], capacity) == dataclasses.replace(alone["hae"], bin_size=1)
        assert alone["hae"].bin_size == max(1, capacity // 8)


def test_asked_cell_kept_counts_the_cells_patches(accuracy_module) -> None:
    visual = list(range(1, 145))  # `<bos>`, then the image's 144 patches (12 x 12, row-major), then the question
    for index in range(12):
        example = data.example_for(data.HELD_OUT, index, ("locate", "colour_at", "shape_at")[index % 3])
        row, col = cells_named(example.question if "row" in example.question else example.answer)[0]
        cell = {1 + (3 * row + i) * 12 + 3 * col + j for i in range(3) for j in range(3)}  # a 4 x 4 grid: 3 x 3
        assert accuracy_module.asked_cell_kept(example, visual, set(visual)) == 1.0  # a full cache
        assert accuracy_module.asked_cell_kept(example, visual, set(visual) - cell) == 0.0
        top_row = {1 + 3 * row * 12 + 3 * col + j for j in range(3)}
        assert accuracy_module.asked_cell_kept(example, visual, set(visual) - top_row) == pytest.approx(2 / 3)
        assert accuracy_module.asked_cell_kept(example, visual, {min(cell), 0, 200}) == pytest.approx(1 / 9)
    for kind in ("count", "exists", "describe"):  # about the whole scene
        assert accuracy_module.asked_cell_kept(data.example_for(data.HELD_OUT, 0, kind), visual, set(visual)) is None


#: the sweep's variants the test runs (every one costs a transform per budget): the reference, the control, `hae` in
#: both forms and a per-layer-budget policy; every registered policy is checked to run in tests/test_policies.py
QUICK_VARIANTS = ("full", "streaming", "hae", "hae_prune", "pyramidkv")
#: the budgets the test runs: the full size (where nothing that matters may be evicted) and the quick sweep's smallest
TEST_BUDGETS = (1.0, 0.2)


def test_quick_sweep(accuracy_module, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        rows = accuracy_module.main(["--quick", "--questions", "12", "--conversations", "4", "--policies",
                                     ",".join(QUICK_VARIANTS), "--budgets", ",".join(map(str, TEST_BUDGETS)),
                                     "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    for name in ("accuracy.csv", "accuracy.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    with (tmp_path / "accuracy.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)

    expected = {(v.name, b) for v in accuracy_module.variants() if v.name in QUICK_VARIANTS
                for b in (TEST_BUDGETS if v.evicts else (1.0,))}
    assert {(r["policy"], float(r["budget"])) for r in table} == expected
    by_key = {(r["policy"], float(r["budget"])): r for r in table}
    full = by_key[("full", 1.0)]
    assert float(full["overall"]) >= 0.95
    assert all(float(full[turn]) >= 0.9 for turn in accuracy_module.TURN_KINDS), full  # follow-ups answered
    # a policy with per-layer budgets (PyramidKV) averages `capacity` over its layers: its smaller ones evict even at
    # full size
    layer_budgets = {v.name for v in accuracy_module.variants()
                     if get_policy(v.policy)(accuracy_module.config_for(v, 64)).layer_capacities([0, 1])}
    assert "Asked cell's patches kept (prefill / end)" in (tmp_path / "accuracy.md").read_text()
    for kind in accuracy_module.CELL_KINDS:
        assert float(full[f"{kind}_cell_kept_prefill"]) == float(full[f"{kind}_cell_kept_end"]) == 1.0
    for (name, budget), row in by_key.items():
        if name in layer_budgets:  # a layer larger than the question cannot fill its extra slots: they do not count
            assert float(row["kv_fraction"]) <= budget + 0.01
        else:
            assert float(row["kv_fraction"]) == pytest.approx(budget, abs=0.01)
        for kind in accuracy_module.CELL_KINDS:
            assert 0.0 <= float(row[f"{kind}_cell_kept_end"]) <= float(row[f"{kind}_cell_kept_prefill"]) <= 1.0
        assert 0.0 <= float(row["visual_kept_end"]) <= float(row["visual_kept_prefill"]) <= 1.0
        if name in layer_budgets:  # and its "visual kept" reads layer 0, its largest
            continue
        if budget == 1.0:
            assert row["overall"] == full["overall"], name  # nothing that matters is evicted at full size
        else:
            assert float(row["visual_kept_prefill"]) < 1.0  # a smaller cache really drops image tokens


def _row(module, name, budget, scores):
    return module.Row(name, budget, scores={kind: list(map(float, values)) for kind, values in scores.items()})


def test_inert_kinds_are_those_every_row_scores_alike(accuracy_module) -> None:
    rows = [_row(accuracy_module, "full", 1.0, {"count": [1, 1, 0], "locate": [1, 1, 1]}),
            _row(accuracy_module, "hae", 0.2, {"count": [1, 1, 0], "locate": [1, 0, 1]}),
            _row(accuracy_module, "streaming", 0.2, {"count": [1, 1, 0], "locate": [0, 0, 1]})]
    assert accuracy_module.inert_kinds(rows) == ["count"]
    assert accuracy_module.headline_kinds(rows) == ["locate"]
    # the same share correct on other questions is not inert: the scores differ question by question
    rows[1].scores["count"] = [0.0, 1.0, 1.0]
    assert accuracy_module.inert_kinds(rows) == []


def test_paired_bootstrap_interval(accuracy_module) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=200)
    better = np.where(rng.random(200) < 0.3, 1, base)  # right wherever base is, and on about 30% more
    a = _row(accuracy_module, "a", 0.5, {"locate": better, "describe": base})
    b = _row(accuracy_module, "b", 0.5, {"locate": base, "describe": base})
    diff, low, high = accuracy_module.paired_bootstrap(a, b, ["locate", "describe"])
    assert diff == pytest.approx((better.mean() - base.mean()) / 2)
    assert 0 < low < diff < high  # a real difference: the interval excludes 0
    assert accuracy_module.paired_bootstrap(b, b, ["locate"]) == (0.0, 0.0, 0.0)  # paired: no noise against itself
    # unpaired noise: two rows with the same share correct on different questions straddle 0
    shuffled = _row(accuracy_module, "c", 0.5, {"locate": rng.permutation(base)})
    _, low, high = accuracy_module.paired_bootstrap(shuffled, _row(accuracy_module, "d", 0.5, {"locate": base}),
                                                    ["locate"])
    assert low < 0 < high


def test_merge_reports_rows_written_by_separate_runs(accuracy_module, tmp_path: Path) -> None:
    import dataclasses
    import json

    def saved(name, rows, tuning=""):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "tuning": tuning}))
        return path

    def row(name, budget, locate, turn2):
        out = _row(accuracy_module, name, budget, {"locate": locate, "turn2": turn2, "count": [1, 1]})
        out.kv_bytes, out.full_kv_bytes = budget, 1.0
        return out

    hae = row("hae", 0.5, [1, 0], [1, 1])
    hae.cell_kept_prefill, hae.cell_kept_end = {"locate": [1.0, 0.5]}, {"locate": [0.5, 0.0]}
    first = saved("a", [row("full", 1.0, [1, 1], [1, 1]), hae], "tuning table\n\n")
    second = saved("b", [row("streaming", 0.5, [0, 0], [1, 0])])
    rows = accuracy_module.main(["--merge", f"{first},{second}", "--out", str(tmp_path / "out")])
    assert [r.variant for r in rows] == ["full", "hae", "streaming"]
    report = (tmp_path / "out" / "accuracy.md").read_text()
    assert "tuning table" in report
    assert "Inert kinds (every variant, every budget, the same per-question scores): count." in report
    assert "| hae vs streaming | 50% | hae 75.0 | streaming 25.0 | +50.0 |" in report
    assert "| hae | 50% | 75% / 25% |" in report and "| streaming | 50% |  |" in report  # merged without it
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 0


@needs_gemma
def test_gemma_vlm_sweep_asks_the_same_questions_of_the_real_lm(accuracy_module, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        rows = accuracy_module.main(["--model", "gemma-vlm", "--questions", "5", "--conversations", "2",
                                     "--policies", "full,streaming", "--budgets", "0.5", "--set", "full_windows=True",
                                     "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [(r.variant, r.budget) for r in rows] == [("full[full_windows=True]", 1.0),
                                                     ("streaming[full_windows=True]", 0.5)]
    assert rows[0].headline(list(rows[0].scores)) >= 0.9
    assert "gemma-vlm, 5 questions, 2 conversations" in (tmp_path / "accuracy.md").read_text()
    # whole windows: 15 of the 18 layers keep every token, the 3 global ones half of them
    assert rows[1].kv_bytes / rows[1].full_kv_bytes == pytest.approx((15 + 3 * 0.5) / 18, abs=0.01)


def test_kv_bytes_count_the_slots_a_question_can_fill(accuracy_module) -> None:
    """A ring longer than the question (`full_windows`) counts for the question's tokens; other layers in full."""
    import hae_fx
    from tests.families import GEMMA3_TEXT_WIDE

    model = GEMMA3_TEXT_WIDE.build()  # six sliding layers of window 20, one global layer
    config = hae_fx.HAEConfig(policy="streaming", capacity=8, sinks=1, window=2, full_windows=True)
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    per_slot = cache.kv_bytes_per_token / 7 / 2  # per sequence; every layer has the same K/V geometry
    assert accuracy_module.fillable_kv_bytes(cache, 12) == 12 * 6 * per_slot + 8 * per_slot
    assert accuracy_module.fillable_kv_bytes(cache, 30) == 20 * 6 * per_slot + 8 * per_slot
    assert accuracy_module.fillable_kv_bytes(cache, 30) == cache.kv_nbytes / 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name(accuracy_module, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no CUDA device"):
        accuracy_module.main(["--quick", "--device", "cuda", "--policies", "full", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--lm-pack is Gemma-VLM's"):
        accuracy_module.main(["--quick", "--lm-pack", "/nonexistent", "--policies", "full", "--out", str(tmp_path)])
