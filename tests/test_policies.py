"""Facts every registered policy must satisfy, checked over `hae_fx.policies.available()`: a new policy file is
covered here without touching this module."""

import dataclasses

import pytest
import torch

import hae_fx
from hae_fx.policies import available, config_class, sweep_config
from hae_fx.policies.base import Policy
from tests.conftest import llava_inputs
from tests.policy_oracle import model_for

#: for the exactness check, where a policy has them: DAP's thresholds off and PyramidKV's pyramid flat (both evict
#: whatever the capacity)
ROOM_FOR_EVERY_TOKEN = {"r": 0.0, "alpha": 0.0, "beta": 1}


def config_of(policy: str, **fields):
    """`policy`'s config with those of `fields` it has (and a recycle bin of 4 where it has one)."""
    return sweep_config(policy, bin_size=4, **fields)


@pytest.mark.parametrize("policy", available())
def test_capacity_for_every_token_reproduces_full(policy):
    seed, new_tokens = 21, 30
    inputs = llava_inputs(model_for(seed), 2, seed=seed)
    capacity = inputs["input_ids"].shape[1] + new_tokens + 16  # room to spare for policies that keep a bin
    full = hae_fx.transform(model_for(seed), hae_fx.HAEConfig(policy="full", capacity=capacity),
                            options={"hae.compiler": "eager"})
    config = config_of(policy, capacity=capacity, sinks=2, window=4, **ROOM_FOR_EVERY_TOKEN)
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
    expected = full.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    assert out.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-5, rtol=1e-5)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    seen = [n + new_tokens - 1 for n in lengths]
    assert hae_fx.cache.kept_positions(out.past_key_values) == [list(range(n)) for n in seen]
    assert not arg_reductions(model), policy


def arg_reductions(model) -> set[str]:
    """The arg-reductions in `model`'s compiled graphs. Slot choices are min-reductions over indices
    (`hae_fx.policies.base.first_index`): on an H200 with torch 2.11, Inductor compiled
    `(slot_pos < 0).to(torch.int8).argmax(-1)` (the first free slot) into a kernel that chose an occupied slot, so a
    decode step overwrote a prompt token (docs/gpu.md, "Resolved: ...")."""
    return {name for records in model.hae_graphs.values() for record in records for name in record.op_counts
            if name.rsplit(".", 1)[-1].split("_")[0] in ("argmax", "argmin")}


#: policies whose Inductor graphs other tests check already (test_generate_full, test_streaming, test_hae)
INDUCTOR_TESTED_ELSEWHERE = {"full", "streaming", "hae"}


def test_every_policy_compiles_with_inductor_without_graph_breaks_into_one_decode_graph(dynamo_counters):
    """One test over every policy (Inductor compiles take tens of seconds each)."""
    inputs = llava_inputs(model_for(22), 2, seed=22)
    for policy in sorted(set(available()) - INDUCTOR_TESTED_ELSEWHERE):
        dynamo_counters.clear()
        config = config_of(policy, capacity=20, sinks=2, window=4)
        model = hae_fx.transform(model_for(22), config)
        model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert dynamo_counters["graph_break"] == {}, policy
        assert dynamo_counters["stats"]["unique_graphs"] == 2, policy  # one prefill graph, one decode graph
        assert len(model.hae_graphs["decode"]) == 1, policy


def test_every_policy_has_a_frozen_config_of_its_own():
    for policy in available():
        config = config_class(policy)()
        assert config.policy == policy
        assert hae_fx.HAEConfig(policy=policy) == config  # the short form
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.capacity = 1
        assert issubclass(hae_fx.policies.get_policy(policy), Policy)
