"""`full` with enough capacity reproduces HF's static-cache generation token for token."""

import pytest
import torch

import hae_fx
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs

SEEDS = (0, 1, 2)
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["eager", "inductor"])
def full_model(request):
    """One transformed tiny LLaVA per compiler, reused across seeds (weights are reloaded in place)."""
    model = tiny_llava(seed=0)
    return hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=64),
                            options={"hae.compiler": request.param})


@pytest.mark.parametrize("batch", [1, 2])
def test_full_policy_tokens_equal_hf_static_cache(full_model, batch):
    for seed in SEEDS:
        reference = tiny_llava(seed=seed)
        full_model.load_state_dict(reference.state_dict())
        inputs = llava_inputs(reference, batch, seed=seed)
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      cache_implementation="static")
        out = full_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  return_dict_in_generate=True)
        assert out.sequences.tolist() == expected.tolist(), f"seed {seed}"
        assert isinstance(out.past_key_values, hae_fx.HAECache)


def test_text_only_decoder_matches_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    reference = LlamaForCausalLM(config).eval()
    reference.generation_config.eos_token_id = None
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(reference.state_dict())
    model.generation_config.eos_token_id = None
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=32), options={"hae.compiler": "eager"})
    input_ids = torch.randint(3, 128, (1, 9))
    expected = reference.generate(input_ids, max_new_tokens=10, do_sample=False, cache_implementation="static")
    assert model.generate(input_ids, max_new_tokens=10, do_sample=False).tolist() == expected.tolist()


def test_eager_attention_form_is_rewritten_too():
    """HF's eager matmul-softmax-matmul attention is found and rewritten like SDPA."""
    reference = tiny_llava(seed=3, attn_implementation="eager")
    model = tiny_llava(seed=3, attn_implementation="eager")
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=64), options={"hae.compiler": "eager"})
    inputs = llava_inputs(reference, 1, seed=3)
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert model.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == expected.tolist()
    (decode,) = model.hae_graphs["decode"]
    assert decode.report.forms == ("eager", "eager")
    assert "softmax" not in decode.op_counts


def test_cache_tags_image_tokens_as_visual():
    from hae_fx.cache import TEXT, VISUAL

    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=64),
                             options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    image_token_id = model.config.image_token_id
    for row in range(2):
        real = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        slots = zip(cache.slot_pos[row].tolist(), cache.modality[row].tolist(), strict=True)
        by_position = sorted((pos, tag) for pos, tag in slots if pos >= 0)
        expected = [VISUAL if token == image_token_id else TEXT for token in real.tolist()] + [TEXT] * 3
        assert [tag for _, tag in by_position] == expected
