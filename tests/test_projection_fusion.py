"""Projection fusion: `transform` packs q/k/v and gate/up weights into one storage per group without adding weight
bytes, the compiled graphs run each group as one matmul, and the results equal the unfused graphs bit for bit (fp32,
CPU). Quantized (tensor-subclass) weights are left alone; a parameter replaced after compiling is refused, never read
through a stale packed layout."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_

import hae_fx
from hae_fx.errors import HAEWeightLayoutError
from hae_fx.models.llava import tiny_llava
from hae_fx.passes import fuse_projections
from tests.conftest import llava_inputs
from tests.families import BY_NAME

NEW_TOKENS = 6
EAGER = {"hae.compiler": "eager"}


def _storages(model: nn.Module) -> dict[int, int]:
    """Every parameter storage of `model`: data pointer -> bytes."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}


def _linear_calls(record) -> int:
    return record.op_counts["linear"]


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)


@pytest.fixture(scope="module")
def llava_runs():
    """Tiny LLaVA under `hae` (DAP at prefill, the recycle bin at decode), fused and unfused, eager-compiler path."""
    runs = {}
    inputs = llava_inputs(tiny_llava(seed=0), 2)
    config = hae_fx.HAEConfig(policy="hae", capacity=20, bin_size=4, sinks=2, window=4)
    for fuse in (True, False):
        model = hae_fx.transform(tiny_llava(seed=0), config, options=EAGER, fuse_projections=fuse)
        runs[fuse] = (model, _generate(model, inputs))
    return runs


def test_packing_adds_no_weight_bytes_and_keeps_the_values():
    model, reference = tiny_llava(seed=0), tiny_llava(seed=0)
    before = _storages(model)
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=64), options=EAGER)
    after = _storages(model)
    assert sum(after.values()) == sum(before.values())
    layers = model.model.language_model.layers
    assert len(after) == len(before) - len(layers) * (3 + 1)  # q, k, v, o -> 1 storage; gate, up -> 1
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        q, k, v = attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight
        assert k.data_ptr() == q.data_ptr() + q.nbytes and v.data_ptr() == k.data_ptr() + k.nbytes
        assert mlp.up_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr() + mlp.gate_proj.weight.nbytes
        assert mlp.down_proj.weight.untyped_storage().nbytes() == mlp.down_proj.weight.nbytes  # reads another input
    for (name, packed), (_, original) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(packed, original), name
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_a_packed_model_saves_and_reloads(tmp_path):
    """Weights that view one storage save with `save_pretrained` (safetensors refuses overlapping tensors only)."""
    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=64), options=EAGER)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for (name, saved), (_, original) in zip(reloaded.state_dict().items(), tiny_llava(seed=0).state_dict().items(),
                                            strict=True):
        assert torch.equal(saved, original), name


def test_each_group_is_one_matmul_and_tokens_and_logits_equal_unfused(llava_runs):
    (fused_model, fused), (plain_model, plain) = llava_runs[True], llava_runs[False]
    assert fused.sequences.tolist() == plain.sequences.tolist()
    assert torch.equal(torch.stack(fused.logits), torch.stack(plain.logits))
    layers = fused_model.config.text_config.num_hidden_layers
    text = fused_model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    qkv_rows = (text.num_attention_heads + 2 * text.num_key_value_heads) * head_dim
    for phase in ("prefill", "decode"):
        (record,), (plain_record,) = fused_model.hae_graphs[phase], plain_model.hae_graphs[phase]
        assert plain_record.fused_projections == ()
        assert sorted(sum(group.rows) for group in record.fused_projections) == \
            sorted([qkv_rows] * layers + [2 * text.intermediate_size] * layers)
        # per layer: q, k, v -> one linear, gate, up -> one
        assert _linear_calls(record) == _linear_calls(plain_record) - 3 * layers
        assert record.op_counts["as_strided"] == 2 * layers


def test_text_family_with_projection_biases_equals_unfused():
    """Qwen2's q/k/v carry biases: they are packed and fused with the weights."""
    family = BY_NAME["qwen2"]
    inputs = family.inputs(2)
    runs = {}
    for fuse in (True, False):
        model = hae_fx.transform(family.build(), hae_fx.HAEConfig(policy="full", capacity=64), options=EAGER,
                                 fuse_projections=fuse)
        runs[fuse] = (model, _generate(model, inputs))
    (model, fused), (_, plain) = runs[True], runs[False]
    assert fused.sequences.tolist() == plain.sequences.tolist()
    assert torch.equal(torch.stack(fused.logits), torch.stack(plain.logits))
    groups = model.hae_graphs["decode"][0].fused_projections
    assert sorted(group.bias for group in groups) == [False] * 4 + [True] * 4  # gate/up, q/k/v of 4 layers
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.bias.data_ptr() == attention.q_proj.bias.data_ptr() + attention.q_proj.bias.nbytes


@pytest.mark.parametrize("order", ["quantize_then_transform", "transform_then_quantize"])
def test_torchao_int8_weights_are_left_alone(order, caplog):
    inputs = llava_inputs(tiny_llava(seed=0), 1)
    config = hae_fx.HAEConfig(policy="full", capacity=64)
    outputs = []
    for fuse in (True, False):
        model = tiny_llava(seed=0)
        with caplog.at_level(logging.INFO, logger="hae_fx"):
            if order == "quantize_then_transform":
                quantize_(model, Int8WeightOnlyConfig())
                hae_fx.transform(model, config, options=EAGER, fuse_projections=fuse)
            else:
                hae_fx.transform(model, config, options=EAGER, fuse_projections=fuse)
                quantize_(model, Int8WeightOnlyConfig())
            outputs.append(_generate(model, inputs))
        assert all(record.fused_projections == () for records in model.hae_graphs.values() for record in records)
    expected = "keep separate weights" if order == "quantize_then_transform" else "tensor-subclass weights"
    assert expected in caplog.text
    assert outputs[0].sequences.tolist() == outputs[1].sequences.tolist()
    assert torch.equal(torch.stack(outputs[0].logits), torch.stack(outputs[1].logits))


def test_a_parameter_replaced_after_compiling_is_refused():
    """Dynamo reuses a graph when a parameter is replaced by another of the same shape; the fused graph would read the
    old packed rows, so the backend's layout check refuses the call."""
    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=64), options=EAGER)
    inputs = llava_inputs(model, 1)
    _generate(model, inputs)
    attention = model.model.language_model.layers[0].self_attn
    packed = attention.k_proj.weight
    attention.k_proj.weight = nn.Parameter(packed.detach().clone())  # the same values in a storage of its own
    try:
        with pytest.raises(HAEWeightLayoutError, match="one matmul over their packed storage"):
            _generate(model, inputs)
    finally:
        attention.k_proj.weight = packed


def test_the_backend_option_turns_the_pass_off():
    """`"hae.fuse_projections": False` leaves the linears over packed weights as they are."""
    model = hae_fx.transform(tiny_llava(seed=0), hae_fx.HAEConfig(policy="full", capacity=64),
                             options={**EAGER, "hae.fuse_projections": False})
    attention = model.model.language_model.layers[0].self_attn
    assert attention.k_proj.weight.data_ptr() == attention.q_proj.weight.data_ptr() + attention.q_proj.weight.nbytes
    _generate(model, llava_inputs(model, 1))
    assert all(record.fused_projections == () for records in model.hae_graphs.values() for record in records)


class _Attention(nn.Module):
    """q, k, v packed behind the output projection: the fused run starts inside the storage, with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.o = nn.Linear(16, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        for attribute in ("weight", "bias"):
            tensors = [getattr(linear, attribute) for linear in (self.o, self.q, self.k, self.v)]
            packed, start = torch.cat([t.detach() for t in tensors]), 0
            for linear, tensor in zip((self.o, self.q, self.k, self.v), tensors, strict=True):
                setattr(linear, attribute, nn.Parameter(packed[start:start + tensor.shape[0]]))
                start += tensor.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(q * torch.cat([k, v], dim=-1))


def test_inductor_reads_a_run_that_starts_inside_the_storage():
    """Inductor lowers the packed weight to a view of the first weight's input buffer at its own offset: the compiled
    module equals the eager one (and runs one matmul for q, k, v)."""
    from torch._inductor.compile_fx import compile_fx

    module, fused = _Attention().eval(), []

    def backend(gm, example_inputs):
        fused.extend(fuse_projections(gm, example_inputs))
        return compile_fx(gm, example_inputs)

    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        compiled = torch.compile(module, backend=backend, fullgraph=True)(x)
        expected = module(x)
    assert [group.rows for group in fused] == [(16, 8, 8)] and fused[0].bias
    torch.testing.assert_close(compiled, expected)  # rows read from the wrong place would be off by O(1)
