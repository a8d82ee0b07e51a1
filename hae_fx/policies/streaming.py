"""`streaming`: attention sinks plus the most recent tokens (StreamingLLM, Xiao et al. 2023).

No scores: the cache holds the first `sinks` tokens and the `capacity - sinks` most recent ones. Unlike the
paper, tokens keep their true RoPE positions (keys are cached after rotation), as every hae_fx policy does.
"""

from __future__ import annotations

import torch

from hae_fx.config import HAEConfig
from hae_fx.policies.base import MUST_KEEP, NEVER_KEEP, Policy


class StreamingPolicy(Policy):
    name = "streaming"

    def prefill_priority(self, config: HAEConfig, token_pos: torch.Tensor) -> torch.Tensor:
        recency = token_pos.to(torch.float32)
        priority = torch.where(token_pos < config.sinks, MUST_KEEP, recency)
        return torch.where(token_pos >= 0, priority, NEVER_KEEP)

    def decode_victim(self, config: HAEConfig, slot_pos: torch.Tensor) -> torch.Tensor:
        # the oldest slot that is not a sink
        age_key = torch.where(slot_pos < config.sinks, torch.iinfo(slot_pos.dtype).max, slot_pos)
        return age_key.argmin(-1)
