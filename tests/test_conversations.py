"""Conversations: prompts of any length on one prefill graph, and follow-up turns on the returned, evicted cache.

A follow-up is `generate(input_ids=history + new turn, past_key_values=returned_cache)`, as a chat UI calls it. At full
capacity the tokens must be HF's (HF continues on its own cache); under eviction the kept sets after every generated
token, the tokens and the logits must be the independent oracles' (tests/policy_oracle.py, tests/hae_oracle.py), whose
follow-up feeds the turn one decode step per token (as hae_fx does for evicting policies; at full capacity it runs the
turn as one chunk).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.cache import kept_positions
from hae_fx.errors import HAECapacityError
from hae_fx.models.llava import llava_prompt, tiny_llava
from hae_fx.policies.h2o import H2OConfig
from hae_fx.policies.streaming import StreamingConfig
from tests.conftest import llava_inputs
from tests.hae_oracle import oracle_fields, run_hae_oracle
from tests.policy_oracle import lowest, model_for, run_rule, unprotected

#: follow-up turns: (new token ids, tokens to generate)
TURNS = (([7, 21, 33, 45, 9], 6), ([88, 12, 150], 7))
FIRST_TURN_TOKENS = 8


class RecordKept(LogitsProcessor):
    """Records the cache's kept positions (sequence 0) whenever generate scores a token."""

    def __init__(self, cache):
        self.cache, self.kept = cache, []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_positions(self.cache)[0])
        return scores


def converse(model, inputs, *, cache=None, record=None, turns=TURNS, first=FIRST_TURN_TOKENS):
    """Three turns through `model.generate`, each continuing the previous turn's cache. Returns the sequences after
    each turn, the logits of every generated token, and the cache of each turn."""
    kwargs = {} if record is None else {"logits_processor": LogitsProcessorList([record])}
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=first, min_new_tokens=first,
                         do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    sequences, logits, caches = [out.sequences], list(out.logits), [out.past_key_values]
    for turn_ids, new_tokens in turns:
        batch = out.sequences.shape[0]
        history = torch.cat([out.sequences, torch.tensor([turn_ids] * batch)], dim=1)
        turn_inputs = {"input_ids": history}
        if "attention_mask" in inputs:
            grown = history.shape[1] - inputs["attention_mask"].shape[1]
            turn_inputs["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones(batch, grown, dtype=inputs["attention_mask"].dtype)], dim=1)
        out = model.generate(**turn_inputs, past_key_values=out.past_key_values, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
        sequences.append(out.sequences)
        logits += list(out.logits)
        caches.append(out.past_key_values)
    return sequences, torch.stack(logits, dim=1), caches


def no_eos(model):
    model.generation_config.eos_token_id = None
    return model


# ------------------------------------------------------------------------------------------------ full capacity


@pytest.mark.parametrize("batch", [1, 2])
def test_three_turn_conversation_at_full_capacity_matches_hf(batch):
    reference = no_eos(tiny_llava(seed=5))
    model = no_eos(tiny_llava(seed=5))
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=96), options={"hae.compiler": "eager"})
    inputs = llava_inputs(reference, batch, seed=5)
    expected, expected_logits, _ = converse(reference, inputs)
    got, logits, caches = converse(model, inputs)
    for turn, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
        assert ours.tolist() == theirs.tolist(), f"turn {turn}"
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert all(cache is caches[0] for cache in caches), "every turn continues the first turn's cache"
    assert len(model.hae_graphs["chunk"]) == 1, "both follow-ups (6 and 4 tokens) run as chunks of one graph"


def test_follow_up_with_a_new_image_is_refused():
    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=96),
                             options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 1)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    image_turn = torch.tensor([llava_prompt(model.config, prefix=[5], suffix=[6])])
    with pytest.raises(HAECapacityError, match="follow-up turn on an HAECache can only add text"):
        model.generate(input_ids=torch.cat([out.sequences, image_turn], dim=1), pixel_values=inputs["pixel_values"],
                       past_key_values=out.past_key_values, max_new_tokens=2, do_sample=False)


def test_follow_up_padded_inside_the_turn_is_refused():
    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=96),
                             options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2)
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    history = torch.cat([out.sequences, torch.tensor([[0, 5], [6, 7]])], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long), torch.tensor([[0, 1], [1, 1]])],
                     dim=1)
    with pytest.raises(HAECapacityError, match="follow-up turn on an HAECache must be real tokens in every row"):
        model.generate(input_ids=history, attention_mask=mask, past_key_values=out.past_key_values, max_new_tokens=2,
                       do_sample=False)


# ------------------------------------------------------------------------------------------------ evicting policies


def _unpadded(model, seed):
    inputs = llava_inputs(model, 1, seed=seed)
    inputs.pop("attention_mask")
    return inputs


def _check_turns_against(config, seed, oracle_run):
    """hae_fx (eager-reference path) over three turns against the oracle's run: kept sets after every generated
    token, tokens, logits; memory fixed."""
    model = hae_fx.transform(no_eos(model_for(seed)), config, options={"hae.compiler": "eager"})
    inputs = _unpadded(model, seed)
    recorder = RecordKept(hae_fx.HAECache.for_model(model, config, batch=1))
    nbytes = recorder.cache.nbytes
    sequences, logits, caches = converse(model, inputs, cache=recorder.cache, record=recorder)
    oracle = oracle_run(no_eos(model_for(seed, attn_implementation="eager")), inputs)

    prompt_len = inputs["input_ids"].shape[1]
    generated = []
    start = prompt_len
    for sequence, (turn_ids, _) in zip(sequences, (([], FIRST_TURN_TOKENS), *TURNS), strict=True):
        start += len(turn_ids)
        generated += sequence[0, start:].tolist()
        start = sequence.shape[1]
    assert generated == oracle.tokens
    assert recorder.kept == oracle.kept
    assert max(map(len, oracle.kept)) == config.capacity, "the cache must fill up and evict"
    assert set(oracle.kept[FIRST_TURN_TOKENS - 1]) - set(oracle.kept[-1]), "follow-up turns must evict"
    torch.testing.assert_close(logits[0], oracle.logits, atol=1e-4, rtol=1e-4)
    assert all(cache.nbytes == nbytes for cache in caches), "memory is fixed across turns"
    assert model.hae_graphs["chunk"] == [], "an evicting policy takes a follow-up token by token"
    return oracle


class StreamingRule:
    """StreamingLLM: the first `sinks` positions and the most recent others."""

    def __init__(self, config):
        self.config = config

    def prefill(self, attention, visual, capacity):
        seen, sinks = len(visual), self.config.sinks
        kept = list(range(min(sinks, seen))) + list(range(max(sinks, seen - (capacity - sinks)), seen))
        return dict.fromkeys(kept, 0.0)

    def victim(self, scores, seen):
        return min(j for j in scores if j >= self.config.sinks)

    def attended(self, scores, row):
        pass


class H2ORule:
    """H2O: attention received from every query so far (averaged over heads and layers), sinks and a recent window
    protected."""

    def __init__(self, config):
        self.config = config

    def prefill(self, attention, visual, capacity):
        seen, config = len(visual), self.config
        received = sum(layer.sum(dim=0) for layer in attention) / len(attention)
        scores = {j: float(received[j]) for j in range(seen)}
        protected = [j for j in range(seen) if j < config.sinks or j >= seen - config.window]
        heavy = sorted(set(range(seen)) - set(protected), key=lambda j: (-scores[j], j))
        return {j: scores[j] for j in sorted(protected + heavy[:capacity - len(protected)])}

    def victim(self, scores, seen):
        return lowest(scores, unprotected(scores, seen, self.config.sinks, self.config.window))

    def attended(self, scores, row):
        for j in scores:
            scores[j] += row[j]


@pytest.mark.parametrize("config, rule", [
    (StreamingConfig(capacity=20, sinks=2, window=4), StreamingRule),
    (H2OConfig(capacity=20, sinks=1, window=3), H2ORule),
], ids=["streaming", "h2o"])
def test_evicting_policy_over_three_turns_matches_oracle(config, rule):
    def oracle_run(reference, inputs):
        return run_rule(reference, inputs, rule(config), capacity=config.capacity, new_tokens=FIRST_TURN_TOKENS,
                        turns=TURNS)

    _check_turns_against(config, seed=12, oracle_run=oracle_run)


def test_hae_over_three_turns_matches_oracle():
    """DAP prunes the first prompt's image; DDES places every follow-up token (binning and freeing as at decode)."""
    config = hae_fx.HAEConfig(policy="hae", capacity=24, bin_size=4, sinks=2, window=4, dap_layer=1, r=0.04,
                              alpha=0.1)
    fields = oracle_fields(config)

    def oracle_run(reference, inputs):
        return run_hae_oracle(reference, inputs, new_tokens=FIRST_TURN_TOKENS, turns=TURNS, **fields)

    oracle = _check_turns_against(config, seed=1, oracle_run=oracle_run)
    assert oracle.dap_evicted, "DAP must prune some visual tokens for this test to mean anything"
    assert any(oracle.binned), "follow-up tokens must push tokens through the bin"


# ------------------------------------------------------------------------------------------------ one prefill graph


def test_twenty_prompt_lengths_and_a_follow_up_compile_nothing_after_warm_up(dynamo_counters, caplog):
    """Inductor: one prefill, one decode and one chunk graph serve prompts of 20 new lengths and a follow-up turn of
    another length than the warm-up's, with HF's tokens at full capacity; each compile is announced on the hae_fx
    logger."""
    reference = no_eos(tiny_llava(seed=2))
    model = no_eos(tiny_llava(seed=2))
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=96))
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def prompt(length: int) -> dict[str, torch.Tensor]:
        base = llava_prompt(model.config, prefix=[1, 4], suffix=[])
        return {"input_ids": torch.tensor([base + [3 + (7 * i) % 190 for i in range(length - len(base))]]),
                "pixel_values": pixel_values}

    with caplog.at_level(logging.INFO, logger="hae_fx"):
        # warm-up: compiles prefill and decode, then the follow-up chunk
        warm = model.generate(**prompt(30), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        model.generate(input_ids=torch.cat([warm.sequences, torch.tensor([[5, 6, 7, 8, 9, 10]])], dim=1),
                       past_key_values=warm.past_key_values, max_new_tokens=2, do_sample=False)
    assert any("compiling the prefill graph" in r.message for r in caplog.records)
    assert any("prefill graph compiled in" in r.message for r in caplog.records)
    dynamo_counters.clear()
    lengths = [19, 20, 22, 23, 25, 26, 27, 29, 31, 33, 36, 38, 41, 44, 47, 50, 54, 58, 63, 70]
    for length in lengths:
        inputs = prompt(length)
        expected = reference.generate(**inputs, max_new_tokens=3, do_sample=False)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert out.sequences.tolist() == expected.tolist(), f"prompt of {length} tokens"
    follow_up = {"input_ids": torch.cat([out.sequences, torch.tensor([[9, 8, 7, 6]])], dim=1)}
    expected_follow_up = reference.generate(
        **follow_up, past_key_values=reference.generate(**inputs, max_new_tokens=3, do_sample=False,
                                                        return_dict_in_generate=True).past_key_values,
        max_new_tokens=4, do_sample=False)
    got = model.generate(**follow_up, past_key_values=out.past_key_values, max_new_tokens=4, do_sample=False)
    assert got.tolist() == expected_follow_up.tolist()
    assert dynamo_counters["stats"]["unique_graphs"] == 0, dict(dynamo_counters["stats"])
    assert {phase: len(records) for phase, records in model.hae_graphs.items()} == {"prefill": 1, "decode": 1,
                                                                                     "chunk": 1}
