"""`hae::prefill_merge_write_`: `hae::prefill_write_`, with the prompt tokens the plan dropped merged into the kept
ones (LOOK-M's merging): a dropped token's key and value are averaged into the kept token whose key is most
cosine-similar, per KV head, instead of being lost.

Per sequence and KV head: every dropped (real, not kept) token finds its most similar kept key (ties to the lower
slot); it is merged when that similarity is at least the mean of the dropped tokens' best similarities. A kept
token's new key (value) is the mean of its own and those merged into it. Static shapes throughout: similarities
are a `[T, K]` matrix, assignments a one-hot matmul.
"""

from __future__ import annotations

import torch

from hae_fx.ops.slot_write import write_slots
from hae_fx.policies.base import argmax_first


def merge_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 keep: torch.Tensor, kept: torch.Tensor, token_pos: torch.Tensor) -> None:
    """The op's reference implementation, shared with its Inductor decomposition (`kept`: as `prefill_write_`'s)."""
    batch, kv_heads, length, head_dim = k.shape
    kept_len = kept.shape[1]
    kept_index = keep[:, :kept_len]
    kept_real = token_pos.gather(1, kept_index) >= 0  # [B, K]
    is_kept = torch.zeros_like(token_pos, dtype=torch.bool).scatter(1, kept_index, kept_real)
    dropped = ((token_pos >= 0) & ~is_kept).unsqueeze(1)  # [B, 1, T]
    index = kept_index.view(batch, 1, kept_len, 1).expand(batch, kv_heads, kept_len, head_dim)
    keys, values = k.to(torch.float32), v.to(torch.float32)
    kept_keys, kept_values = keys.gather(2, index), values.gather(2, index)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    similarity = unit @ unit.gather(2, index).transpose(-1, -2)  # [B, Hkv, T, K]
    similarity = similarity.masked_fill(~kept_real.view(batch, 1, 1, kept_len), -torch.inf)
    best, target = similarity.amax(dim=-1), argmax_first(similarity)  # first maximum: the lower slot
    best = torch.where(dropped, best, 0.0)
    threshold = best.sum(dim=-1, keepdim=True) / dropped.sum(dim=-1, keepdim=True).clamp_min(1)
    merged = dropped & (best >= threshold)
    one_hot = target.unsqueeze(-1) == torch.arange(kept_len, device=k.device)  # [B, Hkv, T, K]
    assign = one_hot.to(torch.float32) * merged.unsqueeze(-1)
    counts = 1 + assign.sum(dim=2).unsqueeze(-1)  # [B, Hkv, K, 1]
    merged_keys = (kept_keys + assign.transpose(-1, -2) @ keys) / counts
    merged_values = (kept_values + assign.transpose(-1, -2) @ values) / counts
    slots = torch.arange(kept_len, device=k.device).expand(batch, kept_len)
    write_slots(k_cache, v_cache, merged_keys, merged_values, slots)


# flexible_layout, as `hae::prefill_write_`: the prompt length is symbolic in the prefill graph
@torch.library.custom_op("hae::prefill_merge_write_", mutates_args=("k_cache", "v_cache"),
                         tags=(torch.Tag.flexible_layout,))
def prefill_merge_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         keep: torch.Tensor, kept: torch.Tensor, token_pos: torch.Tensor) -> None:
    """Write the kept prompt tokens into the first slots as `hae::prefill_write_` does (its first six arguments,
    in its order, so the plan pass defers it alike), each merged with the dropped tokens most similar to it;
    `token_pos` (`[B, T]`, -1 for padding) tells real tokens."""
    merge_prefix(k_cache, v_cache, k, v, keep, kept, token_pos)


@prefill_merge_write_.register_fake
def _(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
      kept: torch.Tensor, token_pos: torch.Tensor) -> None:
    return None
