"""Inductor decompositions of the hae ops, so they fuse and AOTI packages need no Python op at load time."""

from __future__ import annotations

import torch
from torch._inductor import decomposition as inductor_decomposition

from hae_fx.kv_quant import dequantize_rows
from hae_fx.ops.merge_write import merge_prefix
from hae_fx.ops.prefill_plan import plan_prefill
from hae_fx.ops.slot_attention import run_slot_attention
from hae_fx.ops.slot_write import write_prefix, write_slots

_registered = False


def register_inductor_decompositions() -> None:
    """Register the decompositions in Inductor's global table (idempotent).

    Inductor caches that table (`fast_random_decomps`), so the cache is cleared too: a compile that already ran
    in this process would otherwise keep the opaque ops.
    """
    global _registered
    if _registered:
        return

    @inductor_decomposition.register_decomposition(torch.ops.hae.slot_write_.default)
    def _slot_write(k_cache, v_cache, k, v, slot, k_scale, v_scale):
        write_slots(k_cache, v_cache, k, v, slot, k_scale, v_scale)

    @inductor_decomposition.register_decomposition(torch.ops.hae.prefill_write_.default)
    def _prefill_write(k_cache, v_cache, k, v, keep, kept, k_scale, v_scale):
        write_prefix(k_cache, v_cache, k, v, keep, kept, k_scale, v_scale)

    @inductor_decomposition.register_decomposition(torch.ops.hae.prefill_merge_write_.default)
    def _prefill_merge_write(k_cache, v_cache, k, v, keep, kept, token_pos):
        merge_prefix(k_cache, v_cache, k, v, keep, kept, token_pos)

    @inductor_decomposition.register_decomposition(torch.ops.hae.prefill_plan_.default)
    def _prefill_plan(*args, **kwargs):
        plan_prefill(*args, **kwargs)

    # On CUDA, functionalization has normally traced these ops into the Triton kernels before this table is read
    # (slot_attention.py); where it has not, the Triton op stays one extern call
    @inductor_decomposition.register_decomposition(torch.ops.hae.slot_attention.default)
    def _slot_attention(q, k_cache, v_cache, slot_pos, scale, k_scale=None, v_scale=None):
        return run_slot_attention(q, k_cache, v_cache, slot_pos, scale, need_weight=True, k_scale=k_scale,
                                  v_scale=v_scale)

    @inductor_decomposition.register_decomposition(torch.ops.hae.slot_attention_no_weight.default)
    def _slot_attention_no_weight(q, k_cache, v_cache, slot_pos, scale, k_scale=None, v_scale=None):
        return run_slot_attention(q, k_cache, v_cache, slot_pos, scale, need_weight=False, k_scale=k_scale,
                                  v_scale=v_scale)[0]

    @inductor_decomposition.register_decomposition(torch.ops.hae.dequantize_slots.default)
    def _dequantize_slots(cache, scales, dtype):
        return dequantize_rows(cache, scales, dtype)

    inductor_decomposition.fast_random_decomps.cache_clear()
    _registered = True
