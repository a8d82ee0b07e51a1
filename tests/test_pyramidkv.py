"""`pyramidkv` against per-layer oracles written from PyramidKV's rule (SnapKV votes per layer, budgets in a linear
pyramid; algorithms.md §4): each layer's buffers hold its own budget, and its own attention chooses its tokens."""

import pytest

import hae_fx
from hae_fx import HAEConfigError
from hae_fx.policies.pyramidkv import PyramidKVConfig
from tests.policy_oracle import check_against_layer_rules
from tests.test_snapkv import SnapKVRule

CONFIG = PyramidKVConfig(capacity=14, sinks=1, window=4, kernel_size=3, beta=4)


def pyramid_capacities(capacity, window, beta, layers):
    """KVCache-Factory's PyramidKV budgets: min (C-w)//beta, max 2(C-w)-min, linear steps, plus the window."""
    low = (capacity - window) // beta
    high = 2 * (capacity - window) - low
    step = (high - low) // (layers - 1)
    return [high - layer * step + window for layer in range(layers)]


def test_pyramidkv_matches_per_layer_oracles_for_100_steps_on_a_padded_batch():
    capacities = pyramid_capacities(14, 4, 4, layers=2)
    assert capacities == [22, 6]  # the prompts (24-26 tokens) lose tokens in both layers at prefill
    runs = check_against_layer_rules(CONFIG, lambda layer: SnapKVRule(CONFIG), capacities, seed=14)
    for run in runs:
        assert [len(kept[0]) for kept in run.kept] == capacities
        assert run.kept[0][-1] != run.kept[1][-1]


def test_memory_shrinks_to_the_pyramid():
    """K/V bytes are those of the per-layer budgets (their sum: two layers at the average), not of the largest."""
    model = hae_fx.transform(hae_fx.models.llava.tiny_llava(), CONFIG, options={"hae.compiler": "eager"})
    pyramid = hae_fx.HAECache.for_model(model, CONFIG, batch=2)
    snapkv_config = hae_fx.HAEConfig(policy="snapkv", capacity=14, sinks=1, window=4)
    snapkv = hae_fx.HAECache.for_model(model, snapkv_config, batch=2)
    assert pyramid.kv_nbytes == snapkv.kv_nbytes
    assert [layer.keys.shape[2] for layer in pyramid.layers] == [22, 6]
    assert [group.core["slot_pos"].shape[1] for group in pyramid.slots.groups] == [22, 6]


def test_bad_beta_names_the_field():
    with pytest.raises(HAEConfigError, match=r"PyramidKVConfig.beta must be >= 1, got 0"):
        PyramidKVConfig(beta=0)
