"""`hae::slot_write_`: write new keys and values into chosen slots of fixed-capacity K/V buffers.

Integer-index `index_put_` is the one cache write Inductor re-inplaces and fuses (`scatter_` would copy the
whole cache every step), and integer indices keep CUDA graphs legal (boolean ones call `nonzero`).
"""

from __future__ import annotations

import torch


def write_slots(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot: torch.Tensor) -> None:
    """`k_cache[b, :, slot[b, t]] = k[b, :, t]` (same for values), in place, for every `b`, `t`."""
    batch_index = torch.arange(k.shape[0], device=k.device).view(-1, 1, 1)
    head_index = torch.arange(k.shape[1], device=k.device).view(1, -1, 1)
    slot_index = slot.unsqueeze(1)
    k_cache.index_put_((batch_index, head_index, slot_index), k.to(k_cache.dtype))
    v_cache.index_put_((batch_index, head_index, slot_index), v.to(v_cache.dtype))


@torch.library.custom_op("hae::slot_write_", mutates_args=("k_cache", "v_cache"))
def slot_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot: torch.Tensor) -> None:
    """Write `k`, `v` (`[B, Hkv, T, D]`) into slots `slot` (`[B, T]` int64) of `k_cache`, `v_cache`
    (`[B, Hkv, C, D]`)."""
    write_slots(k_cache, v_cache, k, v, slot)


@slot_write_.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor) -> None:
    return None


def write_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 keep: torch.Tensor, kept: torch.Tensor) -> None:
    """Slots `0..K-1` take the tokens `keep[:, :K]` of `k`, `v` (prompt indices), in place; `K = kept.shape[1]`."""
    batch, kv_heads, _, head_dim = k.shape
    kept_len = kept.shape[1]
    index = keep[:, :kept_len].view(batch, 1, kept_len, 1).expand(batch, kv_heads, kept_len, head_dim)
    slots = torch.arange(kept_len, device=k.device).expand(batch, kept_len)
    write_slots(k_cache, v_cache, k.gather(2, index), v.gather(2, index), slots)


# flexible_layout: the op reads any strides, and without the tag Inductor records the inputs' eager strides and
# re-traces the functionalized op with them, which fails its node-count check when the prompt length is symbolic
@torch.library.custom_op("hae::prefill_write_", mutates_args=("k_cache", "v_cache"), tags=(torch.Tag.flexible_layout,))
def prefill_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   keep: torch.Tensor, kept: torch.Tensor) -> None:
    """Write the prompt tokens a policy kept into the first slots: slot `i` takes token `keep[b, i]` of `k`, `v`
    (`[B, Hkv, T, D]`) for `i < K`. One op per layer, so the DAP pass can defer a layer's write as a whole
    until the keep set (`keep`, an `HAECache.prefill_keep` buffer) is decided.

    `kept` is an empty `[0, K]` tensor whose width is the number of kept tokens: a length passed as a tensor
    dimension stays symbolic in a prefill graph compiled for every prompt length, where an int argument breaks
    Inductor's decomposition of the functionalized op."""
    write_prefix(k_cache, v_cache, k, v, keep, kept)


@prefill_write_.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
      kept: torch.Tensor) -> None:
    return None
