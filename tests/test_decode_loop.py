"""hae_fx's decode loop (`hae_fx.decode_loop`) returns HF's tokens: greedy and sampled, stopped by length or by
end-of-sequence tokens, streamed, on a padded batch."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import hae_fx
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs

EAGER = {"hae.compiler": "eager"}
NEW_TOKENS = 10


class RecordingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.view(-1).tolist())

    def end(self) -> None:
        self.ended = True


def transformed(seed: int = 0, decode_loop: str = "hae", policy: str = "full", capacity: int = 64):
    return hae_fx.transform(tiny_llava(seed=seed), hae_fx.HAEConfig(policy=policy, capacity=capacity),
                            options=EAGER, decode_loop=decode_loop)


@pytest.fixture(scope="module")
def inputs():
    return llava_inputs(tiny_llava(seed=0), batch=2, seed=0)


def reference_generate(inputs, **kwargs):
    return tiny_llava(seed=0).generate(**inputs, cache_implementation="static", **kwargs)


def test_greedy_stopped_by_eos_equals_hf(inputs):
    """One row meets the end-of-sequence token early and continues with padding; the other runs to the limit."""
    greedy = reference_generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    eos = greedy[0, prompt_len + 2].item()
    expected = reference_generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    out = transformed().generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert out.tolist() == expected.tolist()


def test_every_row_finishing_stops_as_hf_does(inputs):
    """When every row has met an end-of-sequence token the output stops where HF's does. The loop learns it one
    step late: the cache has then also taken in the last returned token, and counts it."""
    greedy = reference_generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    eos = [greedy[0, prompt_len + 1].item(), greedy[1, prompt_len + 3].item()]
    expected = reference_generate(inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    assert expected.shape[1] < prompt_len + NEW_TOKENS
    out = transformed().generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                                 return_dict_in_generate=True)
    assert out.sequences.tolist() == expected.tolist()
    real_tokens = inputs["attention_mask"].sum(-1) + (expected.shape[1] - prompt_len)
    assert out.past_key_values.seen.tolist() == real_tokens.tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_equals_hf_under_the_same_seed(inputs, seed):
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    reference, model = tiny_llava(seed=0), transformed()
    torch.manual_seed(seed)
    expected = reference.generate(**inputs, cache_implementation="static", **sampling)
    torch.manual_seed(seed)
    assert model.generate(**inputs, **sampling).tolist() == expected.tolist()


@pytest.mark.parametrize("eos_step", [None, 3])
def test_streamer_gets_hf_tokens_in_order(inputs, eos_step):
    single = {name: value[:1] for name, value in inputs.items()}
    prompt_len = single["input_ids"].shape[1]
    greedy = reference_generate(single, max_new_tokens=NEW_TOKENS, do_sample=False)
    stop = {} if eos_step is None else {"eos_token_id": greedy[0, prompt_len + eos_step].item()}
    expected, streamed = RecordingStreamer(), RecordingStreamer()
    reference_generate(single, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=expected, **stop)
    transformed().generate(**single, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamed, **stop)
    assert streamed.puts == expected.puts
    assert streamed.ended


def test_evicting_policy_same_tokens_as_hf_loop(inputs):
    """With an evicting cache there is no HF reference; HF's own loop over the same cache is."""
    kwargs = dict(max_new_tokens=24, do_sample=False)
    ours = transformed(policy="streaming", capacity=24).generate(**inputs, **kwargs)
    hf_loop = transformed(policy="streaming", capacity=24, decode_loop="hf").generate(**inputs, **kwargs)
    assert ours.tolist() == hf_loop.tolist()


def test_per_step_outputs_run_hf_loop(inputs):
    out = transformed().generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                                 output_scores=True)
    assert len(out.scores) == 4


def test_unknown_decode_loop_is_refused():
    with pytest.raises(hae_fx.HAEConfigError, match="decode_loop must be one of"):
        hae_fx.transform(tiny_llava(seed=0), decode_loop="fast")
