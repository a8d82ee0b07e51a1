"""`hae::slot_attention`: attention of new queries over every slot of a fixed-capacity cache.

Slots hold tokens in whatever order eviction left them, so validity comes from the slot metadata (`slot_pos`,
-1 = free), not from a causal mask over indices. The op also returns how much attention each slot received
(mean over query heads, summed over queries): the score that H2O-style and HAE policies accumulate.
"""

from __future__ import annotations

import torch


def attend_slots(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference math shared by the eager implementation and the Inductor decomposition."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    grouped_q = q.reshape(batch, kv_heads, group * q_len, head_dim)
    logits = torch.matmul(grouped_q, k_cache.to(q.dtype).transpose(-1, -2)).to(torch.float32) * scale
    valid = (slot_pos >= 0).view(batch, 1, 1, capacity)
    logits = logits.masked_fill(~valid, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.to(q.dtype), v_cache.to(q.dtype))
    out = out.reshape(batch, q_heads, q_len, head_dim)
    slot_weight = probs.sum(dim=2).sum(dim=1) / q_heads
    return out, slot_weight


@torch.library.custom_op("hae::slot_attention", mutates_args=())
def slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of `q` (`[B, Hq, T, D]`) over the valid slots of `k_cache`, `v_cache` (`[B, Hkv, C, D]`).

    Grouped-query attention is handled here (`Hq` a multiple of `Hkv`), so callers pass the cache itself, not a
    head-repeated copy. Returns `(out [B, Hq, T, D] contiguous, slot_weight [B, C] float32)`.
    """
    out, slot_weight = attend_slots(q, k_cache, v_cache, slot_pos, scale)
    return out.contiguous(), slot_weight


@slot_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(q.shape)  # contiguous, like the reference
    slot_weight = q.new_empty((q.shape[0], k_cache.shape[2]), dtype=torch.float32)
    return out, slot_weight
