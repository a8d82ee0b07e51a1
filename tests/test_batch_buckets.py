"""Batch buckets: every batch size runs padded to the next power of two, so after one warm-up per bucket a new batch
size compiles nothing, and the real rows' tokens are those of an unpadded run (HF's at full capacity)."""

from __future__ import annotations

import pytest
import torch

import hae_fx
from hae_fx.batch_buckets import bucket
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs
from tests.test_conversations import converse, no_eos

EAGER = {"hae.compiler": "eager"}


def test_buckets_are_powers_of_two():
    assert [bucket(b) for b in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]


@pytest.fixture(scope="module")
def full_models():
    """HF's LLaVA and its transformed twin at full capacity, the twin warmed up on the buckets 1, 2, 4 and 8."""
    reference = tiny_llava(seed=4)
    model = hae_fx.transform(tiny_llava(seed=4), hae_fx.HAEConfig(policy="full", capacity=64), options=EAGER)
    for batch in (1, 2, 3, 5):  # buckets 1, 2, 4, 8
        model.generate(**llava_inputs(model, batch, seed=batch), max_new_tokens=2, do_sample=False)
    return reference, model


def test_every_batch_size_after_warm_up_compiles_nothing_and_matches_hf(full_models, dynamo_counters):
    """Batches of 1 to 7 rows, after one warm-up per bucket: no new graph, and HF's tokens (EOS on: rows stop as
    alone; the rows of padding never keep generation going)."""
    reference, model = full_models
    graphs = {phase: len(records) for phase, records in model.hae_graphs.items()}
    for batch in range(1, 8):
        inputs = llava_inputs(reference, batch, seed=10 + batch)
        expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        assert out.sequences.tolist() == expected.tolist(), f"batch {batch}"
        assert out.past_key_values.batch == bucket(batch)
    assert dynamo_counters["stats"]["unique_graphs"] == 0, dict(dynamo_counters["stats"])
    assert {phase: len(records) for phase, records in model.hae_graphs.items()} == graphs


def test_per_step_outputs_drop_the_padding(full_models):
    reference, model = full_models
    inputs = llava_inputs(reference, 3, seed=3)
    expected = reference.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                  output_logits=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert [tuple(step.shape) for step in out.logits] == [tuple(step.shape) for step in expected.logits]
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)


def test_three_turns_of_a_padded_batch_match_hf():
    """Batch 3 runs as 4; every turn continues the bucket's cache and matches HF's own conversation."""
    reference = no_eos(tiny_llava(seed=5))
    model = hae_fx.transform(no_eos(tiny_llava(seed=5)), hae_fx.HAEConfig(policy="full", capacity=96), options=EAGER)
    inputs = llava_inputs(reference, 3, seed=5)
    expected, _, _ = converse(reference, inputs)
    got, _, caches = converse(model, inputs)
    assert [turn.tolist() for turn in got] == [turn.tolist() for turn in expected]
    assert caches[0].batch == 4 and all(cache is caches[0] for cache in caches)


def test_an_evicting_policy_padded_equals_unpadded():
    """`streaming` at batch 3: padded to 4 (the model's own cache) or run in a cache of exactly 3 rows, the same
    tokens and kept positions."""
    config = hae_fx.HAEConfig(policy="streaming", capacity=20, sinks=2, window=4)
    model = hae_fx.transform(no_eos(tiny_llava(seed=6)), config, options=EAGER)
    inputs = llava_inputs(model, 3, seed=6)
    exact = hae_fx.HAECache.for_model(model, config, batch=3)
    unpadded = model.generate(**inputs, past_key_values=exact, max_new_tokens=12, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.batch == 4
    assert out.sequences.tolist() == unpadded.tolist()
    assert hae_fx.cache.kept_positions(out.past_key_values)[:3] == hae_fx.cache.kept_positions(exact)
