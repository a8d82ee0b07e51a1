"""Every tested HF family: `full` reproduces HF, evicting policies run in fixed memory, windows are exact, and the
layouts hae_fx cannot compute are refused by name. Families and their tiny configs: tests/families.py."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

import hae_fx
from hae_fx import HAEConfig, HAESiteError, HAEUnsupportedModelError
from hae_fx.cache import kept_positions
from hae_fx.layer_kinds import CHUNKED, FULL, SLIDING, LayerKind, layer_kinds
from tests.families import BY_NAME, FAMILIES, GEMMA3_TEXT_WIDE, WINDOW, phi4_multimodal
from tests.oracle import run_oracle, streaming_keep

EAGER = {"hae.compiler": "eager"}
NEW_TOKENS = 14
FAMILY_IDS = [family.name for family in FAMILIES]


def _transformed(family, config, reference, options=EAGER):
    model = family.build()
    model.load_state_dict(reference.state_dict())
    return hae_fx.transform(model, config, options=options)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", FAMILY_IDS)
def test_full_reproduces_hf_static_cache_tokens_and_logits(name, batch):
    family = BY_NAME[name]
    reference = family.build()
    inputs = family.inputs(batch)
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                                  return_dict_in_generate=True, output_logits=True)
    model = _transformed(family, HAEConfig(policy="full", capacity=48), reference)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert out.sequences.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    assert len(model.hae_graphs["decode"]) == 1


@pytest.mark.parametrize("policy", ["streaming", "hae"])
@pytest.mark.parametrize("name", FAMILY_IDS)
def test_evicting_policies_run_in_fixed_memory(name, policy, dynamo_counters):
    family = BY_NAME[name]
    sinks, window, capacity = 2, 3, 12
    config = HAEConfig(policy=policy, capacity=capacity, sinks=sinks, window=window,
                       **({"bin_size": 4} if policy == "hae" else {}))
    model = _transformed(family, config, family.build())
    inputs = family.inputs(2)
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    nbytes = cache.nbytes
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=30, do_sample=False,
                         return_dict_in_generate=True)
    assert out.past_key_values is cache and cache.nbytes == nbytes
    assert len(model.hae_graphs["decode"]) == 1
    assert dynamo_counters["graph_break"] == {}
    kept = kept_positions(cache)
    valid = inputs["attention_mask"].sum(-1).tolist()
    for row, positions in enumerate(kept):
        seen = list(range(valid[row] + 29))  # the last token is sampled, never cached
        assert len(positions) <= capacity
        if policy == "streaming":
            assert positions == streaming_keep(seen, capacity, sinks)


@pytest.mark.parametrize(("capacity", "sinks", "full_windows"), [(10, 2, False), (5, 1, True)])
@pytest.mark.parametrize("name", [family.name for family in FAMILIES if family.windowed and not family.image_tokens])
def test_windowed_layers_match_the_oracle_under_streaming(name, capacity, sinks, full_windows):
    """Global layers attend over the streaming set, sliding layers over their last WINDOW positions: tokens, logits
    and kept positions equal the eager oracle's at every step, also with a capacity below the window when
    `full_windows` keeps whole windows."""
    family = BY_NAME[name]
    reference = family.build()
    inputs = family.inputs(1)
    inputs.pop("attention_mask")
    config = HAEConfig(policy="streaming", capacity=capacity, sinks=sinks, window=3, full_windows=full_windows)
    model = _transformed(family, config, reference)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    tokens, kept, logits = run_oracle(reference, inputs, policy="streaming", capacity=capacity, sinks=sinks,
                                      new_tokens=24)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.sequences[:, prompt_len:].tolist() == tokens
    torch.testing.assert_close(torch.cat(out.logits), logits, atol=1e-4, rtol=1e-4)
    assert kept_positions(out.past_key_values) == [kept[-1]]


def test_sliding_layers_hold_only_their_window():
    family = BY_NAME["gemma3-text"]
    model = family.build()
    config = HAEConfig(policy="full", capacity=48)
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    kinds = [layer.kind for layer in cache.layers]
    assert [kind.kind for kind in kinds] == [SLIDING] * 5 + [FULL] + [SLIDING]
    for layer in cache.layers:
        assert layer.keys.shape[2] == (WINDOW if layer.kind.windowed else 48)
    global_bytes = cache.kv_bytes_per_token * 48
    assert cache.kv_nbytes == global_bytes * (1 + 6 * WINDOW / 48) / 7


@pytest.mark.parametrize(("full_windows", "sliding_slots"), [(False, 4), (True, WINDOW)])
def test_full_windows_keeps_whole_windows_below_the_window(full_windows, sliding_slots):
    config = HAEConfig(policy="streaming", capacity=4, sinks=1, window=1, full_windows=full_windows)
    cache = hae_fx.HAECache.for_model(BY_NAME["gemma3-text"].build(), config, batch=1)
    assert [layer.slots for layer in cache.layers] == [sliding_slots] * 5 + [4] + [sliding_slots]


def test_gemma3_text_compiles_with_inductor_like_the_reference_path(dynamo_counters):
    family = BY_NAME["gemma3-text"]
    reference = family.build()
    inputs = family.inputs(2)
    config = HAEConfig(policy="streaming", capacity=10, sinks=2, window=3)
    runs = []
    for compiler in ("eager", "inductor"):
        model = _transformed(family, config, reference, options={"hae.compiler": compiler})
        runs.append(model.generate(**inputs, max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                                   output_logits=True))
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    torch.testing.assert_close(torch.stack(runs[1].logits), torch.stack(runs[0].logits), atol=1e-4, rtol=1e-4)
    assert dynamo_counters["graph_break"] == {}
    assert len(model.hae_graphs["decode"]) == 1


def test_kv_geometry_the_config_hides_is_refused_not_run():
    family = BY_NAME["llama"]
    model = _transformed(family, HAEConfig(policy="full", capacity=48), family.build())
    text = model.config
    wrong = hae_fx.HAECache(model.hae_config, num_layers=text.num_hidden_layers, batch=1, kv_heads=4, head_dim=16,
                            dtype=torch.float32, device="cpu")
    inputs = family.inputs(1)
    with pytest.raises(HAEUnsupportedModelError, match=r"but the HAECache was sized for 4 KV heads of dim 16"):
        model.generate(**inputs, past_key_values=wrong, max_new_tokens=3)


def test_attention_logit_softcapping_is_refused():
    config = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  attn_logit_softcapping=50.0, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    hae_fx.transform(model, HAEConfig(policy="streaming", capacity=10, sinks=2, window=3), options=EAGER)
    with pytest.raises(HAESiteError, match="soft-capped .*attn_logit_softcapping"):
        model.generate(torch.randint(3, 100, (1, 12)), max_new_tokens=3, do_sample=False)


def test_alibi_is_refused():
    config = AutoConfig.for_model("falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=128, alibi=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(HAEUnsupportedModelError, match="ALiBi"):
        hae_fx.transform(model, HAEConfig())


def test_a_vision_tower_inside_the_text_decoder_is_refused_with_images():
    """Phi-4-multimodal's text decoder embeds the image itself, with data-dependent code Dynamo cannot trace into the
    prefill graph: refused, naming the towers found in the decoder; text prompts still reproduce HF."""
    model, inputs = phi4_multimodal()
    text = {"input_ids": torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12]])}
    expected = model.generate(**text, max_new_tokens=6, do_sample=False, cache_implementation="static")
    hae_fx.transform(model, HAEConfig(policy="full", capacity=32), options=EAGER)
    assert model.generate(**text, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    with pytest.raises(HAEUnsupportedModelError, match=r"Phi4MultimodalModel, the text decoder hae_fx compiles, runs "
                       r"embed_tokens_extend\.image_embed\.img_processor \(Phi4MultimodalVisionModel\), .* inside its "
                       r"own forward, and Dynamo cannot trace .*: Data-dependent branching"):
        model.generate(**inputs, max_new_tokens=3, do_sample=False)


def test_layer_kinds_from_configs():
    base = dict(num_hidden_layers=3, sliding_window=8)
    assert layer_kinds(SimpleNamespace(**base)) == [LayerKind(SLIDING, 8)] * 3
    assert layer_kinds(SimpleNamespace(**base, use_sliding_window=False)) == [LayerKind(FULL)] * 3
    chunked = SimpleNamespace(num_hidden_layers=2, attention_chunk_size=16, sliding_window=None,
                              layer_types=["chunked_attention", "full_attention"])
    assert layer_kinds(chunked) == [LayerKind(CHUNKED, 16), LayerKind(FULL)]
    with pytest.raises(HAEUnsupportedModelError, match="layer type 'linear_attention'"):
        layer_kinds(SimpleNamespace(**base, layer_types=["full_attention", "linear_attention", "full_attention"]))


def test_inspect_lists_layer_kinds_sites_and_plan():
    family = BY_NAME["gemma3-text"]
    model = _transformed(family, HAEConfig(policy="streaming", capacity=10, sinks=2, window=3), family.build())
    before = hae_fx.inspect(model)
    assert "not compiled yet" in str(before)
    assert [layer.kind for layer in before.layers] == [f"sliding {WINDOW}"] * 5 + ["global", f"sliding {WINDOW}"]
    model.generate(**family.inputs(1), max_new_tokens=3, do_sample=False)
    after = hae_fx.inspect(model)
    assert [layer.decode_sites for layer in after.layers] == [("sdpa",)] * 7
    assert [layer.slots for layer in after.layers] == [WINDOW] * 5 + [10, WINDOW]
    assert "decode graph 0: 7 attention site(s) rewritten" in str(after)
    with pytest.raises(hae_fx.HAEError, match="call hae_fx.transform"):
        hae_fx.inspect(family.build())


def test_pruning_hidden_states_before_a_moved_dap_layer_is_refused():
    """`prune_hidden` prunes after `dap_layer`; when `dap_global` moves DAP's reading to a later full-attention
    layer, the plan would not exist yet where the pruning starts."""
    config = HAEConfig(policy="hae", capacity=14, bin_size=4, sinks=2, window=3, dap_layer=1, prune_hidden=True)
    with pytest.raises(hae_fx.HAEConfigError, match=r"prunes the hidden states after layer 1.*reads layer\(s\) \[5\]"):
        hae_fx.HAECache.for_model(BY_NAME["gemma3-text"].build(), config, batch=1)
    hae_fx.HAECache.for_model(BY_NAME["gemma3-text"].build(), config.replace(dap_layer=5), batch=1)


@pytest.mark.parametrize("name, dap_layer, dap_global", [
    ("gemma3-text", 5, True), ("qwen2-window", 1, True), ("gemma3-text", 0, False), ("gemma3-text", 1, True),
    ("aya-vision", 3, True), ("llava-onevision", 1, True), ("janus", 1, True), ("gemma3-vlm", 5, True),
    ("paligemma-prefix-lm", 1, True), ("gemma3-text-wide", 5, True)])
def test_hae_matches_the_oracle(name, dap_layer, dap_global):
    """`hae` evicts from the global layers only, scores from their attention only, and sliding layers keep their
    window: kept sets, bins, tokens and logits equal the eager oracle's at every step. A sliding `dap_layer` is
    replaced by the next full-attention layer (gemma3-text's 1 by 5), or with `dap_global=False` prunes by its own
    windowed prefill attention (gemma3-text's 0); on the VLMs DAP prunes the image, reading the layer's own mask
    (Gemma 3's bidirectional image blocks, PaliGemma's prefix-LM prefix). gemma3-text-wide's window is longer than
    the capacity, and `full_windows` keeps it whole."""
    from hae_fx.cache import binned_positions
    from tests.hae_oracle import run_hae_oracle

    family = BY_NAME[name]
    reference = family.build(attn_implementation="eager")
    inputs = family.inputs(1)
    inputs.pop("attention_mask")
    fields = dict(capacity=14, bin_size=4, sinks=2, window=3, dap_layer=dap_layer, dap_global=dap_global)
    config = HAEConfig(policy="hae", **fields, full_windows=family is GEMMA3_TEXT_WIDE)
    model = _transformed(family, config, reference)
    steps = []

    class Record(StoppingCriteria):  # a stopping criterion sees each step's cache; Janus drops logits processors
        def __call__(self, input_ids, scores, **kwargs):
            steps.append((kept_positions(cache)[0], binned_positions(cache)[0]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    cache = hae_fx.HAECache.for_model(model, config, batch=1)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=40, do_sample=False,
                         return_dict_in_generate=True, output_logits=True,
                         stopping_criteria=StoppingCriteriaList([Record()]))
    oracle = run_hae_oracle(reference, inputs, new_tokens=40, r=0.0015, alpha=0.0005, **fields)
    assert [kept for kept, _ in steps] == oracle.kept
    assert [binned for _, binned in steps] == oracle.binned
    assert out.sequences[0, inputs["input_ids"].shape[1]:].tolist() == oracle.tokens
    torch.testing.assert_close(torch.cat(out.logits), oracle.logits, atol=1e-4, rtol=1e-4)
