"""`hae::slot_attention`: attention of new queries over every slot of a fixed-capacity cache.

Slots hold tokens in whatever order eviction left them, so validity comes from the slot metadata (`slot_pos`,
-1 = free), not from a causal mask over indices. Several queries are a chunk the cache has just written (a
follow-up turn, `hae_fx.turns`): the last is the newest position, and each query sees the slots up to its own
position. The op also returns how much attention each slot received (mean over query heads, summed over queries):
the score that H2O-style and HAE policies accumulate; `hae::slot_attention_no_weight` is the same attention without
that output, for policies that read no scores.

On CUDA both ops run `hae::slot_attention_fused` (Triton, `slot_attention_kernel.py`): eagerly, and under
Inductor and AOTInductor traced into its kernels; elsewhere, and for shapes the kernel does not take, they run
`attend_slots`.

Quantized caches (`PolicyConfig.kv_dtype`) pass 8-bit `k_cache`, `v_cache` with their per-slot scales `k_scale`,
`v_scale` (`[B, Hkv, C, 1]` fp32): the reference dequantizes them, the kernel folds the scales into the logits
and probabilities (`hae_fx.kv_quant` says why that is exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch._functorch.config
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.export._trace import custom_triton_ops_decomposition_disabled

from hae_fx.kv_quant import dequantize_rows

#: what the fused kernel takes: these dtypes, head dims up to this
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_MAX_HEAD_DIM = 256
#: quantized slot dtypes the fused kernel reads (with scales)
FUSED_QUANTIZED_DTYPES = (torch.int8,)


#: True while `reference_attention()` is active
_reference_only = False


@contextlib.contextmanager
def reference_attention() -> Iterator[None]:
    """Run the reference math (`attend_slots`) in place of the fused Triton kernel while active: for debugging and
    measurements (is a difference the kernel's, or the graph's around it?).

    `uses_fused_kernel` decides when a graph is traced, so the compile (the first generate of a transformed model)
    must happen inside the block, and the graphs keep their choice afterwards. AOTAutograd's compile cache is off
    while active: it keys a graph as it was before the op was traced, which does not show this switch, and could
    hand back a graph compiled with the kernel (Inductor's FX graph cache keys the traced graph, which does).
    """
    global _reference_only
    previous = _reference_only
    _reference_only = True
    try:
        with torch._functorch.config.patch(enable_autograd_cache=False):
            yield
    finally:
        _reference_only = previous


def _as_query_dtype(cache: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return cache.to(dtype) if scales is None else dequantize_rows(cache, scales, dtype)


def attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                 scale: float, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference math shared by the eager implementation and the Inductor decomposition."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    grouped_q = q.reshape(batch, kv_heads, group * q_len, head_dim)
    keys = _as_query_dtype(k_cache, k_scale, q.dtype)
    logits = torch.matmul(grouped_q, keys.transpose(-1, -2)).to(torch.float32) * scale
    index_sets = slot_pos.view(batch, -1, capacity)  # one index set ([B, C]) or one per KV head ([B, Hkv, C])
    valid = (index_sets >= 0).unsqueeze(2)  # [B, sets, 1, C]
    if q_len > 1:  # a chunk just written (hae_fx.turns): query i is at the newest position - (q_len - 1 - i)
        newest = index_sets.amax(dim=-1, keepdim=True)  # [B, sets, 1]
        query_pos = newest - (q_len - 1) + torch.arange(q_len, device=q.device)  # [B, sets, q_len]
        causal = index_sets.unsqueeze(2) <= query_pos.unsqueeze(3)  # [B, sets, q_len, C]
        valid = valid & causal.repeat(1, 1, group, 1)  # grouped_q's rows are (query head, query) pairs
    logits = logits.masked_fill(~valid, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.to(q.dtype), _as_query_dtype(v_cache, v_scale, q.dtype))
    out = out.reshape(batch, q_heads, q_len, head_dim)
    slot_weight = probs.sum(dim=2).sum(dim=1) / q_heads if slot_pos.dim() == 2 else probs.sum(dim=2) / group
    return out, slot_weight


def _fused_slot_dtype(cache: torch.Tensor, scales: torch.Tensor | None) -> bool:
    return cache.dtype in (FUSED_DTYPES if scales is None else FUSED_QUANTIZED_DTYPES)


def uses_fused_kernel(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> bool:
    """Whether `run_slot_attention` takes the Triton kernel: CUDA tensors, static shapes (a symbolic size would
    specialise the launch grid; such graphs keep the reference math), supported dtype and head dim, one query per
    sequence (a chunk's causal mask is the reference's); never inside `reference_attention()`."""
    return (not _reference_only and q.device.type == "cuda" and hasattr(torch.ops.hae, "slot_attention_fused")
            and all(isinstance(n, int) for n in (*q.shape, *k_cache.shape))
            and q.dtype in FUSED_DTYPES and _fused_slot_dtype(k_cache, k_scale) and _fused_slot_dtype(v_cache, v_scale)
            and q.shape[-1] <= FUSED_MAX_HEAD_DIM and q.shape[2] == 1)


def run_slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                       scale: float, need_weight: bool, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both ops' implementation and decomposition: the fused kernel where it applies, else the reference.
    Returns `(out contiguous, slot_weight or None)`."""
    if uses_fused_kernel(q, k_cache, v_cache, k_scale, v_scale):
        out, slot_weight = torch.ops.hae.slot_attention_fused(q, k_cache, v_cache, slot_pos, scale, need_weight,
                                                              k_scale, v_scale)
        return out, slot_weight if need_weight else None
    out, slot_weight = attend_slots(q, k_cache, v_cache, slot_pos, scale, k_scale, v_scale)
    return out.contiguous(), slot_weight if need_weight else None


@torch.library.custom_op("hae::slot_attention", mutates_args=())
def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                   scale: float, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of `q` (`[B, Hq, T, D]`) over the valid slots of `k_cache`, `v_cache` (`[B, Hkv, C, D]`;
    8-bit with their scales `k_scale`, `v_scale` for a quantized cache). `slot_pos` is `[B, C]` (one index set for
    every head) or `[B, Hkv, C]` (each KV head's own slots, `Policy.head_axis`).

    Grouped-query attention is handled here (`Hq` a multiple of `Hkv`), so callers pass the cache itself, not a
    head-repeated copy. Returns `(out [B, Hq, T, D] contiguous, slot_weight float32)`: `slot_weight` is `[B, C]`
    (mean over query heads), or `[B, Hkv, C]` for per-head `slot_pos` (mean over each KV head's query heads), summed
    over queries.
    """
    return run_slot_attention(q, k_cache, v_cache, slot_pos, scale, need_weight=True, k_scale=k_scale,
                              v_scale=v_scale)


@slot_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
      scale: float, k_scale: torch.Tensor | None = None,
      v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(q.shape)  # contiguous, like the reference
    slot_weight = q.new_empty(slot_pos.shape, dtype=torch.float32)
    return out, slot_weight


@torch.library.custom_op("hae::slot_attention_no_weight", mutates_args=())
def slot_attention_no_weight(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                             scale: float, k_scale: torch.Tensor | None = None,
                             v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`hae::slot_attention`'s first output alone. Its own op because a fused kernel cannot drop an unused
    output the way Inductor drops unused reference math: the kernel then skips the logits and weight pass."""
    out, _ = run_slot_attention(q, k_cache, v_cache, slot_pos, scale, need_weight=False, k_scale=k_scale,
                                v_scale=v_scale)
    return out


@slot_attention_no_weight.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
      scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return q.new_empty(q.shape)


def _trace_into_fused_kernel(need_weight: bool):
    """A FunctionalTensorMode rule for an attention op: on CUDA, trace into `hae::slot_attention_fused`.

    Why: Inductor applies its decomposition table below functionalization, where a Triton op stays an opaque
    call (an extern kernel launched from Python, and a Python op an AOTInductor package would need at load
    time). Under functionalization the Triton op instead decomposes into its kernels, which Inductor compiles
    into its own code. `torch.export` keeps the hae op as one node, as it keeps Triton ops (the same switch);
    AOTInductor's own tracing of an exported program does decompose, so the package holds the kernels.
    """
    def rule(mode, op, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented
        bound = dict(zip((a.name for a in op._schema.arguments), args, strict=False), **kwargs)
        q, k_cache, v_cache, slot_pos, scale = (bound[n] for n in ("q", "k_cache", "v_cache", "slot_pos", "scale"))
        k_scale, v_scale = bound.get("k_scale"), bound.get("v_scale")
        if custom_triton_ops_decomposition_disabled() or not uses_fused_kernel(q, k_cache, v_cache, k_scale, v_scale):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            out, slot_weight = torch.ops.hae.slot_attention_fused(q, k_cache, v_cache, slot_pos, scale,
                                                                  need_weight, k_scale, v_scale)
        return (out, slot_weight) if need_weight else out
    return rule


slot_attention.register_torch_dispatch(FunctionalTensorMode, _trace_into_fused_kernel(need_weight=True))
slot_attention_no_weight.register_torch_dispatch(FunctionalTensorMode, _trace_into_fused_kernel(need_weight=False))
