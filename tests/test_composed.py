"""`composed` against the two oracles composed: SnapKV's rule (tests/test_snapkv.py) chooses the prompt tokens,
then the hae oracle's DDES state (tests/hae_oracle.py) evicts through its recycle bin while decoding."""

import pytest
import torch
from transformers import DynamicCache

import hae_fx
from hae_fx import HAEConfigError
from hae_fx.policies.composed import ComposedConfig
from hae_fx.policies.snapkv import SnapKVConfig
from tests.conftest import llava_inputs, unpadded
from tests.hae_oracle import DDESState, _decode_forward, _global_layers, _score_increments
from tests.policy_oracle import model_for
from tests.test_hae import generate_recorded
from tests.test_snapkv import SnapKVRule

PREFILL = SnapKVConfig(capacity=18, sinks=1, window=4, kernel_size=3)
DECODE = hae_fx.HAEConfig(capacity=18, bin_size=4, sinks=1, window=3)
CONFIG = ComposedConfig(capacity=18, prefill=PREFILL, decode=DECODE)


def run_composed_oracle(model, sequence, new_tokens):
    """SnapKV's prefill decision; its ranking (protected first by position, then pooled vote) puts the first
    `budget` kept tokens in the active set and the rest in the bin; DDES from there, scores starting at the vote."""
    input_ids = sequence["input_ids"]
    prompt_len = input_ids.shape[1]
    visual = (input_ids[0] == model.config.image_token_id).tolist()
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=sequence["pixel_values"], past_key_values=cache,
                    use_cache=True, output_attentions=True)
    attention = [weights[0].float().mean(dim=0) for weights in out.attentions]
    scores = SnapKVRule(PREFILL).prefill(attention, visual, CONFIG.capacity)
    protected = [j for j in scores if j < PREFILL.sinks or j >= prompt_len - PREFILL.window]
    ranked = sorted(protected) + sorted(set(scores) - set(protected), key=lambda j: (-scores[j], j))
    budget = DECODE.capacity - DECODE.bin_size
    state = DDESState(budget=budget, bin_size=DECODE.bin_size, sinks=DECODE.sinks, window=DECODE.window,
                      visual_first=DECODE.visual_first, decay=DECODE.decay, scores=dict(scores),
                      active=set(ranked[:budget]), binned=set(ranked[budget:]),
                      visual={j for j in range(prompt_len) if visual[j]})
    kept, binned = [state.kept], [sorted(state.binned)]
    logits, tokens = [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
    for step in range(1, new_tokens):
        position = prompt_len + step - 1
        state.maintain(seen=position)
        state.place(position)
        kept.append(state.kept)
        binned.append(sorted(state.binned))
        step_logits, rows = _decode_forward(model, tokens[-1], position, state.kept, cache)
        state.add_attention(_score_increments(rows, "layers_mean", 0, _global_layers(model)))
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
    return kept, binned, tokens, torch.stack(logits)


def test_snapkv_prefill_with_ddes_decode_matches_the_composed_oracles_for_100_steps():
    seed, new_tokens = 14, 100
    model = hae_fx.transform(model_for(seed), CONFIG, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=seed)
    out, recorder = generate_recorded(model, CONFIG, inputs, new_tokens)
    reference = model_for(seed, attn_implementation="eager")
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        sequence = unpadded(inputs, row)
        kept, binned, tokens, logits = run_composed_oracle(reference, sequence, new_tokens)
        assert [step[row] for step in recorder.kept] == kept, f"sequence {row}"
        assert [step[row] for step in recorder.binned] == binned, f"sequence {row}"
        assert out.sequences[row, width:].tolist() == tokens, f"sequence {row}"
        torch.testing.assert_close(torch.stack([step[row] for step in out.logits]), logits, atol=1e-4, rtol=1e-4)
        assert len(kept[0]) == CONFIG.capacity  # the prompt (24-26 tokens) lost tokens to SnapKV's vote
        assert any(binned)  # DDES's bin was used


def test_halves_are_named_or_configured_and_must_agree_on_capacity():
    by_name = hae_fx.HAEConfig(policy="composed", capacity=20, sinks=2, window=4, bin_size=4, prefill="tova",
                               decode="h2o")
    assert (by_name.prefill.policy, by_name.decode.policy, by_name.decode.capacity) == ("tova", "h2o", 20)
    with pytest.raises(HAEConfigError, match=r"ComposedConfig.decode has capacity 18 but the composed config 20"):
        ComposedConfig(capacity=20, prefill=PREFILL.replace(capacity=20), decode=DECODE)
    with pytest.raises(HAEConfigError, match=r"ComposedConfig.decode='ahakv' decodes from state its own prefill"):
        ComposedConfig(capacity=20, sinks=1, window=4, decode="ahakv")
