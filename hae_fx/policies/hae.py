"""`hae`: Hierarchical Adaptive Eviction. Dual-Attention Pruning at prefill, the DDES recycle bin at decode.

docs/hae.md is the specification; this module is its static-shape implementation. Prefill is planned by
`plan_prefill` (run by `hae::dap_plan_` after layer `dap_layer`'s attention), decode by `HAEPolicy.decode_slot`
(run by the cache at layer 0 of every step). Both work on whole batches at once: per-sequence decisions are
masks and per-row reductions over fixed-size buffers.
"""

from __future__ import annotations

import torch

from hae_fx.config import HAEConfig
from hae_fx.errors import HAEConfigError
from hae_fx.modality import TEXT, VISUAL
from hae_fx.policies.base import MUST_KEEP, NEVER_KEEP, Policy, SlotState, fill_prefix, first_free_slot


class HAEPolicy(Policy):
    """Budget `capacity - bin_size` of active tokens plus a recycle bin of `bin_size`; see docs/hae.md."""

    name = "hae"
    reads_prefill_attention = True

    def validate(self, config: HAEConfig) -> None:
        budget = config.budget
        if config.bin_size > budget:
            raise HAEConfigError(
                f"HAEConfig.bin_size={config.bin_size} is larger than the budget capacity - bin_size = {budget}; "
                f"the bin holds evicted tokens awaiting deletion and may not outgrow the active set: lower bin_size "
                f"or raise capacity to at least {2 * config.bin_size}"
            )
        protected = config.sinks + config.window + 1
        if budget < protected:
            raise HAEConfigError(
                f"HAEConfig.capacity={config.capacity} leaves a budget of capacity - bin_size = {budget} active "
                f"tokens, below sinks + window + 1 = {protected}; raise capacity to at least "
                f"{protected + config.bin_size} or lower sinks, window or bin_size"
            )

    def prefill_kept_len(self, config: HAEConfig, prompt_len: int, real_tokens: list[int],
                         visual_tokens: list[int]) -> int:
        kept = min(prompt_len, config.capacity - 1)  # one slot stays free for the first decode token
        if config.max_visual_keep is not None:
            protected = config.sinks + max(config.window, 1)
            bound = max(n - v + min(v, config.max_visual_keep + protected)
                        for n, v in zip(real_tokens, visual_tokens, strict=True))
            kept = min(kept, max(bound, 1))
        return kept

    def decode_slot(self, config: HAEConfig, state: SlotState) -> torch.Tensor:
        ddes_maintain(config, state)
        return first_free_slot(state.slot_pos)  # DDES always leaves one


# -- prefill: Dual-Attention Pruning ---------------------------------------------------------------------------

def dap_scores(query: torch.Tensor, key: torch.Tensor, token_pos: torch.Tensor, modality: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token DAP statistics from one layer's attention.

    Args:
        query: `[B, Hq, T, D]` (after RoPE), key: `[B, Hkv, T, D]` with `Hq` a multiple of `Hkv`.
        token_pos: `[B, T]` logical positions, -1 for padding. modality: `[B, T]` `TEXT`/`VISUAL`.

    Returns:
        `(total, peak, applies)`: `total[b, j]` and `peak[b, j]` are the sum and max, over the observation
        queries (text after the last visual token; every token when there is none), of the head-averaged
        attention on token `j`; `applies[b]` says whether the dual test applies (visual tokens and
        observation queries both exist).
    """
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    # in float32: the dual test compares shares of order 1e-3 against thresholds
    grouped = query.to(torch.float32).reshape(batch, kv_heads, (q_heads // kv_heads) * length, head_dim)
    logits = torch.matmul(grouped, key.to(torch.float32).transpose(-1, -2)) * scale
    logits = logits.view(batch, q_heads, length, length)
    valid = token_pos >= 0
    causal = (token_pos.unsqueeze(1) <= token_pos.unsqueeze(2)) & valid.unsqueeze(1)
    logits = logits.masked_fill(~causal.unsqueeze(1), torch.finfo(torch.float32).min)
    attention = torch.softmax(logits, dim=-1).mean(dim=1)  # [B, Tq, Tk]

    visual = valid & (modality == VISUAL)
    last_visual = torch.where(visual, token_pos, -1).amax(dim=-1, keepdim=True)
    observers = valid & ~visual & (token_pos > last_visual)
    attention = attention * observers.unsqueeze(-1)
    total = attention.sum(dim=1)
    peak = attention.amax(dim=1)
    applies = visual.any(dim=-1) & observers.any(dim=-1)
    return total, peak, applies


def plan_prefill(query: torch.Tensor, key: torch.Tensor, token_pos: torch.Tensor, token_modality: torch.Tensor,
                 state: SlotState, prefill_keep: torch.Tensor, *, scale: float, kept_len: int, sinks: int,
                 window: int, budget: int, r: float, alpha: float, max_visual_keep: int | None) -> None:
    """Choose the prompt tokens to keep and fill the slot metadata (docs/hae.md, DAP steps 1-5), in place.

    The keyword arguments are the `HAEConfig` fields of the same names (`budget = capacity - bin_size`).
    Kept tokens go to slots `0..kept_len-1` in position order, padding first (left-padded, so the last prompt
    token is in slot `kept_len - 1`); `prefill_keep[b, i]` is the prompt index that slot `i` holds.
    """
    total, peak, applies = dap_scores(query, key, token_pos, token_modality, scale)
    valid = token_pos >= 0
    visual = valid & (token_modality == VISUAL)
    seen = (token_pos.amax(dim=-1, keepdim=True) + 1).clamp_min(0)
    protected = valid & ((token_pos < sinks) | (token_pos >= seen - max(window, 1)))

    share = total / (total * visual).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    evicted = visual & applies.unsqueeze(-1) & (share < r) & (peak < alpha) & ~protected
    if max_visual_keep is not None:
        eligible = visual & ~evicted & ~protected
        evicted = evicted | (eligible & (_descending_rank(total, eligible) >= max_visual_keep))
    survivor = valid & ~evicted

    # Tiers: protected, then text (DAP prunes images, not the prompt's words), then visual; by S0 within a tier.
    text_tier = torch.where(valid, total, 0.0).amax(dim=-1, keepdim=True) + 1.0
    ranked_score = torch.where(visual, total, total + text_tier)
    priority = torch.where(protected, MUST_KEEP, torch.where(survivor, ranked_score, NEVER_KEEP))
    ranked_priority, ranked = priority.topk(kept_len, dim=-1)  # highest first: the first `budget` are active
    ranked_valid = ranked_priority > NEVER_KEEP
    ranked_in_bin = ranked_valid & (torch.arange(kept_len, device=ranked.device) >= budget)
    ranked_pos = torch.where(ranked_valid, token_pos.gather(1, ranked), -1)
    kept_pos, order = ranked_pos.sort(dim=-1, stable=True)  # padding (-1) first, then by position
    keep = ranked.gather(1, order)
    kept = kept_pos >= 0

    prefill_keep[:, :kept_len].copy_(keep)
    fill_prefix(state.slot_pos, kept_pos, -1)
    fill_prefix(state.modality, torch.where(kept, token_modality.gather(1, keep), TEXT).to(state.modality.dtype), 0)
    fill_prefix(state.score, torch.where(kept, total.gather(1, keep), 0.0), 0)
    fill_prefix(state.in_bin, ranked_in_bin.gather(1, order).to(state.in_bin.dtype), 0)
    state.seen.copy_(seen.squeeze(-1))


def _descending_rank(values: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of each eligible entry among its row's eligible entries, highest value first (0-based)."""
    order = torch.where(eligible, values, NEVER_KEEP).argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


# -- decode: DDES ------------------------------------------------------------------------------------------------

#: evictions per step: one restored token plus one new token can exceed the budget by two
_EVICTIONS_PER_STEP = 2


def ddes_maintain(config: HAEConfig, state: SlotState) -> None:
    """One step of DDES bookkeeping (docs/hae.md, DDES steps 1-5), in place: decay, restore, evict, free."""
    slot_pos, score, in_bin = state.slot_pos, state.score, state.in_bin
    rows = torch.arange(slot_pos.shape[0], device=slot_pos.device)
    occupied = slot_pos >= 0
    if config.decay > 0:
        score.mul_(1.0 - config.decay)
    protected = (slot_pos < config.sinks) | (slot_pos >= state.seen.unsqueeze(-1) - config.window)

    binned = occupied & (in_bin != 0)
    candidates = occupied & ~binned & ~protected
    lowest_candidate = torch.where(candidates, score, torch.inf).amin(dim=-1)
    best_binned_score, best_binned = torch.where(binned, score, -torch.inf).max(dim=-1)
    restore = best_binned_score > lowest_candidate  # False when the bin or the candidates are empty
    _set_where(in_bin, rows, best_binned, restore, 0)

    for _ in range(_EVICTIONS_PER_STEP):
        active = occupied & (in_bin == 0)
        over_budget = active.sum(dim=-1) > config.budget
        victim = htv_victim(active & ~protected, score, state.modality, config.visual_first)
        _set_where(in_bin, rows, victim, over_budget, 1)

    binned = occupied & (in_bin != 0)
    freed = binned & (binned.sum(dim=-1, keepdim=True) >= config.bin_size)
    slot_pos.masked_fill_(freed, -1)
    score.masked_fill_(freed, 0.0)
    in_bin.masked_fill_(freed, 0)


def htv_victim(candidates: torch.Tensor, score: torch.Tensor, modality: torch.Tensor,
               visual_first: float) -> torch.Tensor:
    """`[B]` slot to move to the bin: the lowest visual candidate while it scores below `visual_first` times the
    mean text-candidate score (or there is no text candidate), else the lowest candidate."""
    visual = candidates & (modality == VISUAL)
    text = candidates & (modality != VISUAL)
    text_mean = (score * text).sum(dim=-1) / text.sum(dim=-1).clamp_min(1)
    lowest_visual_score, lowest_visual = torch.where(visual, score, torch.inf).min(dim=-1)
    lowest = torch.where(candidates, score, torch.inf).argmin(dim=-1)
    visual_first_now = visual.any(dim=-1) & (~text.any(dim=-1) | (lowest_visual_score < visual_first * text_mean))
    return torch.where(visual_first_now, lowest_visual, lowest)


def _set_where(buffer: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, condition: torch.Tensor,
               value: int) -> None:
    current = buffer[rows, cols]
    buffer.index_put_((rows, cols), torch.where(condition, torch.full_like(current, value), current))
