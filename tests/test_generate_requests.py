"""What a transformed model's `generate` refuses before any work, and the defects found by probing it: each request
hae_fx cannot serve exactly gets an `HAEError` naming what is supported instead, and nothing is compiled."""

import copy

import pytest
import torch

import hae_fx
from hae_fx import HAECapacityError, HAEConfig, HAEConfigError, HAEUnsupportedModelError
from tests.families import BY_NAME

EAGER = {"hae.compiler": "eager"}
LLAMA = BY_NAME["llama"]
STREAMING = HAEConfig(policy="streaming", capacity=12, sinks=2, window=3)


def _model(config=STREAMING):
    return hae_fx.transform(LLAMA.build(), config, options=EAGER)


def _prompt():
    return LLAMA.inputs(1)["input_ids"]  # 12 tokens


def _nothing_compiled(model):
    return model.hae_graphs == {"prefill": [], "decode": [], "chunk": []}


@pytest.mark.parametrize("options, message", [
    (dict(num_beams=2), r"greedily or by sampling .* this request is beam_search \(num_beams=2"),
    (dict(num_beams=2, do_sample=True), r"this request is beam_sample"),
    (dict(prompt_lookup_num_tokens=2), r"this request is assisted_generation .*prompt_lookup_num_tokens=2\)"),
    (dict(num_return_sequences=2, do_sample=True), r"num_return_sequences=2 is not supported: .*repeat the prompt"),
    (dict(output_attentions=True, return_dict_in_generate=True), r"output_attentions=True is not supported: .*"
                                                                 r"no attention weights; .*HAECache.score"),
    (dict(use_cache=False), r"use_cache=False is not supported"),
])
def test_generation_modes_hae_fx_cannot_serve_are_refused_before_any_work(options, message):
    model = _model()
    with pytest.raises(HAEConfigError, match=message):
        model.generate(_prompt(), max_new_tokens=3, **options)
    assert _nothing_compiled(model)


def test_assisted_generation_is_refused_before_any_work():
    model = _model()
    with pytest.raises(HAEConfigError, match=r"this request is assisted_generation .*assistant_model=set"):
        model.generate(_prompt(), max_new_tokens=3, assistant_model=LLAMA.build(), do_sample=False)
    assert _nothing_compiled(model)


@pytest.mark.parametrize("lengths, needed", [({}, 32), ({"max_length": 30}, 30)])
def test_full_checks_hf_default_and_max_length_up_front(lengths, needed):
    """transformers 5.23 leaves `max_length` None unless asked: without `max_new_tokens` HF generates 20 new tokens,
    with `max_length` up to that total."""
    model = _model(HAEConfig(policy="full", capacity=needed - 1))
    with pytest.raises(HAECapacityError, match=rf"capacity={needed - 1} < prompt \(12\) \+ max_new_tokens "
                                               rf"\({needed - 12}\) = {needed}"):
        model.generate(_prompt(), do_sample=False, **lengths)
    assert _nothing_compiled(model)

    reference = LLAMA.build()
    expected = reference.generate(_prompt(), do_sample=False, cache_implementation="static", **lengths)
    model = _model(HAEConfig(policy="full", capacity=needed))
    out = model.generate(_prompt(), do_sample=False, **lengths)
    assert out.shape[1] == needed and out.tolist() == expected.tolist()


def test_one_dimensional_input_ids_are_refused():
    with pytest.raises(HAEConfigError, match=r"the prompt must be \[batch, tokens\], got shape \(12,\); .*"
                                             r"unsqueeze\(0\)"):
        _model().generate(_prompt()[0], max_new_tokens=3)


# -- caches the caller built --------------------------------------------------------------------------------------

def _cache(config=STREAMING, **changes):
    shape = dict(num_layers=4, batch=1, kv_heads=2, head_dim=16, dtype=torch.float32, device="cpu")
    return hae_fx.HAECache(config, **{**shape, **changes})


@pytest.mark.parametrize("cache, message", [
    (lambda: _cache(num_layers=3), r"the HAECache has 3 layers but the model's text decoder has 4"),
    (lambda: _cache(num_layers=5), r"the HAECache has 5 layers but the model's text decoder has 4"),
    (lambda: _cache(dtype=torch.float64), r"the HAECache computes in torch.float64 on cpu but the model computes in "
                                          r"torch.float32 on cpu"),
    (lambda: _cache(HAEConfig(policy="hae", capacity=12, sinks=2, window=3, bin_size=2, dap_layer=9)),
     r"HAEConfig.dap_layer=9 is beyond the model's depth: its text decoder has 4 layers"),
    (lambda: _cache(HAEConfig(policy="hae", capacity=12, sinks=2, window=3, bin_size=2, prune_hidden=True)),
     r"the HAECache prunes hidden states after layer 1 but the model was transformed to prune after layer None"),
])
def test_a_user_built_cache_that_does_not_fit_the_model_is_refused(cache, message):
    model = _model()
    with pytest.raises(HAEConfigError, match=message):
        model.generate(_prompt(), past_key_values=cache(), max_new_tokens=3)
    assert _nothing_compiled(model)


def test_a_cache_without_the_models_windows_is_refused():
    family = BY_NAME["mistral-window"]
    model = hae_fx.transform(family.build(), STREAMING, options=EAGER)
    with pytest.raises(HAEConfigError, match=r"layer kinds \['full', 'full', 'full', 'full'\] differ from the "
                                             r"model's \['sliding 6', .*a windowed layer needs its ring"):
        model.generate(_prompt(), past_key_values=_cache(), max_new_tokens=3)


@pytest.mark.parametrize("changes, shape", [(dict(kv_heads=1), "1 KV heads of dim 16"),
                                            (dict(head_dim=8), "2 KV heads of dim 8")])
def test_a_user_built_cache_of_other_heads_is_refused_at_the_first_keys(changes, shape):
    message = rf"caches keys of 2 KV heads of dim 16 .* sized for {shape}; build the cache with HAECache\(\.\.\."
    with pytest.raises(HAEUnsupportedModelError, match=message):
        _model().generate(_prompt(), past_key_values=_cache(**changes), max_new_tokens=3)


def test_a_cache_the_device_cannot_hold_is_refused_before_allocating():
    config = HAEConfig(policy="streaming", capacity=10**9, sinks=2, window=3)
    planned = 4 * 2 * 2 * 10**9 * 16 * 4 + 10**9 * (8 + 4 + 1 + 8) + 2 * 8  # K/V, per-slot and per-sequence metadata
    with pytest.raises(HAECapacityError, match=rf"an HAECache of capacity=1000000000, batch=1, .* needs {planned:,} "
                                               r"bytes \(973\.2 GiB\) on cpu, but only [\d,]+ bytes .* are free"):
        _model(config).generate(_prompt(), max_new_tokens=3)


def test_the_planned_bytes_are_the_allocated_bytes():
    from hae_fx.validation import free_bytes

    family = BY_NAME["gemma3-text"]  # windowed layers (rings) and a policy with its own buffers
    config = HAEConfig(policy="hae", capacity=14, bin_size=4, sinks=2, window=3)
    model = family.build()
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    limit = cache.nbytes
    original = hae_fx.validation.free_bytes
    try:
        hae_fx.validation.free_bytes = lambda device: limit
        hae_fx.HAECache.for_model(model, config, batch=2)  # exactly fits
        hae_fx.validation.free_bytes = lambda device: limit - 1
        with pytest.raises(HAECapacityError, match=rf"needs {limit:,} bytes"):
            hae_fx.HAECache.for_model(model, config, batch=2)
    finally:
        hae_fx.validation.free_bytes = original
    assert free_bytes(torch.device("cpu")) > 0


# -- the transformed model as an object ---------------------------------------------------------------------------

def test_a_deep_copy_runs_its_own_weights():
    full = HAEConfig(policy="full", capacity=32)
    model = _model(full)
    before = model.generate(_prompt(), max_new_tokens=6, do_sample=False)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in clone.parameters():
            parameter.mul_(-1.5)
    reference = LLAMA.build()
    reference.load_state_dict(clone.state_dict())
    expected = reference.generate(_prompt(), max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert expected.tolist() != before.tolist()
    assert clone.generate(_prompt(), max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    assert model.generate(_prompt(), max_new_tokens=6, do_sample=False).tolist() == before.tolist()
    assert clone.hae_config == full and len(clone.hae_graphs["prefill"]) == 1


def test_transforming_again_after_clearing_hae_config_starts_from_the_plain_model():
    model = _model()
    model.generate(_prompt(), max_new_tokens=3, do_sample=False)
    model.hae_config = None
    full = HAEConfig(policy="full", capacity=32)
    hae_fx.transform(model, full, options=EAGER)
    expected = LLAMA.build().generate(_prompt(), max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert model.generate(_prompt(), max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    assert model.hae_config == full


# -- errors raised while compiling reach the caller as themselves --------------------------------------------------

@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_traced_refusal_under_the_callers_own_compile_is_the_hae_error(fullgraph):
    """An HAEError raised while Dynamo traces the cache (here: keys of another shape than the cache's) under the
    caller's own `torch.compile(backend="hae")` is raised as itself: with `fullgraph=True` too, where Dynamo reports a
    raise in traced code as `Unsupported: Observed exception`."""
    torch._dynamo.reset()  # a frame that failed to compile before (fullgraph=False) would now run eagerly
    model = LLAMA.build()
    cache = _cache(kv_heads=1)
    prompt = _prompt()
    cache.begin_prefill(torch.arange(prompt.shape[1]).unsqueeze(0))
    compiled = torch.compile(model, backend="hae", options=EAGER, fullgraph=fullgraph)
    with pytest.raises(HAEUnsupportedModelError, match=r"sized for 1 KV heads of dim 16") as raised:
        compiled(input_ids=prompt, past_key_values=cache)
    assert type(raised.value) is HAEUnsupportedModelError


def test_a_traced_refusal_at_decode_under_the_callers_own_fullgraph_compile_is_the_hae_error():
    """Several tokens on a prefilled cache, under the caller's own `torch.compile(backend="hae", fullgraph=True)`."""
    torch._dynamo.reset()  # as above
    model = LLAMA.build()
    cache = _cache()
    prompt = _prompt()
    cache.begin_prefill(torch.arange(prompt.shape[1]).unsqueeze(0))
    compiled = torch.compile(model, backend="hae", options=EAGER, fullgraph=True)
    compiled(input_ids=prompt, past_key_values=cache)
    cache.end_prefill()
    with pytest.raises(HAECapacityError, match=r"HAECache decodes one token per step, got 2") as raised:
        compiled(input_ids=prompt[:, :2], past_key_values=cache, position_ids=torch.tensor([[12, 13]]))
    assert type(raised.value) is HAECapacityError
