"""`full`: keep every token. The exactness baseline: tokens must equal HF's static cache."""

from __future__ import annotations

import torch

from hae_fx.config import HAEConfig
from hae_fx.policies.base import NEVER_KEEP, Policy


class FullPolicy(Policy):
    """No eviction: the capacity must cover prompt + new tokens, which `generate` checks before it starts."""

    name = "full"
    evicts = False

    def prefill_priority(self, config: HAEConfig, token_pos: torch.Tensor) -> torch.Tensor:
        return torch.where(token_pos >= 0, token_pos.to(torch.float32), NEVER_KEEP)

    def decode_victim(self, config: HAEConfig, slot_pos: torch.Tensor) -> torch.Tensor:
        # Unreachable through `generate` (capacity is checked first); overwriting the newest slot keeps the
        # shape contract if a caller drives the model past capacity by hand.
        return slot_pos.argmax(-1)
