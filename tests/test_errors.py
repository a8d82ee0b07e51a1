"""Bad input fails early with an error that names the problem and the fix."""

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

import hae_fx
from hae_fx import HAECapacityError, HAEConfig, HAESiteError, HAEUnsupportedModelError
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs
from tests.families import BY_NAME


def test_full_capacity_too_small_is_refused_before_generating():
    model = hae_fx.transform(tiny_llava(), HAEConfig(policy="full", capacity=24), options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 1)
    prompt_len = inputs["input_ids"].shape[1]
    with pytest.raises(HAECapacityError, match=rf"capacity=24 < prompt \({prompt_len}\) \+ max_new_tokens \(10\)"):
        model.generate(**inputs, max_new_tokens=10)
    assert model.hae_graphs["prefill"] == []  # nothing ran


def test_cache_of_another_batch_size_is_refused():
    model = hae_fx.transform(tiny_llava(), HAEConfig(policy="streaming", capacity=16, sinks=2, window=4))
    cache = hae_fx.HAECache.for_model(model, model.hae_config, batch=1)
    with pytest.raises(HAECapacityError, match="batch mismatch: the HAECache holds batch 1, the prompt has 2"):
        model.generate(**llava_inputs(model, 2), past_key_values=cache, max_new_tokens=3)


def test_a_model_that_is_not_an_hf_generative_model_is_refused():
    from transformers import BertConfig, BertModel

    with pytest.raises(HAEUnsupportedModelError, match=r"HF generative models .*Linear is not one"):
        hae_fx.transform(torch.nn.Linear(2, 2), HAEConfig())
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(HAEUnsupportedModelError, match="BertModel is not one"):
        hae_fx.transform(encoder, HAEConfig())


def _einsum_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An attention implementation the passes do not know: plain einsums."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    weights = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", weights.softmax(-1), value)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("compiled_by", ["transform", "own fullgraph compile"])
def test_model_whose_attention_sites_cannot_be_found(compiled_by):
    """An attention the passes do not know reads the cache's slots at decode: the HAESiteError reaches the caller as
    itself, whoever compiled (`transform`, or the caller's own `torch.compile(backend="hae")`), not as Dynamo's
    BackendCompilerFailed."""
    AttentionInterface.register("einsum_attention", _einsum_attention)
    AttentionMaskInterface.register("einsum_attention", sdpa_mask)
    llama = BY_NAME["llama"]
    model = llama.build()
    model.set_attn_implementation("einsum_attention")
    config = HAEConfig(policy="streaming", capacity=16, sinks=2, window=4)
    prompt = llama.inputs(1)["input_ids"]
    message = r"cache keys of layer 0 are read by .*not an attention hae_fx recognises.*attn_implementation='sdpa'"
    if compiled_by == "transform":
        hae_fx.transform(model, config, options={"hae.compiler": "eager"})
        with pytest.raises(HAESiteError, match=message):
            model.generate(prompt, max_new_tokens=3)
        return
    cache = hae_fx.HAECache.for_model(model, config, batch=1)
    cache.begin_prefill(torch.arange(prompt.shape[1]).unsqueeze(0))
    compiled = torch.compile(model, backend="hae", options={"hae.compiler": "eager"}, fullgraph=True)
    compiled(input_ids=prompt, past_key_values=cache)
    cache.end_prefill()
    with pytest.raises(HAESiteError, match=message):
        compiled(input_ids=prompt[:, -1:], past_key_values=cache, position_ids=torch.tensor([[prompt.shape[1]]]))


def test_transforming_twice_is_refused():
    model = hae_fx.transform(tiny_llava(), HAEConfig())
    with pytest.raises(hae_fx.HAEError, match="already transformed"):
        hae_fx.transform(model, HAEConfig())
