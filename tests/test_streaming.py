"""`streaming` with a capacity far below prompt + new tokens, against the eager oracle in tests/oracle.py."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.cache import kept_positions
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs
from tests.oracle import run_oracle

CONFIG = hae_fx.HAEConfig(policy="streaming", capacity=12, sinks=2, window=4)


class RecordKept(LogitsProcessor):
    """Records the cache's kept positions each time generate scores a token (after prefill and each step)."""

    def __init__(self):
        self.cache = None
        self.kept = []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_positions(self.cache)[0])
        return scores


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_streaming_matches_oracle_every_step(compiler):
    new_tokens = 40
    reference = tiny_llava(seed=1)
    model = tiny_llava(seed=1)
    hae_fx.transform(model, CONFIG, options={"hae.compiler": compiler})
    inputs = llava_inputs(reference, 1, seed=1)
    inputs.pop("attention_mask")
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len + new_tokens > 3 * CONFIG.capacity

    recorder = RecordKept()
    recorder.cache = hae_fx.HAECache.for_model(model, CONFIG, batch=1)
    out = model.generate(**inputs, past_key_values=recorder.cache, max_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True,
                         logits_processor=LogitsProcessorList([recorder]))

    tokens, oracle_kept, oracle_logits = run_oracle(reference, inputs, policy="streaming",
                                                    capacity=CONFIG.capacity, sinks=CONFIG.sinks,
                                                    new_tokens=new_tokens)
    assert recorder.kept == oracle_kept
    assert out.sequences[:, prompt_len:].tolist() == tokens
    torch.testing.assert_close(torch.cat(out.logits), oracle_logits, atol=1e-5, rtol=1e-5)


def test_streaming_memory_is_independent_of_generation_length():
    model = hae_fx.transform(tiny_llava(seed=2), CONFIG, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 1, seed=2)
    sizes = []
    for new_tokens in (10, 200):
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True)
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + new_tokens
        sizes.append(out.past_key_values.nbytes)
        kept = kept_positions(out.past_key_values)[0]
        assert len(kept) == CONFIG.capacity
    assert sizes[0] == sizes[1]
    kv_heads, head_dim, layers = 2, 16, 2
    assert out.past_key_values.kv_nbytes == 2 * layers * kv_heads * CONFIG.capacity * head_dim * 4


def test_streaming_batch_with_padding_keeps_real_tokens_only():
    """Left padding never occupies a slot; each sequence keeps its own sinks and recent tokens."""
    model = hae_fx.transform(tiny_llava(seed=4), CONFIG, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=4)
    lengths = inputs["attention_mask"].sum(-1).tolist()
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    seen = [length + 4 for length in lengths]  # the last generated token is never fed back
    expected = [[0, 1, *range(n - (CONFIG.capacity - CONFIG.sinks), n)] for n in seen]
    assert kept_positions(out.past_key_values) == expected
