"""Quantized K/V slots: the storage format behind `PolicyConfig.kv_dtype`.

A quantized layer stores each slot's key (and value) as `D` 8-bit numbers plus one fp32 scale per slot and KV
head, `[B, Hkv, C, 1]`: symmetric, no zero point, `x ~= q * scale` with `scale = amax(|x|) / qmax` over the
head dim. Per slot, because tokens are written one at a time and never requantized (a scale shared across slots
would have to grow as louder tokens arrive); per head, because head magnitudes differ by orders. The scale
costs 4 bytes per `D` values, 3% at `D = 128`.

The rounding matches torchao's: for int8 its symmetric affine quantization (`choose_qparams_affine` with
`quant_min=-127, quant_max=127`, then `quantize_affine`), for float8 its row-wise float8 scaling
(`_choose_scale_float8`, `_quantize_affine_float8`). It is written here in plain torch, so that the cache does not
need torchao at run time; the tests check the two agree bit for bit.

Attention never needs the dequantized cache: with one scale per slot, `q . (s k) = s (q . k)` and
`sum_c p_c (s_c v_c) = sum_c (p_c s_c) v_c`, so the fused kernel applies the scales to the logits and the
probabilities (`hae_fx.ops.slot_attention_kernel`); the reference multiplies them back in.
"""

from __future__ import annotations

import torch

from hae_fx.errors import HAEConfigError

#: `PolicyConfig.kv_dtype` values: storage dtype and the largest magnitude it represents (None keeps the model's
#: dtype, unquantized)
KV_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "float8_e4m3fn": (torch.float8_e4m3fn, 448.0),
}
QUANTIZED_DTYPES = tuple(dtype for dtype, _ in KV_DTYPES.values())


def storage_dtype(kv_dtype: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's K/V slot buffers under `kv_dtype`."""
    if kv_dtype is None:
        return model_dtype
    if kv_dtype not in KV_DTYPES:
        raise HAEConfigError(f"kv_dtype must be one of {(None, *KV_DTYPES)}, got {kv_dtype!r}")
    return KV_DTYPES[kv_dtype][0]


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QUANTIZED_DTYPES


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, scale)` with `q` of `dtype` shaped like `x` and `scale` fp32 `[..., 1]`, one per row of the last dim."""
    qmax = next(limit for stored, limit in KV_DTYPES.values() if stored == dtype)
    x = x.to(torch.float32)
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=torch.finfo(torch.float32).smallest_normal)
    if dtype == torch.int8:
        return (x * (1.0 / scale)).round().clamp(-qmax, qmax).to(dtype), scale
    return (x / scale).clamp(-qmax, qmax).to(dtype), scale  # the cast rounds to the nearest float8


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q * scale` in `dtype` (computed in fp32)."""
    return (q.to(torch.float32) * scale).to(dtype)
