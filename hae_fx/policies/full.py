"""`full`: keep every token. The exactness baseline: tokens must equal HF's static cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies import register_policy
from hae_fx.policies.base import NEVER_KEEP, Policy, Prompt, SlotState, argmax_first


@dataclass(frozen=True)
class FullConfig(PolicyConfig):
    """`full` needs `capacity >= prompt + new tokens`, which `generate` checks before it starts."""

    policy = "full"

    def validate(self) -> None:
        """Nothing is ever evicted, so no room beyond the protected tokens is needed."""


@register_policy
class FullPolicy(Policy):
    """No eviction."""

    config_class = FullConfig
    evicts = False

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        priority = torch.where(prompt.valid, prompt.token_pos.to(torch.float32), NEVER_KEEP)
        return priority, torch.zeros_like(priority)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        # Unreachable through `generate` (capacity is checked first); overwriting the newest slot keeps the
        # shape contract if a caller drives the model past capacity by hand.
        return argmax_first(state.slot_pos)
