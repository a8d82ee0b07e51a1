"""The seam every eviction policy fits: a config dataclass and a `Policy` with a few hooks.

The core (cache, ops, passes) finds the attention, writes slots, masks and compacts. A policy only decides:

- **prefill**: which decoder layers' prompt attention it reads (`prefill_layers`, possibly none), how many prompt
  tokens it keeps room for (`prefill_kept_len`), and from the prompt's metadata and that attention, a priority and
  an initial score per prompt token (`prefill_priority`); the core keeps the highest priorities.
- **decode**: the slot each new token takes (`decode_slot`), from the slot state: positions, scores, modality and
  the policy's own per-slot buffers (`extra_buffers`).

Every decision is a pure tensor function with static shapes: no `.item()`, no boolean indexing, no data-dependent
sizes. They run inside the compiled prefill and decode graphs, so whatever they compute must keep CUDA graphs
possible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hae_fx.config import PolicyConfig

#: priority given to prompt tokens that must be kept whatever else happens (sinks)
MUST_KEEP = 1e30
#: priority of prompt tokens that can never be kept (padding)
NEVER_KEEP = float("-inf")


@dataclass(frozen=True)
class SlotState:
    """The slot metadata of an `HAECache` (all `[B, C]` but `seen`, or `[B, Hkv, C]` for a policy with
    `Policy.head_axis`), shared by every layer of a slot group.

    Attributes:
        slot_pos: logical position held by each slot, -1 when free.
        score: per-slot attention, as the rewritten attention adds it each step (`Policy.score_weights`).
        modality: `TEXT` (0) or `VISUAL` (1).
        seen: `[B]` tokens each sequence has seen: the position of its next token.
        extras: the policy's own per-slot buffers (`Policy.extra_buffers`) and per-sequence ones
            (`Policy.cache_buffers`), by name.
    """

    slot_pos: torch.Tensor
    score: torch.Tensor
    modality: torch.Tensor
    seen: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A prompt's metadata, as prefill policies see it: `token_pos` (`[B, T]` logical positions, -1 for padding)
    and `modality` (`[B, T]` `TEXT`/`VISUAL`), with the values of the layers the policy reads."""

    token_pos: torch.Tensor
    modality: torch.Tensor
    #: per layer of `Policy.prefill_layers`, its prompt values `[B, Hkv, T, D]` (for priors on value norms)
    values: tuple[torch.Tensor, ...] = ()
    #: the slot group being planned and the cache's number of groups: with per-layer capacities
    #: (`Policy.layer_capacities`), the index of the global layer planned among how many (groups plan in that order)
    group: int = 0
    groups: int = 1
    #: the policy's per-sequence cache buffers (`Policy.cache_buffers`), by name, which its prefill may update in
    #: place for the next group's plan
    cache_buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def valid(self) -> torch.Tensor:
        return self.token_pos >= 0

    @property
    def seen(self) -> torch.Tensor:
        """`[B, 1]` tokens each sequence holds (its last position + 1)."""
        return (self.token_pos.amax(dim=-1, keepdim=True) + 1).clamp_min(0)


def fill_prefix(buffer: torch.Tensor, prefix: torch.Tensor, rest: float, dim: int = 1) -> None:
    """In place: `buffer[:, :K] = prefix` (`[B, K]`; along `dim`, e.g. 2 for per-head `[B, Hkv, C]` slots) and
    `rest` in the other slots: slot metadata after a prefill, whose kept tokens occupy the first slots."""
    buffer.fill_(rest)
    buffer[(slice(None),) * dim + (slice(0, prefix.shape[dim]),)].copy_(prefix)


def slot_index(slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`index_put_` indices of each sequence's chosen slot in `[B, C]` metadata (`slot`: `[B]`), or of each KV
    head's in `[B, Hkv, C]` metadata (`slot`: `[B, Hkv]`)."""
    rows = torch.arange(slot.shape[0], device=slot.device)
    if slot.dim() == 1:
        return rows, slot
    return rows.view(-1, 1), torch.arange(slot.shape[1], device=slot.device).view(1, -1), slot


def first_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension of `mask` (0 where there is none): `argmax`'s tie rule,
    computed as a min-reduction over indices.

    Why not an arg-reduction: the slot a step chooses decides which token a cache loses, so it must be right under
    every compiler, and Inductor's CUDA arg-reductions have had silent bugs (pytorch/pytorch#174069 on bool inputs,
    #178964 fused with another reduction). An `amin` over indices has no index bookkeeping of its own to get wrong.
    """
    size = mask.shape[-1]
    first = torch.where(mask, torch.arange(size, device=mask.device), size).amin(dim=-1)
    return torch.where(first < size, first, 0)


def argmin_first(values: torch.Tensor) -> torch.Tensor:
    """`values.argmin(dim=-1)` (the first of equal minima) through `first_index`."""
    return first_index(values == values.amin(dim=-1, keepdim=True))


def argmax_first(values: torch.Tensor) -> torch.Tensor:
    """`values.argmax(dim=-1)` (the first of equal maxima) through `first_index`."""
    return first_index(values == values.amax(dim=-1, keepdim=True))


def first_free_slot(slot_pos: torch.Tensor) -> torch.Tensor:
    """`[B]` index of each row's first free slot (`slot_pos < 0`); 0 for a row without one."""
    return first_index(slot_pos < 0)


def protected_slots(config: PolicyConfig, slot_pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """`[B, C]` (or `[B, Hkv, C]`, as `slot_pos`): slots holding a sink (`pos < sinks`) or one of the `window` most
    recent positions."""
    return (slot_pos < config.sinks) | (slot_pos >= seen.view(-1, *[1] * (slot_pos.dim() - 1)) - config.window)


def evictable_slots(config: PolicyConfig, state: SlotState) -> torch.Tensor:
    """`[B, C]`: occupied slots a decode step may evict (neither a sink nor in the recent window)."""
    return (state.slot_pos >= 0) & ~protected_slots(config, state.slot_pos, state.seen)


def layers_mean(attention: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[B, T, T]`: the prefill attention of every layer read, averaged over those layers (how a policy that keeps
    one index set for all layers reads per-layer attention, as the decode scores do by default)."""
    return torch.stack(list(attention)).mean(dim=0)


def prefill_protected(config: PolicyConfig, prompt: Prompt) -> torch.Tensor:
    """`[B, T]`: real prompt tokens that are sinks or among the `window` most recent (as decode protects them)."""
    return prompt.valid & protected_slots(config, prompt.token_pos, prompt.seen.squeeze(-1))


def last_query_row(prompt: Prompt, attention: torch.Tensor) -> torch.Tensor:
    """`[B, T]`: the attention row (`attention`: `[B, T, T]`) of each sequence's last real prompt token (with left
    padding, the last index)."""
    rows = argmax_first(prompt.token_pos).view(-1, 1, 1).expand(-1, 1, attention.shape[-1])
    return attention.gather(1, rows).squeeze(1)


def protected_priority(config: PolicyConfig, prompt: Prompt, ranked: torch.Tensor) -> torch.Tensor:
    """`[B, T]` prefill priority: `ranked` (a policy's own ranking of the prompt tokens) for the tokens it chooses
    among, `MUST_KEEP` for sinks and the recent window, `NEVER_KEEP` for padding."""
    priority = torch.where(prefill_protected(config, prompt), MUST_KEEP, ranked)
    return torch.where(prompt.valid, priority, NEVER_KEEP)


def lowest(candidates: torch.Tensor, key: torch.Tensor, slot_pos: torch.Tensor) -> torch.Tensor:
    """`[B]` slot of the smallest `key` (floating point) among `candidates` (`[B, C]` bool), ties broken by the
    lowest position, so the choice never depends on where eviction happened to leave tokens. A row without
    candidates gets slot 0."""
    smallest = torch.where(candidates, key, torch.inf).amin(dim=-1, keepdim=True)
    tied = candidates & (key == smallest)
    return argmin_first(torch.where(tied, slot_pos, torch.iinfo(slot_pos.dtype).max))


class Policy:
    """Decides which tokens a fixed-capacity cache keeps. One instance per cache, bound to its config.

    Attributes:
        name: the `policy` name of `config_class`.
        config_class: the policy's frozen config dataclass.
        evicts: whether the policy ever drops a token. Non-evicting policies need capacity for every token.
        decode_needs_own_prefill, merges_evicted: see below.
    """

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    evicts: ClassVar[bool] = True
    #: whether the decode hooks read per-slot state that only this policy's own prefill initialises (such a policy
    #: cannot be the decode half of a composed policy)
    decode_needs_own_prefill: ClassVar[bool] = False
    #: whether each layer's prefill write merges the keys and values of the prompt tokens the plan drops into the
    #: most similar kept ones (`hae::prefill_merge_write_`) instead of discarding them
    merges_evicted: ClassVar[bool] = False
    #: whether each KV head keeps an index set of its own (MadaKV): slot metadata is `[B, Hkv, C]` (`step_slot`
    #: `[B, Hkv]`), the prefill hooks see attention per KV head and rank per head, decode chooses a slot per head
    head_axis: ClassVar[bool] = False
    #: whether the decisions read the prompt's or new tokens' value vectors (AhaKV's value prior), which tensor
    #: parallelism splits across ranks by head: such a policy is refused there (`hae_fx.tensor_parallel`)
    reads_values: ClassVar[bool] = False

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @classmethod
    def name(cls) -> str:
        return cls.config_class.policy

    # -- model and buffers ---------------------------------------------------------------------------------------
    def check_model(self, num_layers: int) -> None:
        """Raise `HAEConfigError` if the config cannot work with a text decoder of `num_layers` layers."""

    def layer_capacities(self, global_layers: Sequence[int]) -> list[int] | None:
        """Slots of each of `global_layers`, for a policy whose layers keep budgets of their own (PyramidKV); each
        layer then has its own slot metadata and K/V buffers of its own size. None (the default): every layer keeps
        `capacity` slots and one shared index set."""
        return None

    def extra_buffers(self) -> dict[str, torch.dtype | tuple[torch.dtype, tuple[int, ...]]]:
        """The policy's own per-slot buffers, by name: a dtype for a `[B, C]` buffer, or `(dtype, trailing)` for a
        `[B, C, *trailing]` one (a per-slot history). The core allocates them (zeroed), resets them, zeroes a slot's
        entries when a new token takes it, and hands them to the hooks in `SlotState.extras`.
        """
        return {}

    def cache_buffers(self) -> dict[str, torch.dtype]:
        """The policy's own per-sequence `[B]` buffers, by name, one per cache whatever its slot groups: how the
        prefill plans of per-layer groups, which run in layer order, hand a running quantity from layer to layer
        (MadaKV's budget compensation). Allocated zeroed, reset with the cache, in `SlotState.extras`."""
        return {}

    @property
    def bin_size(self) -> int:
        """Tokens the policy holds evicted-but-attended before freeing them together (0: it frees at once)."""
        return 0

    def binned(self, state: SlotState) -> torch.Tensor:
        """`[B, C]` bool: slots whose token is evicted but not yet freed (still attended)."""
        return torch.zeros_like(state.slot_pos, dtype=torch.bool)

    # -- prefill -------------------------------------------------------------------------------------------------
    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        """Decoder layers whose prompt attention `prefill_priority` reads, ascending; () for none. `global_layers`
        are the model's layers with full attention (sliding-window and chunked layers keep rings of their own, not
        the slots a policy evicts from). The core writes no layer's cache before the last of them has attended."""
        return ()

    def pruned_after(self) -> int | None:
        """The layer after which prefill computes on the kept tokens only (FastV-style), or None."""
        return None

    def note_prompt(self, visual_tokens: list[int]) -> None:
        """Called once per prompt, before prefill, with each sequence's visual token count (for logging)."""

    def prefill_kept_len(self, prompt_len: int, real_tokens: list[int], visual_tokens: list[int]) -> int:
        """Static number of prompt tokens the prefill keeps room for (slots `0..K-1`).

        Args:
            prompt_len: `T`, the padded prompt length.
            real_tokens, visual_tokens: per sequence, its non-padding and its visual token counts.
        """
        return min(prompt_len, self.config.capacity)

    def prefill_score_scale(self, prompt: Prompt, head_dim: int) -> torch.Tensor | None:
        """`[B, T]` softmax scale of each prompt query row in the attention `prefill_priority` reads, in place of
        the model's own (a temperature for scoring only: the model's attention is unchanged); None keeps the
        model's."""
        return None

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict]:
        """Priority and initial score of each prompt token.

        Args:
            prompt: the prompt's positions and modality.
            attention: per layer of `prefill_layers`, `[B, T, T]` softmax attention (query, key) averaged over query
                heads (`[B, Hkv, T, T]`, averaged over each KV head's query heads, with `head_axis`), causal over
                each sequence's real tokens, in float32.

        Returns:
            `(priority, score)`, both `[B, T]` (`[B, Hkv, T]` with `head_axis`) floating point (`score`
            float32): the `prefill_kept_len` highest
            priorities are kept (padding
            must get `NEVER_KEEP`, tokens that must go too); `score` is what each kept token starts with. A third
            item, optional, maps names of `extra_buffers` to per-token initial values `[B, T, *trailing]`: the core
            writes the kept tokens' values into those buffers.
        """
        raise NotImplementedError

    def after_prefill(self, state: SlotState, rank: torch.Tensor, kept: torch.Tensor) -> None:
        """Initialise the policy's extra buffers once the kept tokens fill slots `0..K-1`: `rank[b, i]` is the
        priority rank (0 = highest) of slot `i`'s token, `kept[b, i]` whether slot `i` holds one."""

    # -- decode --------------------------------------------------------------------------------------------------
    def score_weights(self, layers: Sequence[int]) -> dict[int, float]:
        """Weight of each layer's per-slot attention in the decode score update (layers left out add nothing).
        The default: attention averaged over every layer with a rewritten attention."""
        return {layer: 1.0 / len(layers) for layer in layers}

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        """`[B]` int64 slot each sequence's new token takes (`[B, Hkv]`, one per KV head, with `head_axis`): the
        first free one, else `decode_victim`'s.

        Policies with bookkeeping between steps override this and may update `state` in place first.
        """
        has_free = (state.slot_pos < 0).any(dim=-1)
        return torch.where(has_free, first_free_slot(state.slot_pos), self.decode_victim(state))

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        """`[B]` int64 slot a new token overwrites when every slot is occupied."""
        raise NotImplementedError

    def after_decode_write(self, state: SlotState, slot: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        """Called once per decode step, after the last global layer wrote the new token to slot `slot` (`[B]`),
        with every global layer's new values (`[B, Hkv, 1, D]` each): for per-slot state derived from them. Cache
        buffers are read by hae ops only, so this is where a policy sees values at decode."""


class ScoredPolicy(Policy):
    """A policy that ranks prompt tokens from every global layer's prefill attention and, with a full cache, evicts
    the unprotected slot with the lowest score (H2O, SnapKV, TOVA and the policies built on their scores)."""

    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        return tuple(global_layers)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        return lowest(evictable_slots(self.config, state), state.score, state.slot_pos)
