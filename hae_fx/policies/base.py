"""The interface every eviction policy implements.

Every decision is a pure tensor function with static shapes: no `.item()`, no boolean indexing, no
data-dependent sizes. They run inside the compiled prefill and decode graphs, so whatever they compute must
keep CUDA graphs possible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hae_fx.config import HAEConfig

#: priority given to prompt tokens that must be kept whatever else happens (sinks)
MUST_KEEP = 1e30
#: priority of prompt tokens that can never be kept (padding)
NEVER_KEEP = float("-inf")


@dataclass(frozen=True)
class SlotState:
    """The slot metadata of an `HAECache` (all `[B, C]` but `seen`), shared by every layer.

    Attributes:
        slot_pos: logical position held by each slot, -1 when free.
        score: accumulated attention of each slot.
        modality: `TEXT` (0) or `VISUAL` (1).
        in_bin: 1 for slots in `hae`'s recycle bin (evicted, still attended), else 0.
        seen: `[B]` tokens each sequence has seen: the position of its next token.
    """

    slot_pos: torch.Tensor
    score: torch.Tensor
    modality: torch.Tensor
    in_bin: torch.Tensor
    seen: torch.Tensor


def fill_prefix(buffer: torch.Tensor, prefix: torch.Tensor, rest: float) -> None:
    """In place: `buffer[:, :K] = prefix` (`[B, K]`) and `rest` in the other slots: slot metadata after a prefill,
    whose kept tokens occupy the first slots."""
    buffer.fill_(rest)
    buffer[:, : prefix.shape[1]].copy_(prefix)


def first_free_slot(slot_pos: torch.Tensor) -> torch.Tensor:
    """`[B]` index of each row's first free slot (`slot_pos < 0`); 0 for a row without one."""
    return (slot_pos < 0).to(torch.int8).argmax(dim=-1)


class Policy:
    """Decides which tokens a fixed-capacity cache keeps.

    Attributes:
        name: the `HAEConfig.policy` value that selects this policy.
        evicts: whether the policy ever drops a token. Non-evicting policies need capacity for every token.
        reads_prefill_attention: whether the prefill decision needs a layer's attention. Such a policy is
            planned by `hae::dap_plan_`, which the backend's DAP pass places after that layer's attention;
            the others are planned from `prefill_priority` before the first layer.
    """

    name: str = ""
    evicts: bool = True
    reads_prefill_attention: bool = False

    def validate(self, config: HAEConfig) -> None:
        """Raise `HAEConfigError` if `config` cannot work with this policy."""
        from hae_fx.errors import HAEConfigError

        if self.evicts and config.capacity < config.sinks + config.window + 1:
            raise HAEConfigError(
                f"HAEConfig.capacity={config.capacity} is too small for policy {self.name!r}: it must be at least "
                f"sinks + window + 1 = {config.sinks} + {config.window} + 1 = {config.sinks + config.window + 1}; "
                "raise capacity or lower sinks/window"
            )

    def prefill_kept_len(self, config: HAEConfig, prompt_len: int, real_tokens: list[int],
                         visual_tokens: list[int]) -> int:
        """Static number of prompt tokens the prefill keeps room for (slots `0..K-1`).

        Args:
            prompt_len: `T`, the padded prompt length.
            real_tokens, visual_tokens: per sequence, its non-padding and its visual token counts.
        """
        return min(prompt_len, config.capacity)

    def prefill_priority(self, config: HAEConfig, token_pos: torch.Tensor) -> torch.Tensor:
        """Priority of each prompt token for a place in the cache after prefill.

        Args:
            token_pos: `[B, T]` logical position of each prompt token, -1 for padding.

        Returns:
            `[B, T]` float priorities; the `prefill_kept_len` highest are kept. Padding must get `NEVER_KEEP`.
        """
        raise NotImplementedError

    def decode_slot(self, config: HAEConfig, state: SlotState) -> torch.Tensor:
        """The slot each sequence's new token takes: the first free one, else `decode_victim`'s.

        Policies that keep their own bookkeeping between steps (the `hae` bin) override this and may update
        `state` in place first. Returns `[B]` int64 slot indices.
        """
        has_free = (state.slot_pos < 0).any(dim=-1)
        return torch.where(has_free, first_free_slot(state.slot_pos), self.decode_victim(config, state.slot_pos))

    def decode_victim(self, config: HAEConfig, slot_pos: torch.Tensor) -> torch.Tensor:
        """The slot a new token overwrites when no slot is free.

        Args:
            slot_pos: `[B, C]` logical position held by each slot (every slot is occupied when this is used).

        Returns:
            `[B]` int64 slot indices.
        """
        raise NotImplementedError
