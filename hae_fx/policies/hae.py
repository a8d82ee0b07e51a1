"""`hae`: Hierarchical Adaptive Eviction. Dual-Attention Pruning at prefill, the DDES recycle bin at decode.

docs/hae.md is the specification; this module is its static-shape implementation. Prefill is planned by
`HAEPolicy.prefill_priority` (run by `hae::prefill_plan_` after layer `dap_layer`'s attention), decode by
`HAEPolicy.decode_slot` (run by the cache at layer 0 of every step). Both work on whole batches at once:
per-sequence decisions are masks and per-row reductions over fixed-size buffers.

`HAEConfig` is also the short form for every policy: `HAEConfig(policy="snapkv", capacity=...)` builds that
policy's own config.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import (
    PolicyConfig,
    require_bool,
    require_choice,
    require_fraction,
    require_int,
    require_non_negative,
    require_optional_int,
)
from hae_fx.errors import HAEConfigError, HAESiteError
from hae_fx.modality import VISUAL
from hae_fx.policies import register_policy
from hae_fx.policies.base import (
    MUST_KEEP,
    NEVER_KEEP,
    Policy,
    Prompt,
    SlotState,
    argmax_first,
    argmin_first,
    fill_prefix,
    first_free_slot,
)

SCORE_SOURCES = ("layers_mean", "dap_layer")

log = logging.getLogger("hae_fx")


class _ByPolicyName(type):
    """`HAEConfig(policy=name, **fields)`: the config of the policy called `name` (the short form)."""

    def __call__(cls, *args: object, policy: str = "hae", **fields: object) -> PolicyConfig:
        if policy == cls.policy:
            return super().__call__(*args, **fields)
        from hae_fx.policies import config_class

        return config_class(policy)(*args, **fields)


@dataclass(frozen=True)
class HAEConfig(PolicyConfig, metaclass=_ByPolicyName):
    """The `hae` policy's configuration; with `policy=name`, any registered policy's (`hae_fx.policies`).

    Attributes:
        capacity: KV slots per sequence and layer, `budget + bin_size`.
        sinks, window: protected tokens (`hae_fx.config.PolicyConfig`).
        bin_size: the recycle bin `d`. Evicted tokens wait there, still attended and able to come back, until
            `bin_size` of them are freed together. `1` frees every victim at once (greedy eviction).
        dap_layer: the decoder layer (0-based) whose attention Dual-Attention Pruning reads.
        dap_global: when `dap_layer` is a sliding-window or chunked layer, read the first full-attention layer
            after it instead (the last one before it when none follows). A windowed layer's prompt attention does
            not reach past its window, so on a prompt longer than the window DAP would rank every earlier token
            last (Gemma 3 270M's layer 1 sees 512 tokens). False reads `dap_layer` whatever its kind.
        r: DAP share threshold in [0, 1]; a visual token whose share of the text's attention to visual tokens is
            below `r` ...
        alpha: ... and whose largest attention from any text query is below `alpha` (in [0, 1]) is evicted.
        prune_hidden: after `dap_layer`, also remove evicted tokens from the residual stream, so later layers
            compute on the kept tokens only (FastV-style). False keeps the computation and prunes the caches only.
        max_visual_keep: optional cap on the visual tokens kept at prefill (the most attended win); it also bounds
            the static token count that `prune_hidden` computes on.
        score_source: what decode adds to each token's score: attention averaged over every layer
            (`"layers_mean"`) or layer `dap_layer`'s only (`"dap_layer"`).
        visual_first: strength of visual-first eviction (HTV): the lowest visual candidate is evicted first while
            it scores below `visual_first` times the mean text-candidate score; 0 turns it off.
        decay: scores are multiplied by `1 - decay` before each decode step (the paper's exponential decay `λ`);
            0 keeps plain cumulative attention.
        observation_window: for a prompt without visual tokens, DAP's observation queries are its last
            `observation_window` tokens (0: every prompt token). Summed over every query, attention favours early
            tokens (more queries see them) and loses what the end of the prompt asks about; the last tokens are
            the text prompt's counterpart of the question after an image.
        pool_kernel: for a prompt without visual tokens, the capacity rule ranks each token by the largest score
            within `pool_kernel // 2` positions of it (an odd width; 1 ranks by the token's own). One attended
            token then keeps its neighbours, so a phrase (the digits of a number) survives whole, not a few of
            its tokens (SnapKV's pooling).
    """

    policy = "hae"

    bin_size: int = 64
    dap_layer: int = 1
    dap_global: bool = True
    r: float = 0.0015
    alpha: float = 0.0005
    prune_hidden: bool = False
    max_visual_keep: int | None = None
    score_source: str = "layers_mean"
    visual_first: float = 1.0
    decay: float = 0.0
    observation_window: int = 32
    pool_kernel: int = 7

    def validate(self) -> None:
        require_int(self, "bin_size", minimum=1)
        require_int(self, "dap_layer", minimum=0)
        require_fraction(self, "r")
        require_fraction(self, "alpha")
        require_fraction(self, "decay", below_one=True)
        require_bool(self, "prune_hidden")
        require_bool(self, "dap_global")
        require_optional_int(self, "max_visual_keep", minimum=0)
        require_choice(self, "score_source", SCORE_SOURCES)
        require_non_negative(self, "visual_first")
        require_int(self, "observation_window", minimum=0)
        require_int(self, "pool_kernel", minimum=1)
        if self.pool_kernel % 2 == 0:
            raise HAEConfigError(f"HAEConfig.pool_kernel={self.pool_kernel} must be odd (a window centred on each "
                                 f"token); use {self.pool_kernel - 1} or {self.pool_kernel + 1}")
        budget = self.budget
        if self.bin_size > budget:
            raise HAEConfigError(
                f"HAEConfig.bin_size={self.bin_size} is larger than the budget capacity - bin_size = {budget}; "
                f"the bin holds evicted tokens awaiting deletion and may not outgrow the active set: lower bin_size "
                f"or raise capacity to at least {2 * self.bin_size}"
            )
        protected = self.sinks + self.window + 1
        if budget < protected:
            raise HAEConfigError(
                f"HAEConfig.capacity={self.capacity} leaves a budget of capacity - bin_size = {budget} active "
                f"tokens, below sinks + window + 1 = {protected}; raise capacity to at least "
                f"{protected + self.bin_size} or lower sinks, window or bin_size"
            )

    @property
    def budget(self) -> int:
        """Active tokens kept per sequence: `capacity - bin_size`."""
        return self.capacity - self.bin_size


@register_policy
class HAEPolicy(Policy):
    """Budget `capacity - bin_size` of active tokens plus a recycle bin of `bin_size`; see docs/hae.md."""

    config_class = HAEConfig
    config: HAEConfig

    def check_model(self, num_layers: int) -> None:
        if self.config.dap_layer >= num_layers:
            raise HAEConfigError(
                f"HAEConfig.dap_layer={self.config.dap_layer} is beyond the model's depth: its text decoder has "
                f"{num_layers} layers (0..{num_layers - 1}); choose a dap_layer in that range (the paper uses an "
                "early layer, e.g. 1)"
            )

    def extra_buffers(self) -> dict[str, torch.dtype]:
        return {"in_bin": torch.int8}  # 1 for slots in the recycle bin (evicted, still attended)

    @property
    def bin_size(self) -> int:
        return self.config.bin_size

    def binned(self, state: SlotState) -> torch.Tensor:
        return state.extras["in_bin"] != 0

    def dap_layer(self, global_layers: Sequence[int]) -> int:
        """The layer DAP reads among a model whose full-attention layers are `global_layers` (`dap_global`)."""
        config = self.config
        if not config.dap_global or config.dap_layer in global_layers or not global_layers:
            return config.dap_layer
        later = [layer for layer in global_layers if layer > config.dap_layer]
        return min(later) if later else max(global_layers)

    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        return (self.dap_layer(global_layers),)

    def pruned_after(self) -> int | None:
        return self.config.dap_layer if self.config.prune_hidden else None

    def note_prompt(self, visual_tokens: list[int]) -> None:
        if 0 in visual_tokens:
            rows = [b for b, count in enumerate(visual_tokens) if count == 0]
            log.info("hae: sequence(s) %s of the prompt have no visual tokens: Dual-Attention Pruning is skipped for "
                     "them (nothing to prune); a prompt longer than the cache keeps the tokens its last %d attend "
                     "to most (pooled over %d neighbours), and DDES bounds the cache during decode", rows,
                     self.config.observation_window, self.config.pool_kernel)

    def prefill_kept_len(self, prompt_len: int, real_tokens: list[int], visual_tokens: list[int]) -> int:
        config = self.config
        kept = min(prompt_len, config.capacity - 1)  # one slot stays free for the first decode token
        if config.max_visual_keep is not None:
            protected = config.sinks + max(config.window, 1)
            bound = max(n - v + min(v, config.max_visual_keep + protected)
                        for n, v in zip(real_tokens, visual_tokens, strict=True))
            kept = min(kept, max(bound, 1))
        return kept

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return dap_priority(self.config, prompt, attention[0])

    def after_prefill(self, state: SlotState, rank: torch.Tensor, kept: torch.Tensor) -> None:
        # the first `budget` tokens by priority are active, the others start in the bin
        fill_prefix(state.extras["in_bin"], (kept & (rank >= self.config.budget)).to(torch.int8), 0)

    def score_weights(self, layers: Sequence[int]) -> dict[int, float]:
        config = self.config
        if config.score_source == "dap_layer":
            dap_layer = self.dap_layer(sorted(set(layers)))
            if dap_layer not in layers:
                raise HAESiteError(
                    f"score_source='dap_layer' reads layer {dap_layer}'s attention, but the graph's attention "
                    f"over the evicting (global) cache slots is in layers {sorted(set(layers))}; choose a global "
                    "layer as dap_layer or score_source='layers_mean'"
                )
            return {dap_layer: 1.0}
        return super().score_weights(layers)

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        ddes_maintain(self.config, state)
        return first_free_slot(state.slot_pos)  # DDES always leaves one


# -- prefill: Dual-Attention Pruning ---------------------------------------------------------------------------

def dap_scores(attention: torch.Tensor, prompt: Prompt, observation_window: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token DAP statistics from one layer's head-averaged attention `[B, Tq, Tk]`.

    Returns:
        `(total, peak, applies)`: `total[b, j]` and `peak[b, j]` are the sum and max, over the observation
        queries (text after the last visual token; when there is none, the last `observation_window` tokens, or
        every token for 0), of the head-averaged attention on token `j`; `applies[b]` says whether the dual test
        applies (visual tokens and observation queries both exist).
    """
    token_pos, valid = prompt.token_pos, prompt.valid
    visual = valid & (prompt.modality == VISUAL)
    last_visual = torch.where(visual, token_pos, -1).amax(dim=-1, keepdim=True)
    if observation_window:  # a row without visual tokens (last_visual -1) observes from its last tokens
        text_only_start = prompt.seen - observation_window
        last_visual = torch.where(last_visual < 0, text_only_start - 1, last_visual)
    observers = valid & ~visual & (token_pos > last_visual)
    attention = attention * observers.unsqueeze(-1)
    total = attention.sum(dim=1)
    peak = attention.amax(dim=1)
    applies = visual.any(dim=-1) & observers.any(dim=-1)
    return total, peak, applies


def dap_priority(config: HAEConfig, prompt: Prompt, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DAP steps 1-5 of docs/hae.md as priorities: protected tokens first, then text (DAP prunes images, not the
    prompt's words), then visual, by `S0` within a tier; tokens the dual test (or the cap) evicts never. The score
    each token starts with is its `S0`."""
    total, peak, applies = dap_scores(attention, prompt, config.observation_window)
    token_pos, valid = prompt.token_pos, prompt.valid
    visual = valid & (prompt.modality == VISUAL)
    protected = valid & ((token_pos < config.sinks) | (token_pos >= prompt.seen - max(config.window, 1)))

    share = total / (total * visual).sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    evicted = visual & applies.unsqueeze(-1) & (share < config.r) & (peak < config.alpha) & ~protected
    if config.max_visual_keep is not None:
        eligible = visual & ~evicted & ~protected
        evicted = evicted | (eligible & (_descending_rank(total, eligible) >= config.max_visual_keep))
    survivor = valid & ~evicted

    ranked = total
    if config.pool_kernel > 1:  # rows without visual tokens rank by their neighbourhood's best score
        # pad and unfold rather than max_pool1d, whose decomposition differs between a symbolic prompt length and a
        # concrete one (Inductor re-traces the plan op with its example sizes and checks the graphs match); the
        # scores are >= 0, so zero padding never wins
        reach = config.pool_kernel // 2
        pooled = torch.nn.functional.pad(total, (reach, reach)).unfold(-1, config.pool_kernel, 1).amax(dim=-1)
        ranked = torch.where(visual.any(dim=-1, keepdim=True), total, pooled)
    text_tier = torch.where(valid, ranked, 0.0).amax(dim=-1, keepdim=True) + 1.0
    ranked_score = torch.where(visual, ranked, ranked + text_tier)
    priority = torch.where(protected, MUST_KEEP, torch.where(survivor, ranked_score, NEVER_KEEP))
    return priority, total


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
    slot_pos, score, in_bin = state.slot_pos, state.score, state.extras["in_bin"]
    rows = torch.arange(slot_pos.shape[0], device=slot_pos.device)
    occupied = slot_pos >= 0
    if config.decay > 0:
        score.mul_(1.0 - config.decay)
    protected = (slot_pos < config.sinks) | (slot_pos >= state.seen.unsqueeze(-1) - config.window)

    binned = occupied & (in_bin != 0)
    candidates = occupied & ~binned & ~protected
    lowest_candidate = torch.where(candidates, score, torch.inf).amin(dim=-1)
    binned_score = torch.where(binned, score, -torch.inf)
    best_binned_score, best_binned = binned_score.amax(dim=-1), argmax_first(binned_score)
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
    visual_score = torch.where(visual, score, torch.inf)
    lowest_visual_score, lowest_visual = visual_score.amin(dim=-1), argmin_first(visual_score)
    lowest = argmin_first(torch.where(candidates, score, torch.inf))
    visual_first_now = visual.any(dim=-1) & (~text.any(dim=-1) | (lowest_visual_score < visual_first * text_mean))
    return torch.where(visual_first_now, lowest_visual, lowest)


def _set_where(buffer: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, condition: torch.Tensor,
               value: int) -> None:
    current = buffer[rows, cols]
    buffer.index_put_((rows, cols), torch.where(condition, torch.full_like(current, value), current))
