"""Eviction composed with quantization: torchao-quantized weights through hae_fx, and quantized K/V slots.

Weights: models quantized with `torchao.quantization.quantize_` (int8 and float8 weight-only; int4 weight-only needs
CUDA in torchao 0.18) go through `hae_fx.transform` in either order: `full` reproduces the quantized model's own HF
static-cache tokens, and an evicting policy keeps the oracle's set.

KV (`kv_dtype`): the slot writes quantize exactly as torchao's symmetric affine quantization does; attention over
quantized slots stays within a stated tolerance of float attention; memory is what `nbytes` says; and generation
equals an independent oracle: HF's eager model whose cache stores torchao-quantized keys and values. torchao is
required here (the `quant` extra), so a missing install fails these tests instead of skipping them.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quant_primitives, quantize_
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)
from transformers.cache_utils import Cache, DynamicLayer

import hae_fx
from hae_fx.cache import kept_positions
from hae_fx.errors import HAEConfigError, HAESiteError
from hae_fx.models.llava import tiny_llava
from hae_fx.ops.slot_attention import attend_slots
from hae_fx.passes import rewrite_attention
from hae_fx.slots import CacheRole
from tests.conftest import llava_inputs
from tests.families import BY_NAME
from tests.oracle import run_oracle
from tests.test_streaming import RecordKept

#: torchao's symmetric range for each 8-bit KV dtype, matching `hae_fx.kv_quant`'s
QUANT_RANGES = {"int8": (torch.int8, -127, 127), "float8_e4m3fn": (torch.float8_e4m3fn, -448.0, 448.0)}
NEW_TOKENS = 12
#: relative error (Frobenius) of attention over quantized slots against float slots, random N(0, 1) K/V. Per
#: element the int8 error is at most scale / 2 = amax / 254, about 0.4% of a row's largest entry; e4m3's 3
#: mantissa bits give up to 1/16 relative per element. Measured over 5 seeds: 0.7-0.9% (int8), 2.9-3.3% (e4m3);
#: the bounds leave headroom for other seeds
ATTENTION_TOLERANCE = {"int8": 0.015, "float8_e4m3fn": 0.06}


def torchao_fake_quantize(x: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """`x` quantized per row of its last dim with torchao's primitives and dequantized back to its dtype."""
    dtype, low, high = QUANT_RANGES[kv_dtype]
    block = (1,) * (x.dim() - 1) + (x.shape[-1],)
    rows = x.to(torch.float32)
    if kv_dtype == "float8_e4m3fn":
        scale = quant_primitives._choose_scale_float8(rows, block_size=list(block), float8_dtype=dtype)
        quantized = quant_primitives._quantize_affine_float8(rows, scale, dtype)
        return quant_primitives._dequantize_affine_float8(quantized, scale, torch.float32).to(x.dtype)
    scale, zero_point = choose_qparams_affine(rows, MappingType.SYMMETRIC, block, dtype, quant_min=low,
                                              quant_max=high, scale_dtype=torch.float32,
                                              eps=torch.finfo(torch.float32).smallest_normal)
    quantized = quantize_affine(rows, block, scale, zero_point, dtype, quant_min=low, quant_max=high)
    return dequantize_affine(quantized, block, scale, zero_point, dtype, quant_min=low, quant_max=high,
                             output_dtype=torch.float32).to(x.dtype)


class FakeQuantizedLayer(DynamicLayer):
    """A `DynamicCache` layer that stores keys and values torchao-quantized: prefill attends over the fresh prompt
    keys (what it returns), every decode step over the stored, quantized ones, its own token included."""

    kv_dtype = "int8"

    def update(self, key_states, value_states, *args, **kwargs):
        prefill = not self.is_initialized
        keys, values = super().update(torchao_fake_quantize(key_states, self.kv_dtype),
                                      torchao_fake_quantize(value_states, self.kv_dtype), *args, **kwargs)
        return (key_states, value_states) if prefill else (keys, values)


def _slots(generator: torch.Generator, batch=2, kv_heads=2, capacity=24, head_dim=32):
    k = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    slot_pos = torch.randperm(batch * capacity, generator=generator).view(batch, capacity)
    slot_pos[torch.rand(batch, capacity, generator=generator) < 0.25] = -1
    return k, v, slot_pos


def _quantized_cache(k: torch.Tensor, v: torch.Tensor, kv_dtype: str):
    """Write `k`, `v` into fresh quantized slot buffers with `hae::slot_write_`; returns them and their scales."""
    dtype = QUANT_RANGES[kv_dtype][0]
    batch, heads, capacity, _ = k.shape
    k_cache, v_cache = torch.zeros(k.shape, dtype=dtype), torch.zeros(v.shape, dtype=dtype)
    k_scale, v_scale = torch.zeros(batch, heads, capacity, 1), torch.zeros(batch, heads, capacity, 1)
    order = torch.stack([torch.randperm(capacity) for _ in range(batch)])  # written in this order, to slot c
    rows = order.view(batch, 1, capacity, 1).expand_as(k)
    torch.ops.hae.slot_write_(k_cache, v_cache, k.gather(2, rows), v.gather(2, rows), order,
                              k_scale=k_scale, v_scale=v_scale)
    return k_cache, v_cache, k_scale, v_scale


# -- KV: the quantized slots -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_quantized_slot_write_is_torchaos_symmetric_quantization(kv_dtype):
    k, v, _ = _slots(torch.Generator().manual_seed(0))
    k_cache, v_cache, k_scale, v_scale = _quantized_cache(k * 5, v, kv_dtype)
    for cache, scales, original in ((k_cache, k_scale, k * 5), (v_cache, v_scale, v)):
        torch.testing.assert_close(cache.to(torch.float32) * scales, torchao_fake_quantize(original, kv_dtype),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("need_weight", [True, False])
def test_attention_over_quantized_slots_is_close_to_float(kv_dtype, need_weight):
    generator = torch.Generator().manual_seed(1)
    k, v, slot_pos = _slots(generator)
    q = torch.randn(2, 4, 3, 32, generator=generator)
    k_cache, v_cache, k_scale, v_scale = _quantized_cache(k, v, kv_dtype)
    op = torch.ops.hae.slot_attention if need_weight else torch.ops.hae.slot_attention_no_weight
    result = op(q, k_cache, v_cache, slot_pos, 32 ** -0.5, k_scale=k_scale, v_scale=v_scale)
    out = result[0] if need_weight else result
    float_out, float_weight = attend_slots(q, k, v, slot_pos, 32 ** -0.5)
    assert ((out - float_out).norm() / float_out.norm()).item() <= ATTENTION_TOLERANCE[kv_dtype]
    # exactly the attention over the dequantized slots
    exact_out, exact_weight = attend_slots(q, torchao_fake_quantize(k, kv_dtype), torchao_fake_quantize(v, kv_dtype),
                                           slot_pos, 32 ** -0.5)
    torch.testing.assert_close(out, exact_out, rtol=1e-5, atol=1e-6)
    if need_weight:
        torch.testing.assert_close(result[1], exact_weight, rtol=1e-5, atol=1e-6)
        assert torch.all(result[1][slot_pos < 0] == 0)
        assert ((result[1] - float_weight).norm() / float_weight.norm()).item() <= ATTENTION_TOLERANCE[kv_dtype]


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck_quantized_ops(layout):
    k, v, slot_pos = _slots(torch.Generator().manual_seed(2), capacity=8, head_dim=16)
    k_cache, v_cache, k_scale, v_scale = _quantized_cache(k, v, "int8")
    q = torch.randn(2, 4, 3, 16) if layout == "contiguous" else torch.randn(2, 3, 4, 16).transpose(1, 2)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    torch.library.opcheck(torch.ops.hae.slot_attention.default, (q, k_cache, v_cache, slot_pos, 0.25), scales)
    torch.library.opcheck(torch.ops.hae.slot_attention_no_weight.default, (q, k_cache, v_cache, slot_pos, 0.25),
                          scales)
    new = torch.randn(2, 3, 2, 16).transpose(1, 2) if layout == "permuted" else torch.randn(2, 2, 3, 16)
    slot = torch.tensor([[5, 0, 7], [1, 2, 6]])
    torch.library.opcheck(torch.ops.hae.slot_write_.default, (k_cache, v_cache, new, new * 2, slot), scales)
    torch.library.opcheck(torch.ops.hae.dequantize_slots.default, (k_cache, k_scale, torch.bfloat16))


def test_kv_dtype_is_validated():
    with pytest.raises(HAEConfigError, match=r"HAEConfig.kv_dtype must be one of \(None, 'int8', 'float8_e4m3fn'\), "
                                             r"got 'int4'"):
        hae_fx.HAEConfig(kv_dtype="int4")
    with pytest.raises(HAEConfigError, match=r"StreamingConfig.kv_dtype must be one of"):
        hae_fx.HAEConfig(policy="streaming", kv_dtype=torch.int8)


@pytest.mark.parametrize(("model_dtype", "kv_dtype"), [(torch.bfloat16, "int8"), (torch.float32, "int8"),
                                                         (torch.bfloat16, "float8_e4m3fn")])
def test_nbytes_counts_8_bit_values_and_scales(model_dtype, kv_dtype):
    """LLaVA-1.5-7B's attention geometry (32 KV heads of dim 128), 2 of its layers: per token and layer, int8 K and V
    take 2 * 32 * (128 + 4) bytes against 2 * 32 * 128 * 2 in bf16: 51.6% (the fp32 scales are the 1.6%), 25.8%
    against fp32."""
    shape = {"num_layers": 2, "batch": 2, "kv_heads": 32, "head_dim": 128, "dtype": model_dtype, "device": "cpu"}
    config = hae_fx.HAEConfig(policy="streaming", capacity=64, sinks=2, window=4)
    plain = hae_fx.HAECache(config, **shape)
    quantized = hae_fx.HAECache(config.replace(kv_dtype=kv_dtype), **shape)
    element = torch.finfo(model_dtype).bits // 8
    assert plain.kv_nbytes == 2 * 2 * 2 * 32 * 64 * 128 * element
    assert quantized.kv_nbytes == 2 * 2 * 2 * 32 * 64 * (128 + 4)
    assert quantized.kv_bytes_per_token == 2 * 2 * 2 * 32 * (128 + 4)  # layers, batch, K and V, heads
    assert quantized.kv_nbytes / plain.kv_nbytes == pytest.approx((128 + 4) / (128 * element))
    assert plain.nbytes - quantized.nbytes == plain.kv_nbytes - quantized.kv_nbytes  # the slot metadata is the same
    assert quantized.layers[0].keys.dtype == QUANT_RANGES[kv_dtype][0]
    summary = hae_fx.report(quantized)
    assert summary.kv_bytes == quantized.kv_nbytes and summary.kv_dtype == kv_dtype
    assert f"({kv_dtype} values + scales)" in str(summary)


# -- KV: generation ----------------------------------------------------------------------------------------------
def _quantized_oracle(reference, inputs, kv_dtype: str, policy: str, capacity: int, sinks: int, new_tokens: int):
    layer = type("Layer", (FakeQuantizedLayer,), {"kv_dtype": kv_dtype})
    return run_oracle(reference, inputs, policy=policy, capacity=capacity, sinks=sinks, new_tokens=new_tokens,
                      cache=Cache(layer_class_to_replicate=layer))


@pytest.mark.parametrize("kv_dtype", ["int8", "float8_e4m3fn"])
def test_full_with_quantized_kv_equals_quantized_cache_oracle_and_is_close_to_float(kv_dtype):
    """Tokens equal the oracle whose cache holds torchao-quantized K/V; logits stay close to float KV's. Tokens are
    not asserted against float KV: a tiny random model's top logits are close enough for 8-bit noise to flip one."""
    reference = tiny_llava(seed=2)
    model = hae_fx.transform(tiny_llava(seed=2), hae_fx.HAEConfig(policy="full", capacity=64, kv_dtype=kv_dtype),
                             options={"hae.compiler": "eager"})
    inputs = llava_inputs(reference, 1, seed=2)
    inputs.pop("attention_mask")
    tokens, _, oracle_logits = _quantized_oracle(reference, inputs, kv_dtype, "full", 64, 0, NEW_TOKENS)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences[:, inputs["input_ids"].shape[1]:].tolist() == tokens
    torch.testing.assert_close(torch.cat(out.logits), oracle_logits, rtol=1e-4, atol=1e-4)

    float_tokens, _, float_logits = run_oracle(reference, inputs, policy="full", capacity=64, sinks=0,
                                               new_tokens=NEW_TOKENS)
    # the same tokens as float KV up to the first difference; there, the logits differ by 8-bit noise only
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens[0], float_tokens[0], strict=True)) if a != b),
                      NEW_TOKENS)
    diff = (oracle_logits[:first_diff + 1] - float_logits[:first_diff + 1]).abs().max()
    assert diff <= ATTENTION_TOLERANCE[kv_dtype] * float_logits.abs().max()


def test_streaming_with_int8_kv_keeps_the_oracles_set_and_tokens():
    config = hae_fx.HAEConfig(policy="streaming", capacity=12, sinks=2, window=4, kv_dtype="int8")
    reference = tiny_llava(seed=1)
    model = hae_fx.transform(tiny_llava(seed=1), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(reference, 1, seed=1)
    inputs.pop("attention_mask")
    tokens, kept, _ = _quantized_oracle(reference, inputs, "int8", "streaming", 12, 2, 30)
    recorder = RecordKept()
    recorder.cache = hae_fx.HAECache.for_model(model, config, batch=1)
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False, past_key_values=recorder.cache,
                         logits_processor=[recorder])
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == tokens
    assert recorder.kept == kept


# -- weights: torchao-quantized models through hae_fx ------------------------------------------------------------
def _quantized_llava(seed: int, weights) -> torch.nn.Module:
    model = tiny_llava(seed=seed)
    quantize_(model, weights)
    return model


@pytest.mark.parametrize(("weights", "order"), [(Int8WeightOnlyConfig(), "transform_then_quantize"),
                                                (Float8WeightOnlyConfig(), "quantize_then_transform")])
def test_quantized_weights_full_tokens_equal_hf_static_cache(weights, order):
    reference = _quantized_llava(0, weights)
    config = hae_fx.HAEConfig(policy="full", capacity=64)
    if order == "quantize_then_transform":
        model = hae_fx.transform(_quantized_llava(0, weights), config, options={"hae.compiler": "eager"})
    else:
        model = hae_fx.transform(tiny_llava(seed=0), config, options={"hae.compiler": "eager"})
        quantize_(model, weights)
    assert type(model.model.language_model.layers[0].self_attn.q_proj.weight) is \
        type(reference.model.language_model.layers[0].self_attn.q_proj.weight)
    inputs = llava_inputs(reference, 2)
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == expected.tolist()
    assert model.hae_graphs["decode"][0].report.layers == (0, 1)


def test_int8_weights_with_streaming_keep_the_oracles_set():
    config = hae_fx.HAEConfig(policy="streaming", capacity=12, sinks=2, window=4)
    reference = _quantized_llava(1, Int8WeightOnlyConfig())
    model = hae_fx.transform(_quantized_llava(1, Int8WeightOnlyConfig()), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(reference, 1, seed=1)
    inputs.pop("attention_mask")
    tokens, kept, _ = run_oracle(reference, inputs, policy="streaming", capacity=12, sinks=2, new_tokens=30)
    recorder = RecordKept()
    recorder.cache = hae_fx.HAECache.for_model(model, config, batch=1)
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False, past_key_values=recorder.cache,
                         logits_processor=[recorder])
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == tokens
    assert recorder.kept == kept
    assert kept_positions(recorder.cache)[0] == kept[-1]


# -- compiled with Inductor ----------------------------------------------------------------------------------------
def test_int8_weights_compile_with_inductor_and_equal_hf_static_cache(dynamo_counters):
    reference = _quantized_llava(0, Int8WeightOnlyConfig())
    model = hae_fx.transform(_quantized_llava(0, Int8WeightOnlyConfig()), hae_fx.HAEConfig(policy="full",
                                                                                             capacity=64))
    inputs = llava_inputs(reference, 2)
    expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    dynamo_counters.clear()
    assert model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == expected.tolist()
    assert dynamo_counters["graph_break"] == {}
    assert len(model.hae_graphs["decode"]) == 1


def test_int8_kv_with_int8_weights_compiles_once_and_equals_the_eager_reference(dynamo_counters):
    """An evicting, score-reading policy (`h2o`) over int8 slots and int8 weights: Inductor's tokens and kept set
    equal the eager-reference path's (whose ops the tests above check against the oracle); one decode graph,
    compiled once, no graph break; the dequantized slots never reach the compiled graph."""
    config = hae_fx.HAEConfig(policy="h2o", capacity=24, sinks=2, window=4, kv_dtype="int8")
    inputs = llava_inputs(tiny_llava(seed=0), 2)
    runs = {}
    for compiler in ("eager", "inductor"):
        model = hae_fx.transform(_quantized_llava(0, Int8WeightOnlyConfig()), config,
                                 options={"hae.compiler": compiler})
        dynamo_counters.clear()
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False, return_dict_in_generate=True)
        runs[compiler] = (out.sequences.tolist(), kept_positions(out.past_key_values))
        (decode,) = model.hae_graphs["decode"]
        assert "hae.dequantize_slots" not in decode.op_counts
        assert decode.op_counts["hae.slot_attention.default"] == 2
    assert dynamo_counters["graph_break"] == {}
    assert dynamo_counters["stats"]["unique_graphs"] == 2  # one prefill graph, one decode graph
    assert runs["inductor"] == runs["eager"]
    assert all(len(kept) == 24 for kept in runs["eager"][1])


def test_windowed_rings_with_int8_kv_equal_the_quantized_cache_oracle():
    """Gemma 3's sliding layers keep int8 rings, its global layer an int8 streaming set: tokens and logits equal the
    oracle whose cache holds torchao-quantized K/V (sliding layers masked to their window)."""
    family = BY_NAME["gemma3-text"]
    reference = family.build()
    inputs = family.inputs(1)
    inputs.pop("attention_mask")
    config = hae_fx.HAEConfig(policy="streaming", capacity=10, sinks=2, window=3, kv_dtype="int8")
    model = hae_fx.transform(family.build(), config, options={"hae.compiler": "eager"})
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    tokens, kept, logits = _quantized_oracle(reference, inputs, "int8", "streaming", 10, 2, 24)
    assert out.sequences[:, inputs["input_ids"].shape[1]:].tolist() == tokens
    torch.testing.assert_close(torch.cat(out.logits), logits, atol=1e-4, rtol=1e-4)
    assert kept_positions(out.past_key_values) == [kept[-1]]
    assert all(layer.keys.dtype == torch.int8 and layer.key_scales is not None for layer in out.past_key_values.layers)


def test_dequantized_slots_read_by_an_unrecognised_op_are_refused():
    """A quantized cache's slots reach the model through `hae::dequantize_slots`; anything but a recognised attention
    reading them would attend with the wrong mask, so the rewrite refuses it."""
    graph = torch.fx.Graph()
    keys, scales = graph.placeholder("keys"), graph.placeholder("key_scales")
    dequantized = graph.call_function(torch.ops.hae.dequantize_slots.default, (keys, scales, torch.float32))
    graph.output(graph.call_function(torch.sum, (dequantized,)))
    roles = {keys: CacheRole("keys", 0), scales: CacheRole("key_scales", 0)}
    with pytest.raises(HAESiteError, match=r"cache keys of layer 0 are read by .*sum"):
        rewrite_attention(torch.fx.GraphModule(torch.nn.Module(), graph), roles)


def test_prompt_graph_is_compiled_without_the_tuning_torchao_turns_on(monkeypatch):
    """torchao's `quantize_` turns coordinate-descent tuning on process-wide; the prompt graph, run once per request,
    is compiled without it (`ONCE_PER_REQUEST_INDUCTOR`), the decode graph keeps the process's setting, and an option
    the caller passes wins over both."""
    transform_module = importlib.import_module("hae_fx.transform")  # `hae_fx.transform` is the function
    compiled_with: list[dict] = []
    backend = transform_module.hae_backend

    def recording_backend(gm, example_inputs, **kwargs):
        compiled_with.append(dict(kwargs["options"] or {}))
        return backend(gm, example_inputs, **kwargs)

    monkeypatch.setattr(transform_module, "hae_backend", recording_backend)
    inputs = llava_inputs(tiny_llava(seed=0), 1)
    with torch._inductor.config.patch(coordinate_descent_tuning=False):
        _quantized_llava(0, Int8WeightOnlyConfig())
        assert torch._inductor.config.coordinate_descent_tuning  # torchao's set_inductor_config=True default
        for options in ({"hae.compiler": "eager"}, {"hae.compiler": "eager", "coordinate_descent_tuning": True}):
            compiled_with.clear()
            transformed = hae_fx.transform(_quantized_llava(0, Int8WeightOnlyConfig()),
                                           hae_fx.HAEConfig(policy="full", capacity=64), options=options)
            transformed.generate(**inputs, max_new_tokens=3, do_sample=False)
            prefill, decode = compiled_with
            assert prefill["coordinate_descent_tuning"] is options.get("coordinate_descent_tuning", False)
            assert decode == options
