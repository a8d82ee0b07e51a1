"""The fused slot-attention kernel (`hae::slot_attention_fused`) against the reference math, without a GPU.

CI has no GPU, so the kernel runs in Triton's CPU interpreter (`TRITON_INTERPRET=1`, read when the kernels are
defined, hence a child process), at small shapes that still cover every path: several slot splits and one, one query
row and many (several row blocks), padded head dims, permuted queries, a row with no valid slot and the variant
without weights, in fp32 and fp16, per-head slot positions (`[B, Hkv, C]`), and int8 slots with per-slot scales
(quantized caches). The interpreter computes bf16 dots wrongly (Triton 3.9), so bf16 is checked on the GPU only
(`benchmarks/attention_kernel.py`). A second test checks what Inductor and AOTInductor receive on CUDA: the kernels,
not an opaque op.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hae_fx  # noqa: F401  (registers the ops)
from hae_fx.kv_quant import dequantize_rows, quantize_rows
from hae_fx.ops.slot_attention import attend_slots, uses_fused_kernel

pytest.importorskip("triton")

#: batch, q heads, kv heads, query tokens, capacity, head dim, dtype, variant, launch overrides
CASES = [
    (1, 4, 2, 1, 100, 16, "float32", "", {}),  # 4 splits on the interpreter's 4 "multiprocessors"
    (4, 4, 2, 1, 40, 16, "float32", "", {}),  # one split
    (2, 4, 2, 1, 100, 16, "float32", "", {"splits": 7}),
    (1, 2, 2, 1, 70, 32, "float32", "", {}),  # one query row, padded to a 16-row tile
    (1, 72, 1, 1, 40, 16, "float32", "", {}),  # 72 rows: two row blocks
    (2, 18, 2, 1, 50, 24, "float32", "permuted", {}),  # head dim padded to 32
    (2, 4, 2, 1, 100, 16, "float32", "no_valid_slot", {}),
    (2, 4, 2, 1, 100, 16, "float16", "", {}),
    (1, 4, 2, 1, 100, 16, "float32", "int8", {}),  # int8 slots, 4 splits
    (2, 24, 2, 1, 50, 24, "float16", "int8", {"splits": 1}),
    (2, 4, 2, 1, 100, 16, "float32", "per_head", {}),  # each KV head masks by its own slots (MadaKV), 4 splits
    (2, 18, 2, 1, 50, 24, "float32", "per_head", {"splits": 1}),
]
TOLERANCE = {"float32": 1e-5, "float16": 1e-2}

_CHILD = textwrap.dedent("""
    import sys
    import torch
    import hae_fx
    from hae_fx.ops.slot_attention_kernel import launch_slot_attention
    from torch._library.triton import set_wrap_triton_enabled

    cases = torch.load(sys.argv[1])
    results = []
    for (q, k, v, slot_pos, scale, *slot_scales), overrides in cases:
        if overrides:
            with set_wrap_triton_enabled(False):
                weighted = launch_slot_attention(q, k, v, slot_pos, scale, True, *slot_scales, **overrides)
                plain = launch_slot_attention(q, k, v, slot_pos, scale, False, *slot_scales, **overrides)
        else:
            weighted = torch.ops.hae.slot_attention_fused(q, k, v, slot_pos, scale, True, *slot_scales)
            plain = torch.ops.hae.slot_attention_fused(q, k, v, slot_pos, scale, False, *slot_scales)
        results.append((weighted, plain))
    torch.save(results, sys.argv[2])
""")


def _inputs(batch, q_heads, kv_heads, q_len, capacity, head_dim, dtype, variant, generator):
    dtype = getattr(torch, dtype)
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=generator).to(dtype)
    if variant == "permuted":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(dtype)
    heads = (kv_heads,) if variant == "per_head" else ()
    slot_pos = torch.randperm(batch * math.prod(heads) * capacity, generator=generator).view(batch, *heads, capacity)
    slot_pos[torch.rand(slot_pos.shape, generator=generator) < 0.3] = -1
    if variant == "no_valid_slot":
        slot_pos[0] = -1
    if variant == "int8":
        (k, k_scale), (v, v_scale) = quantize_rows(k, torch.int8), quantize_rows(v, torch.int8)
        return q, k, v, slot_pos, head_dim ** -0.5, k_scale, v_scale
    return q, k, v, slot_pos, head_dim ** -0.5


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def test_kernel_matches_reference_in_triton_interpreter(tmp_path):
    generator = torch.Generator().manual_seed(0)
    cases = [(_inputs(*case[:8], generator), case[8]) for case in CASES]
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")

    for case, ((q, k, v, slot_pos, scale, *slot_scales), _), ((out, weight), (plain, no_weight)) in zip(
            CASES, cases, results, strict=True):
        if slot_scales:  # the reference over the dequantized slots
            k, v = (dequantize_rows(x, s, torch.float64) for x, s in zip((k, v), slot_scales, strict=True))
        ref_out, ref_weight = attend_slots(q.double(), k.double(), v.double(), slot_pos, scale)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), case
        assert weight.shape == slot_pos.shape and weight.dtype == torch.float32, case
        assert _relative_error(out, ref_out) <= TOLERANCE[case[6]], case
        assert _relative_error(weight, ref_weight) <= 1e-5, case
        assert torch.equal(plain, out) and no_weight.shape == (q.shape[0], 0), case
        if case[7] == "no_valid_slot":  # the reference's uniform weights, not NaN
            torch.testing.assert_close(weight[0], torch.full_like(weight[0], q.shape[2] / slot_pos.shape[1]))
        else:
            assert torch.all(weight[slot_pos < 0] == 0), case


def _traced_graph(model: torch.nn.Module, *, export_switch: bool,
                  slot_dtype: torch.dtype = torch.bfloat16) -> torch.fx.GraphModule:
    """`model`'s graph as AOTInductor traces it (or, with `export_switch`, as torch.export does), for fake CUDA
    tensors: no GPU is needed to trace."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export._trace import _disable_custom_triton_op_functional_decomposition

    with FakeTensorMode():
        args = (torch.empty(2, 4, 1, 16, device="cuda", dtype=torch.bfloat16),
                torch.empty(2, 2, 100, 16, device="cuda", dtype=slot_dtype),
                torch.empty(2, 2, 100, 16, device="cuda", dtype=slot_dtype),
                torch.empty(2, 100, dtype=torch.long, device="cuda"))
        if slot_dtype == torch.int8:
            args += (torch.empty(2, 2, 100, 1, device="cuda"), torch.empty(2, 2, 100, 1, device="cuda"))
        if export_switch:
            with _disable_custom_triton_op_functional_decomposition():
                graph, _ = aot_export_module(torch.fx.symbolic_trace(model), args, trace_joint=False)
        else:
            graph, _ = aot_export_module(torch.fx.symbolic_trace(model), args, trace_joint=False,
                                         decompositions=select_decomp_table())
    return graph


def _traced_ops(model: torch.nn.Module, *, export_switch: bool, slot_dtype: torch.dtype = torch.bfloat16) -> set[str]:
    """The call targets of `_traced_graph`."""
    graph = _traced_graph(model, export_switch=export_switch, slot_dtype=slot_dtype)
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


class _Attention(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, slot_pos):
        out, slot_weight = torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.25)
        return out, slot_weight, torch.ops.hae.slot_attention_no_weight(q, k_cache, v_cache, slot_pos, 0.25)


class _QuantizedAttention(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, slot_pos, k_scale, v_scale):
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        out, slot_weight = torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.25, **scales)
        return out, slot_weight, torch.ops.hae.slot_attention_no_weight(q, k_cache, v_cache, slot_pos, 0.25, **scales)


def test_int8_slots_trace_into_the_kernels_on_cuda():
    compiled = _traced_ops(_QuantizedAttention(), export_switch=False, slot_dtype=torch.int8)
    assert "triton_kernel_wrapper_functional" in compiled
    assert not any(target.startswith("hae.") for target in compiled), compiled


@pytest.mark.parametrize("slot_dtype", [torch.bfloat16, torch.int8])
def test_no_tensor_is_passed_to_two_arguments_of_one_kernel(slot_dtype):
    """Functionalization gives every kernel argument that may be written its own copy, and the copy of the last
    argument replaces the tensor: a tensor passed twice loses the write of the first. On fake tensors the mutation
    analysis cannot run and takes every argument as written, the case where that happens; at these shapes the
    split kernel writes partial results (two splits) that the combine kernel must read back."""
    model = _QuantizedAttention() if slot_dtype == torch.int8 else _Attention()
    graph = _traced_graph(model, export_switch=False, slot_dtype=slot_dtype)
    kernels = [node for node in graph.graph.nodes
               if node.op == "call_function" and "triton_kernel_wrapper_functional" in str(node.target)]
    assert len({node.kwargs["kernel_idx"] for node in kernels}) >= 3  # split, combine, weight
    for node in kernels:
        tensors = [value for value in node.kwargs["kwargs"].values() if isinstance(value, torch.fx.Node)]
        assert len(tensors) == len(set(tensors)), node.kwargs["kwargs"]


def test_cuda_graphs_trace_into_the_kernels_and_export_keeps_the_op():
    compiled = _traced_ops(_Attention(), export_switch=False)
    assert "triton_kernel_wrapper_functional" in compiled
    assert not any(target.startswith("hae.") for target in compiled), compiled
    exported = _traced_ops(_Attention(), export_switch=True)
    assert {"hae.slot_attention.default", "hae.slot_attention_no_weight.default"} <= exported
    assert "triton_kernel_wrapper_functional" not in exported


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_no_weight_op_on_cpu_is_the_reference(layout):
    generator = torch.Generator().manual_seed(1)
    q, k, v, slot_pos, scale = _inputs(2, 4, 2, 3, 20, 16, "float32", layout, generator)
    assert not uses_fused_kernel(q, k, v)
    out = torch.ops.hae.slot_attention_no_weight(q, k, v, slot_pos, scale)
    torch.testing.assert_close(out, attend_slots(q, k, v, slot_pos, scale)[0])
    torch.library.opcheck(torch.ops.hae.slot_attention_no_weight.default, (q, k, v, slot_pos, scale))


def test_reference_attention_switches_the_kernel_off_while_active():
    """The predicate both trace-time choices read (the functionalization rule and the Inductor decomposition);
    tracing the reference math itself on fake CUDA tensors needs a CUDA build of torch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hae_fx.ops.slot_attention import reference_attention

    with FakeTensorMode():
        q = torch.empty(2, 4, 1, 16, device="cuda")
        k = v = torch.empty(2, 2, 100, 16, device="cuda")
        assert uses_fused_kernel(q, k, v)
        with reference_attention():
            assert not uses_fused_kernel(q, k, v)
            assert not torch._functorch.config.enable_autograd_cache  # its key cannot see the switch
        assert uses_fused_kernel(q, k, v)
