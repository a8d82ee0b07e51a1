"""Bad input for the `hae` policy fails early, with an error naming the field, its allowed range and the fix."""

import math

import pytest
import torch

import hae_fx
from hae_fx import HAEConfig, HAEConfigError, HAESiteError
from hae_fx.modality import TEXT, VISUAL
from hae_fx.models.llava import tiny_llava


@pytest.mark.parametrize("dap_layer", [2, 5])
def test_dap_layer_beyond_the_depth_is_refused_before_anything_is_installed(dap_layer):
    model = tiny_llava()  # 2 text layers: valid dap_layer values are 0 and 1
    assert model.config.text_config.num_hidden_layers == 2
    with pytest.raises(HAEConfigError, match=rf"HAEConfig.dap_layer={dap_layer} is beyond the model's depth: its text "
                                             r"decoder has 2 layers \(0\.\.1\); choose a dap_layer in that range"):
        hae_fx.transform(model, HAEConfig(policy="hae", dap_layer=dap_layer))
    assert not hasattr(model, "hae_graphs")
    assert getattr(model, "hae_config", None) is None
    assert "forward" not in vars(model) and "generate" not in vars(model)  # still the class's own methods
    assert "forward" not in vars(model.model.language_model)
    # nothing half-installed: the same model can still be transformed with a valid layer
    hae_fx.transform(model, HAEConfig(policy="hae", dap_layer=1))
    assert model.hae_graphs == {"prefill": [], "decode": [], "chunk": []}


@pytest.mark.parametrize("field", ["r", "alpha"])
@pytest.mark.parametrize("value, message", [
    (-0.1, r"must lie in \[0, 1\], got -0.1$"),
    (1.5, r"must lie in \[0, 1\], got 1.5$"),
    (-1, r"must lie in \[0, 1\], got -1$"),
    (math.nan, r"must lie in \[0, 1\], got nan$"),
    ("0.1", r"must be a number, got str '0.1'$"),
    (None, r"must be a number, got NoneType None$"),
    (True, r"must be a number, got bool True$"),
])
def test_thresholds_must_be_numbers_in_the_unit_interval(field, value, message):
    with pytest.raises(HAEConfigError, match=rf"^HAEConfig\.{field} {message}"):
        HAEConfig(policy="hae", **{field: value})


@pytest.mark.parametrize("field", ["r", "alpha"])
@pytest.mark.parametrize("value", [0, 0.0, 0.5, 1, 1.0])
def test_thresholds_accept_the_closed_interval(field, value):
    assert getattr(HAEConfig(policy="hae", **{field: value}), field) == value


@pytest.mark.parametrize("value, message", [
    (1.0, r"must lie in \[0, 1\), got 1.0$"),
    (1, r"must lie in \[0, 1\), got 1$"),
    (-0.01, r"must lie in \[0, 1\), got -0.01$"),
    ("0", r"must be a number, got str '0'$"),
])
def test_decay_must_lie_in_the_half_open_interval(value, message):
    with pytest.raises(HAEConfigError, match=rf"^HAEConfig\.decay {message}"):
        HAEConfig(policy="hae", decay=value)
    assert HAEConfig(policy="hae", decay=0.99).decay == 0.99


def test_bin_larger_than_the_budget_is_refused_and_the_suggested_capacity_works():
    with pytest.raises(HAEConfigError, match=r"HAEConfig.bin_size=30 is larger than the budget capacity - bin_size = "
                                             r"10; .*lower bin_size or raise capacity to at least 60"):
        HAEConfig(policy="hae", capacity=40, bin_size=30)
    assert HAEConfig(policy="hae", capacity=60, bin_size=30).budget == 30
    HAEConfig(policy="hae", capacity=40, bin_size=20, sinks=2, window=4)  # bin == budget is allowed


def test_budget_below_sinks_window_and_one_is_refused_and_the_suggested_capacity_works():
    # bin 20 fits the budget of 20, but the budget must hold sinks + window + 1 = 4 + 16 + 1 = 21
    with pytest.raises(HAEConfigError, match=r"HAEConfig.capacity=40 leaves a budget of capacity - bin_size = 20 "
                                             r"active tokens, below sinks \+ window \+ 1 = 21; raise capacity to at "
                                             r"least 41 or lower sinks, window or bin_size"):
        HAEConfig(policy="hae", capacity=40, bin_size=20, sinks=4, window=16)
    assert HAEConfig(policy="hae", capacity=41, bin_size=20, sinks=4, window=16).budget == 21
    HAEConfig(policy="hae", capacity=40, bin_size=20, sinks=3, window=16)  # or fewer sinks


@pytest.mark.parametrize("field, value, message", [
    ("score_source", "nope", r"HAEConfig.score_source must be one of \('layers_mean', 'dap_layer'\), got 'nope'"),
    ("max_visual_keep", -1, r"HAEConfig.max_visual_keep must be >= 0, got -1"),
    ("max_visual_keep", 2.0, r"HAEConfig.max_visual_keep must be an int, got float 2.0"),
    ("prune_hidden", "yes", r"HAEConfig.prune_hidden must be True or False, got 'yes'"),
    ("prune_hidden", 1, r"HAEConfig.prune_hidden must be True or False, got 1"),
    ("dap_layer", -1, r"HAEConfig.dap_layer must be >= 0, got -1"),
    ("visual_first", -0.5, r"HAEConfig.visual_first must be a finite number >= 0, got -0.5"),
    ("visual_first", float("nan"), r"HAEConfig.visual_first must be a finite number >= 0, got nan"),
    ("visual_first", float("inf"), r"HAEConfig.visual_first must be a finite number >= 0, got inf"),
    ("bin_size", 0, r"HAEConfig.bin_size must be >= 1, got 0"),
])
def test_other_hae_fields_are_checked(field, value, message):
    with pytest.raises(HAEConfigError, match=message):
        HAEConfig(policy="hae", **{field: value})


def test_the_valid_alternatives_of_those_fields_are_accepted():
    config = HAEConfig(policy="hae", score_source="dap_layer", max_visual_keep=0, prune_hidden=True, visual_first=0)
    assert (config.score_source, config.max_visual_keep, config.prune_hidden) == ("dap_layer", 0, True)


def _prefill_plan_arguments(query):
    """Arguments of `hae::prefill_plan_` under `hae` for one sequence of 6 tokens (positions 0..5, tokens 1..3
    visual), 8 slots."""
    batch, kv_heads, length, head_dim, capacity = 1, 2, 6, 4, 8
    generator = torch.Generator().manual_seed(0)
    key = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    config = HAEConfig(policy="hae", capacity=capacity, bin_size=2, sinks=1, window=1, r=0.0, alpha=0.0)
    return dict(
        queries=[query], keys=[key], values=[torch.randn_like(key)], scales=[head_dim ** -0.5], windows=[0],
        chunks=[0], masks=[None],
        token_pos=torch.arange(length).unsqueeze(0),
        token_modality=torch.tensor([[TEXT, VISUAL, VISUAL, VISUAL, TEXT, TEXT]], dtype=torch.int8),
        slot_pos=torch.full((batch, capacity), -1, dtype=torch.int64), score=torch.zeros(batch, capacity),
        modality=torch.zeros(batch, capacity, dtype=torch.int8), seen=torch.zeros(batch, dtype=torch.int64),
        prefill_keep=torch.zeros(batch, capacity, dtype=torch.int64),
        extras=[torch.zeros(batch, capacity, dtype=torch.int8)], kept=torch.empty(0, length), config=config.key(),
    )


def test_prefill_plan_run_eagerly_without_its_query_says_to_go_through_transform():
    arguments = _prefill_plan_arguments(query=None)
    with pytest.raises(HAESiteError, match=r"hae::prefill_plan_ has no query: the hae backend's plan pass supplies "
                                           r"the attention queries .* Run the model through hae_fx\.transform"):
        torch.ops.hae.prefill_plan_(**arguments)
    assert bool((arguments["slot_pos"] == -1).all()), "the op must fail before writing any slot metadata"

    # with a query the same call plans: zero thresholds keep every token
    query = torch.randn(1, 4, 6, 4, generator=torch.Generator().manual_seed(1))
    arguments = _prefill_plan_arguments(query=query)
    torch.ops.hae.prefill_plan_(**arguments)
    assert arguments["slot_pos"][0, :6].tolist() == list(range(6))
    assert arguments["seen"].tolist() == [6]
