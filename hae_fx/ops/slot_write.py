"""`hae::slot_write_`: write new keys and values into chosen slots of fixed-capacity K/V buffers.

Integer-index `index_put_` is the one cache write Inductor re-inplaces and fuses (`scatter_` would copy the
whole cache every step), and integer indices keep CUDA graphs legal (boolean ones call `nonzero`).

Quantized caches (`PolicyConfig.kv_dtype`) pass their per-slot scale buffers (`k_scale`, `v_scale`,
`[B, Hkv, C, 1]` fp32): the write quantizes the new rows (`hae_fx.kv_quant`) and writes values and scales to the
same slots.
"""

from __future__ import annotations

import torch

from hae_fx.kv_quant import quantize_rows


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """`k_cache[b, :, slot[b, t]] = k[b, :, t]` (same for values), in place, for every `b`, `t`; with per-head slots
    (`slot` `[B, Hkv, T]`), `k_cache[b, h, slot[b, h, t]] = k[b, h, t]`. Quantized, with the scales written
    alongside, when scale buffers are given."""
    batch_index = torch.arange(k.shape[0], device=k.device).view(-1, 1, 1)
    head_index = torch.arange(k.shape[1], device=k.device).view(1, -1, 1)
    index = (batch_index, head_index, slot if slot.dim() == 3 else slot.unsqueeze(1))
    for cache, scales, rows in ((k_cache, k_scale, k), (v_cache, v_scale, v)):
        if scales is None:
            cache.index_put_(index, rows.to(cache.dtype))
        else:
            quantized, scale = quantize_rows(rows, cache.dtype)
            cache.index_put_(index, quantized)
            scales.index_put_(index, scale)


@torch.library.custom_op("hae::slot_write_", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def slot_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Write `k`, `v` (`[B, Hkv, T, D]`) into slots `slot` (`[B, T]` int64, or `[B, Hkv, T]`: a slot per KV head) of
    `k_cache`, `v_cache` (`[B, Hkv, C, D]`), quantized when the cache's scale buffers `k_scale`, `v_scale` are
    given (None: unquantized).

    The scales have no default on purpose: torch 2.11 drops defaulted trailing arguments before its
    in-place-version kernel indexes the mutated ones by position (an IndexError in every compiled prefill there)."""
    write_slots(k_cache, v_cache, k, v, slot, k_scale, v_scale)


@slot_write_.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor,
      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    return None


def write_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 keep: torch.Tensor, kept: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Slots `0..K-1` take the tokens `keep[:, :K]` of `k`, `v` (prompt indices; `keep[:, h, :K]` for KV head `h`
    when `keep` is per head, `[B, Hkv, C]`), in place; `K = kept.shape[1]`."""
    batch, kv_heads, _, head_dim = k.shape
    kept_len = kept.shape[1]
    index = keep[..., :kept_len].view(batch, -1, kept_len, 1).expand(batch, kv_heads, kept_len, head_dim)
    slots = torch.arange(kept_len, device=k.device).expand(batch, kept_len)
    write_slots(k_cache, v_cache, k.gather(2, index), v.gather(2, index), slots, k_scale, v_scale)


# flexible_layout: the op reads any strides, and without the tag Inductor records the inputs' eager strides and
# re-traces the functionalized op with them, which fails its node-count check when the prompt length is symbolic
@torch.library.custom_op("hae::prefill_write_", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"),
                         tags=(torch.Tag.flexible_layout,))
def prefill_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keep: torch.Tensor, kept: torch.Tensor, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None) -> None:
    """Write the prompt tokens a policy kept into the first slots: slot `i` takes token `keep[b, i]` of `k`, `v`
    (`[B, Hkv, T, D]`) for `i < K` (token `keep[b, h, i]` in head `h` for a per-head `keep`). One op per layer, so
    the DAP pass can defer a layer's write as a whole until the keep set (`keep`, an `HAECache.prefill_keep`
    buffer) is decided. Quantized like `slot_write_`, and its scales have no default for the same reason.

    `kept` is an empty `[0, K]` tensor whose width is the number of kept tokens: a length passed as a tensor
    dimension stays symbolic in a prefill graph compiled for every prompt length, where an int argument breaks
    Inductor's decomposition of the functionalized op."""
    write_prefix(k_cache, v_cache, k, v, keep, kept, k_scale, v_scale)


@prefill_write_.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
      kept: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    return None
