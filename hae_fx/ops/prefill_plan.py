"""`hae::prefill_plan_`: a policy's prefill decision (which prompt tokens each slot keeps), as one graph node.

`HAECache` emits it during prefill: at layer 0 for a policy that reads no attention, else at the last layer of
`Policy.prefill_layers`, with those layers' keys and no queries (a cache's `update` sees keys, never queries). The
backend's plan pass (`hae_fx.passes.plan`) then finds those layers' attention, wires their queries and scales in,
and moves the node after the last of them, together with the cache writes of the layers up to it, which must wait
for the keep set. One node makes that move a single, checkable graph edit.

The policy travels as its config's JSON key (`PolicyConfig.key`): custom op arguments cannot be Python objects.
"""

from __future__ import annotations

import torch

from hae_fx.errors import HAESiteError
from hae_fx.modality import TEXT
from hae_fx.policies import policy_from_key
from hae_fx.policies.base import NEVER_KEEP, Prompt, SlotState, fill_prefix
from hae_fx.tensor_parallel import mean_over_ranks


def mean_attention(query: torch.Tensor, key: torch.Tensor, token_pos: torch.Tensor, scale: float | torch.Tensor,
                   window: int = 0, chunk: int = 0, mask: torch.Tensor | None = None,
                   per_kv_head: bool = False) -> torch.Tensor:
    """`[B, T, T]` softmax attention (query, key) averaged over query heads (`[B, Hkv, T, T]`, averaged over each
    KV head's query heads, with `per_kv_head`), causal over each sequence's real tokens (padding query rows are
    zero), in float32 (policies compare shares of order 1e-3 against thresholds).

    The layer's own mask applies when the plan pass found one (`mask`, boolean or additive, broadcastable to
    `[B, Hq, T, T]`: HF's, with its windows, chunks, bidirectional image blocks and prefix-LM prefixes), over the
    real keys. Without one the attention is causal within the layer's span: a sliding layer's query sees the last
    `window` positions (itself included), a chunked layer's query the earlier positions of its chunk of `chunk`.

    Args:
        query: `[B, Hq, T, D]` (after RoPE), key: `[B, Hkv, T, D]` with `Hq` a multiple of `Hkv`.
        token_pos: `[B, T]` logical positions, -1 for padding.
        scale: the softmax scale, or `[B, T]`, one per query row (`Policy.prefill_score_scale`).
        window, chunk: the layer's sliding window or attention chunk in positions; 0 when it has none.
        mask: the mask the layer's attention applied, or None.
    """
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.to(torch.float32).reshape(batch, kv_heads, (q_heads // kv_heads) * length, head_dim)
    logits = torch.matmul(grouped, key.to(torch.float32).transpose(-1, -2))
    logits = logits.view(batch, q_heads, length, length)
    logits = logits * (scale.view(batch, 1, length, 1) if isinstance(scale, torch.Tensor) else scale)
    valid = token_pos >= 0
    lowest = torch.finfo(torch.float32).min
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, lowest)
        else:
            logits = logits + mask.to(torch.float32)
        # padding keys out; clamped so that a query row with no key left (padding) stays finite
        logits = logits.masked_fill(~valid.view(batch, 1, 1, length), lowest).clamp_min(lowest)
        return _head_mean(torch.softmax(logits, dim=-1), valid, kv_heads if per_kv_head else None)
    query_pos, key_pos = token_pos.unsqueeze(2), token_pos.unsqueeze(1)
    causal = (key_pos <= query_pos) & valid.unsqueeze(1)
    if window > 0:
        causal = causal & (query_pos - key_pos < window)
    if chunk > 0:
        causal = causal & (query_pos.div(chunk, rounding_mode="floor") == key_pos.div(chunk, rounding_mode="floor"))
    logits = logits.masked_fill(~causal.unsqueeze(1), torch.finfo(torch.float32).min)
    # a padding query attends to nothing: its row is zero (not the uniform row an all-masked softmax gives), so
    # policies that sum over every query row count real queries only
    return _head_mean(torch.softmax(logits, dim=-1), valid, kv_heads if per_kv_head else None)


def _head_mean(probs: torch.Tensor, valid: torch.Tensor, kv_heads: int | None) -> torch.Tensor:
    """`probs` (`[B, Hq, T, T]`) averaged over every query head, or over each of `kv_heads` groups of them, with
    padding query rows zeroed."""
    if kv_heads is None:
        return probs.mean(dim=1) * valid.unsqueeze(-1)
    return probs.unflatten(1, (kv_heads, -1)).mean(dim=2) * valid.view(valid.shape[0], 1, -1, 1)


@torch.library.custom_op("hae::prefill_plan_",
                         mutates_args=("slot_pos", "score", "modality", "seen", "prefill_keep", "extras"))
def prefill_plan_(queries: list[torch.Tensor | None], keys: list[torch.Tensor], values: list[torch.Tensor],
                  scales: list[float], windows: list[int], chunks: list[int], masks: list[torch.Tensor | None],
                  token_pos: torch.Tensor, token_modality: torch.Tensor, slot_pos: torch.Tensor, score: torch.Tensor,
                  modality: torch.Tensor, seen: torch.Tensor, prefill_keep: torch.Tensor, extras: list[torch.Tensor],
                  kept: torch.Tensor, config: str, group: int = 0, groups: int = 1, tp_group: str = "",
                  tp_degree: int = 1) -> None:
    """Decide the prompt's keep set and write it to the slot metadata and `prefill_keep` (see `plan_prefill`).

    `queries`/`keys`/`values`/`scales`: per layer the policy reads, that layer's attention query `[B, Hq, T, D]`,
    keys (after RoPE) and values `[B, Hkv, T, D]`, and softmax scale; `windows`/`chunks`: that layer's sliding
    window or attention chunk (0: none), and the mask its attention applied (None: causal), so the plan reads the
    attention the layer computes. `kept`: an empty `[0, K]` tensor whose width is the number of prompt tokens kept
    (a tensor dimension stays symbolic in the one prefill graph for every prompt length; an int argument breaks
    Inductor's decomposition of the functionalized op). `config`: the policy config's key. `group`, `groups`: the
    slot group planned and the cache's number of groups (`Prompt.group`). `tp_group`, `tp_degree`: under tensor
    parallelism, the process group across whose ranks the head-averaged attention is averaged before the policy
    reads it, so every rank keeps the same tokens (`hae_fx.tensor_parallel`); "" in one process."""
    plan_prefill(queries, keys, values, scales, windows, chunks, masks, token_pos, token_modality, slot_pos, score,
                 modality, seen, prefill_keep, extras, kept, config, group, groups, tp_group, tp_degree)


@prefill_plan_.register_fake
def _(queries, keys, values, scales, windows, chunks, masks, token_pos, token_modality, slot_pos, score, modality,
      seen, prefill_keep, extras, kept, config, group=0, groups=1, tp_group="", tp_degree=1) -> None:
    return None


def plan_prefill(queries, keys, values, scales, windows, chunks, masks, token_pos, token_modality, slot_pos, score,
                 modality, seen, prefill_keep, extras, kept, config, group=0, groups=1, tp_group="",
                 tp_degree=1) -> None:
    """The op's reference implementation, shared with its Inductor decomposition.

    The policy ranks the prompt tokens; the `kept_len = kept.shape[1]` highest (equal priorities: the lower position
    first) go to slots `0..kept_len-1` in position order, padding first (left-padded, so the last prompt token is in
    slot `kept_len - 1`); `prefill_keep[b, i]` is the prompt index that slot `i` holds.
    """
    if any(query is None for query in queries):
        raise HAESiteError(
            "hae::prefill_plan_ has no query: the hae backend's plan pass supplies the attention queries of the "
            "layers the policy reads. Run the model through hae_fx.transform (or torch.compile(backend='hae')), "
            "not eagerly"
        )
    policy = policy_from_key(config)
    extra_names = [*policy.extra_buffers(), *policy.cache_buffers()]
    state = SlotState(slot_pos=slot_pos, score=score, modality=modality, seen=seen,
                      extras=dict(zip(extra_names, extras, strict=True)))
    prompt = Prompt(token_pos=token_pos, modality=token_modality, values=tuple(values), group=group, groups=groups,
                    cache_buffers={name: state.extras[name] for name in policy.cache_buffers()})
    row_scales = [policy.prefill_score_scale(prompt, k.shape[-1]) for k in keys]
    attention = [mean_attention(q, k, token_pos, scale if row_scale is None else row_scale, window, chunk, mask,
                                per_kv_head=policy.head_axis)
                 for q, k, scale, row_scale, window, chunk, mask
                 in zip(queries, keys, scales, row_scales, windows, chunks, masks, strict=True)]
    if tp_group:
        attention = [mean_over_ranks(layer, tp_group, tp_degree) for layer in attention]
    priority, token_score, *initial = policy.prefill_priority(prompt, attention)
    kept_len = kept.shape[1]
    slot_dim = priority.dim() - 1  # 2 for a policy ranking per KV head ([B, Hkv, T]), else 1
    if slot_dim == 2:
        token_pos, token_modality = (t.unsqueeze(1).expand_as(priority) for t in (token_pos, token_modality))

    # highest first, ties to the lower index (so the lower position): a stable sort, where topk's order is unspecified
    ranked_priority, ranked = priority.sort(dim=-1, descending=True, stable=True)
    ranked_priority, ranked = ranked_priority[..., :kept_len], ranked[..., :kept_len]
    ranked_valid = ranked_priority > NEVER_KEEP
    ranked_pos = torch.where(ranked_valid, token_pos.gather(-1, ranked), -1)
    kept_pos, order = ranked_pos.sort(dim=-1, stable=True)  # padding (-1) first, then by position
    keep = ranked.gather(-1, order)
    kept = kept_pos >= 0

    prefill_keep[..., :kept_len].copy_(keep)
    fill_prefix(slot_pos, kept_pos, -1, slot_dim)
    fill_prefix(modality, torch.where(kept, token_modality.gather(-1, keep), TEXT).to(modality.dtype), 0, slot_dim)
    fill_prefix(score, torch.where(kept, token_score.gather(-1, keep), 0.0), 0, slot_dim)
    for name, per_token in (initial[0] if initial else {}).items():
        trailing = per_token.shape[2:]
        index = keep.view(*keep.shape, *[1] * len(trailing)).expand(*keep.shape, *trailing)
        kept_here = kept.view(*kept.shape, *[1] * len(trailing))
        fill_prefix(state.extras[name], torch.where(kept_here, per_token.gather(1, index), 0), 0)
    policy.after_prefill(state, rank=order, kept=kept)
    seen.copy_(prompt.seen.squeeze(-1))
