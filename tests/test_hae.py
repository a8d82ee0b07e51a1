"""The `hae` policy (DAP at prefill, the DDES bin at decode) against the independent oracle in tests/hae_oracle.py.

The compiled path must keep exactly the oracle's set (and bin) after prefill and after every decode step, and
produce its tokens. The tiny LLaVA's prompts have 16 visual tokens among 26 (tests/conftest.py); with the weights of
`model_for`, the thresholds below make DAP evict some visual tokens and keep others.
"""


import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.cache import VISUAL, binned_positions, kept_positions
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs, unpadded
from tests.hae_oracle import oracle_fields, run_hae_oracle

OVERFLOW = hae_fx.HAEConfig(policy="hae", capacity=24, bin_size=6, sinks=2, window=4, dap_layer=1, r=0.04,
                            alpha=0.1)


def model_for(seed, **kwargs):
    """A tiny LLaVA whose random attention is spread out enough for eviction to have real choices."""
    return tiny_llava(seed=seed, initializer_range=0.2, **kwargs)


class RecordCache(LogitsProcessor):
    """Records each sequence's kept and binned positions whenever generate scores a token: after prefill, then
    after every decode step (the set that step attended over)."""

    def __init__(self, cache):
        self.cache = cache
        self.kept, self.binned = [], []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_positions(self.cache))
        self.binned.append(binned_positions(self.cache))
        return scores


def generate_recorded(model, config, inputs, new_tokens):
    recorder = RecordCache(hae_fx.HAECache.for_model(model, config, batch=inputs["input_ids"].shape[0]))
    out = model.generate(**inputs, past_key_values=recorder.cache, max_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True,
                         logits_processor=LogitsProcessorList([recorder]))
    return out, recorder


def oracle_for(config, seed, inputs, new_tokens):
    return run_hae_oracle(model_for(seed, attn_implementation="eager"), inputs, new_tokens=new_tokens,
                          **oracle_fields(config))


def restored_count(run):
    """Tokens that left the bin for the active set (neither freed nor still binned one step later)."""
    steps = zip(run.binned, run.kept[1:], run.binned[1:], strict=False)
    return sum(len(set(binned) & (set(kept) - set(still_binned))) for binned, kept, still_binned in steps)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("prune_hidden", [False, True], ids=["kv_only", "prune_hidden"])
def test_hae_matches_oracle_every_step_for_200_steps(compiler, prune_hidden):
    new_tokens, seed = 200, 1
    config = OVERFLOW.replace(prune_hidden=prune_hidden)
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": compiler})
    inputs = unpadded(llava_inputs(model, 1, seed=seed), 0)
    out, recorder = generate_recorded(model, config, inputs, new_tokens)
    oracle = oracle_for(config, seed, inputs, new_tokens)

    assert oracle.dap_evicted, "the thresholds must evict some visual tokens for this test to mean anything"
    assert sum(map(len, oracle.binned)) > 0, "tokens must pass through the bin"
    shrinks = [len(now) < len(before) for now, before in zip(oracle.kept[1:], oracle.kept[:-1], strict=True)]
    assert any(shrinks), "the bin must be freed at least once"
    assert restored_count(oracle) > 0, "some binned token must recover its place"
    assert [kept[0] for kept in recorder.kept] == oracle.kept
    assert [binned[0] for binned in recorder.binned] == oracle.binned
    prompt_len = inputs["input_ids"].shape[1]
    assert out.sequences[0, prompt_len:].tolist() == oracle.tokens
    torch.testing.assert_close(torch.cat(out.logits), oracle.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", [
    dict(score_source="dap_layer", dap_layer=0),
    dict(decay=0.05, visual_first=2.0, max_visual_keep=6),
    dict(bin_size=1, window=0, prune_hidden=True, max_visual_keep=4),
], ids=["dap_layer_scores", "decay_visual_first_cap", "greedy_bin_pruned"])
def test_hae_variants_match_oracle(variant):
    new_tokens, seed = 60, 3
    config = OVERFLOW.replace(**variant)
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
    inputs = unpadded(llava_inputs(model, 1, seed=seed), 0)
    out, recorder = generate_recorded(model, config, inputs, new_tokens)
    oracle = oracle_for(config, seed, inputs, new_tokens)
    assert [kept[0] for kept in recorder.kept] == oracle.kept
    assert [binned[0] for binned in recorder.binned] == oracle.binned
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == oracle.tokens


def test_batch_of_two_images_keeps_each_sequence_oracle_set():
    """Different images, different prompt lengths (left padding), different kept counts per sequence."""
    new_tokens, seed = 40, 4
    config = OVERFLOW.replace(prune_hidden=True)
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=seed)
    out, recorder = generate_recorded(model, config, inputs, new_tokens)
    oracles = [oracle_for(config, seed, unpadded(inputs, row), new_tokens) for row in range(2)]
    assert len({len(oracle.kept[0]) for oracle in oracles} | {len(o.dap_evicted) for o in oracles}) > 1
    width = inputs["input_ids"].shape[1]
    for row, oracle in enumerate(oracles):
        assert [kept[row] for kept in recorder.kept] == oracle.kept
        assert [binned[row] for binned in recorder.binned] == oracle.binned
        assert out.sequences[row, width:].tolist() == oracle.tokens


def test_zero_thresholds_evict_nothing_and_equal_full():
    seed, new_tokens = 2, 20
    inputs = llava_inputs(model_for(seed), 2, seed=seed)
    roomy = hae_fx.HAEConfig(policy="hae", capacity=128, bin_size=8, sinks=2, window=4, r=0.0, alpha=0.0)
    hae = hae_fx.transform(model_for(seed), roomy, options={"hae.compiler": "eager"})
    full = hae_fx.transform(model_for(seed), hae_fx.HAEConfig(policy="full", capacity=64),
                            options={"hae.compiler": "eager"})
    hae_out = hae.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
    full_out = full.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(hae_out.sequences, full_out)
    report = hae_fx.report(hae_out.past_key_values)
    assert [seq.kept_visual for seq in report.sequences] == [16, 16]
    assert [seq.binned for seq in report.sequences] == [0, 0]


def test_thresholds_at_one_evict_every_visual_token_and_still_generate():
    """With r = alpha = 1 every visual token passes both tests (no softmax probability reaches 1 here)."""
    config = OVERFLOW.replace(r=1.0, alpha=1.0, capacity=64, bin_size=8)
    model = hae_fx.transform(model_for(5), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=5)
    out = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 10
    assert not bool(((cache.modality == VISUAL) & (cache.slot_pos >= 0)).any())
    real_tokens = inputs["attention_mask"].sum(-1).tolist()
    assert [len(kept) for kept in cache.prefill_kept] == [n - 16 for n in real_tokens]


def test_prune_hidden_keeps_the_same_set_and_later_layers_compute_less():
    seed = 6
    config = OVERFLOW.replace(capacity=64, bin_size=8, max_visual_keep=4)
    inputs = llava_inputs(model_for(seed), 2, seed=seed)
    prompt_len = inputs["input_ids"].shape[1]
    caches, models = {}, {}
    for prune in (False, True):
        model = hae_fx.transform(model_for(seed, text_layers=3), config.replace(prune_hidden=prune),
                                 options={"hae.compiler": "eager"})
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
        caches[prune], models[prune] = out.past_key_values, model
    assert caches[True].prefill_kept == caches[False].prefill_kept

    kept_len = caches[True].prefill_kept_len
    assert kept_len < prompt_len
    for prune, model in models.items():
        (prefill,) = model.hae_graphs["prefill"]
        assert prefill.dap.layer == 1 and prefill.dap.deferred_layers == (0, 1)
        tokens_per_layer = prefill.tokens_per_layer
        assert tokens_per_layer[0] == tokens_per_layer[1] == prompt_len
        assert tokens_per_layer[2] == (kept_len if prune else prompt_len)


def test_decode_never_recompiles_and_memory_is_fixed(dynamo_counters):
    model = hae_fx.transform(model_for(7), OVERFLOW.replace(prune_hidden=True))
    inputs = llava_inputs(model, 1, seed=7)
    sizes = []
    for new_tokens in (5, 120):
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True)
        sizes.append(out.past_key_values.nbytes)
    assert sizes[0] == sizes[1]
    assert dynamo_counters["graph_break"] == {}
    assert dynamo_counters["stats"]["unique_graphs"] == 2
    assert len(model.hae_graphs["decode"]) == 1


def test_prompt_without_image_skips_dap_with_a_log_line_and_ddes_still_bounds_the_cache(caplog):
    model = hae_fx.transform(model_for(8), OVERFLOW, options={"hae.compiler": "eager"})
    input_ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(8))
    with caplog.at_level("INFO", logger="hae_fx"):
        out = model.generate(input_ids=input_ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert "no visual tokens: Dual-Attention Pruning is skipped" in caplog.text
    cache = out.past_key_values
    assert len(cache.prefill_kept[0]) == OVERFLOW.capacity - 1
    assert len(kept_positions(cache)[0]) <= OVERFLOW.capacity


def test_prompt_without_image_ranks_by_its_last_tokens_like_the_oracle():
    """Without visual tokens DAP's observation queries are the prompt's last `observation_window` tokens (0:
    every token), and the capacity rule keeps by their attention pooled over `pool_kernel` neighbours; the
    choices keep different prompts here."""
    new_tokens, seed = 30, 8
    inputs = {"input_ids": torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(seed))}
    prefill_kept = []
    for observation_window, pool_kernel in ((0, 1), (8, 1), (8, 5)):
        config = OVERFLOW.replace(observation_window=observation_window, pool_kernel=pool_kernel)
        model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
        out, recorder = generate_recorded(model, config, inputs, new_tokens)
        oracle = oracle_for(config, seed, inputs, new_tokens)
        assert [kept[0] for kept in recorder.kept] == oracle.kept, config
        assert [binned[0] for binned in recorder.binned] == oracle.binned, config
        assert out.sequences[0, 40:].tolist() == oracle.tokens, config
        prefill_kept.append(oracle.kept[0])
    assert len({tuple(kept) for kept in prefill_kept}) == 3


def test_bfloat16_multi_head_model_compiles_with_inductor():
    """Half-precision K/V with as many KV heads as query heads (LLaVA-1.5's layout) through Inductor: the DAP
    plan computes in float32 and its graph must lower like the rest; Inductor keeps the eager path's set."""
    config = OVERFLOW.replace(prune_hidden=True, max_visual_keep=4, dap_layer=0)
    reference, compiled = (
        hae_fx.transform(model_for(9, text_layers=3, kv_heads=4).to(torch.bfloat16), config, options=options)
        for options in ({"hae.compiler": "eager"}, None))
    inputs = llava_inputs(compiled, 2, seed=9)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    expected = reference.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    got = compiled.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert got.past_key_values.layers[0].keys.dtype == torch.bfloat16
    assert got.past_key_values.prefill_kept == expected.past_key_values.prefill_kept


def test_two_image_prompt_matches_oracle():
    """Both images' tokens are DAP candidates; the observation queries are the text after the second image."""
    new_tokens, seed = 40, 10
    model = hae_fx.transform(model_for(seed), OVERFLOW.replace(capacity=40, bin_size=8),
                             options={"hae.compiler": "eager"})
    image = [model.config.image_token_id] * 16
    input_ids = torch.tensor([[1, 17, 18, *image, 30, 31, 32, *image, 40, 41, 42, 43, 44, 45]])
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
    out, recorder = generate_recorded(model, model.hae_config, inputs, new_tokens)
    oracle = oracle_for(model.hae_config, seed, inputs, new_tokens)
    evicted = set(oracle.dap_evicted)
    assert evicted & set(range(3, 19)) and evicted & set(range(22, 38)), "DAP must prune in both images"
    assert [kept[0] for kept in recorder.kept] == oracle.kept
    assert [binned[0] for binned in recorder.binned] == oracle.binned
    assert out.sequences[0, input_ids.shape[1]:].tolist() == oracle.tokens


def test_eager_attention_form_feeds_dap_like_sdpa():
    """HF's matmul-softmax-matmul attention is found at `dap_layer` too, and decides the same keep set."""
    seed = 11
    kept = {}
    for implementation in ("sdpa", "eager"):
        model = hae_fx.transform(model_for(seed, attn_implementation=implementation), OVERFLOW,
                                 options={"hae.compiler": "eager"})
        out = model.generate(**llava_inputs(model, 2, seed=seed), max_new_tokens=20, do_sample=False,
                             return_dict_in_generate=True)
        (prefill,) = model.hae_graphs["prefill"]
        assert prefill.dap.form == implementation
        kept[implementation] = (out.past_key_values.prefill_kept, kept_positions(out.past_key_values))
    assert kept["eager"] == kept["sdpa"]
