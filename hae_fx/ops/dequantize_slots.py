"""`hae::dequantize_slots`: a quantized K/V slot buffer as the model's dtype, for the model's own attention to trace.

A quantized `HAECache` (`PolicyConfig.kv_dtype`) returns this op's output from its decode `update`, so the model's
attention code sees float keys and values of the usual shape. The rewrite pass (`hae_fx.passes.rewrite`) replaces
that attention with `hae::slot_attention` over the quantized buffers and their scales, and the dequantized copy
is then unused and dropped: no step materialises it. An attention the passes do not recognise would leave it in
the graph, which the rewrite refuses.
"""

from __future__ import annotations

import torch

from hae_fx.kv_quant import dequantize_rows


@torch.library.custom_op("hae::dequantize_slots", mutates_args=())
def dequantize_slots(cache: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`cache` (`[B, Hkv, C, D]`, 8-bit) times `scales` (`[B, Hkv, C, 1]` fp32), in `dtype`."""
    return dequantize_rows(cache, scales, dtype)


@dequantize_slots.register_fake
def _(cache: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(cache.shape, dtype=dtype, device=cache.device)
