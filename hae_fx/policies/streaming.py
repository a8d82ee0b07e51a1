"""`streaming`: attention sinks plus the most recent tokens (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453).

No scores: the cache holds the first `sinks` tokens and the `capacity - sinks` most recent ones. Unlike the
paper, tokens keep their true RoPE positions (keys are cached after rotation), as every hae_fx policy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies import register_policy
from hae_fx.policies.base import MUST_KEEP, NEVER_KEEP, Policy, Prompt, SlotState, argmin_first


@dataclass(frozen=True)
class StreamingConfig(PolicyConfig):
    """Sinks and a recent window; `window` only sets the smallest capacity (every non-sink slot is recent)."""

    policy = "streaming"


@register_policy
class StreamingPolicy(Policy):
    config_class = StreamingConfig

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        recency = prompt.token_pos.to(torch.float32)
        priority = torch.where(prompt.token_pos < self.config.sinks, MUST_KEEP, recency)
        priority = torch.where(prompt.valid, priority, NEVER_KEEP)
        return priority, torch.zeros_like(priority)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        # the oldest slot that is not a sink
        slot_pos = state.slot_pos
        age_key = torch.where(slot_pos < self.config.sinks, torch.iinfo(slot_pos.dtype).max, slot_pos)
        return argmin_first(age_key)
