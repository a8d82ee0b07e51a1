"""`tova`: Token Omission Via Attention (Oren et al. 2024, arXiv 2401.06104): keep the tokens the newest query
attends to most.

A token's score is the attention of the most recent query only (not accumulated), averaged over query heads and
layers: at prefill the last prompt token's attention row, at decode the new token's. Prefill keeps the `capacity`
highest; each decode step with a full cache drops the lowest-scoring unprotected token before the new token takes
its slot. TOVA's cache of `n` tokens grows to `n + 1` while the new query attends, then drops one; a cache with
`capacity` slots holds the new token while it attends, so it is TOVA with `n = capacity - 1`. The paper averages
over heads and evicts per layer; here one index set serves every layer (scores averaged over layers). The paper
forces no recent window or sinks, so both default to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies import register_policy
from hae_fx.policies.base import (
    MUST_KEEP,
    NEVER_KEEP,
    Policy,
    Prompt,
    SlotState,
    evictable_slots,
    layers_mean,
    lowest,
    prefill_protected,
)


@dataclass(frozen=True)
class TOVAConfig(PolicyConfig):
    policy = "tova"

    sinks: int = 0
    window: int = 0


@register_policy
class TOVAPolicy(Policy):
    config_class = TOVAConfig

    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        return tuple(global_layers)

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        attention = layers_mean(attention)
        last = prompt.token_pos.argmax(dim=-1)  # the last real token's row (left padding: the last index)
        rows = last.view(-1, 1, 1).expand(-1, 1, attention.shape[-1])
        score = attention.gather(1, rows).squeeze(1)
        priority = torch.where(prefill_protected(self.config, prompt), MUST_KEEP, score)
        return torch.where(prompt.valid, priority, NEVER_KEEP), score

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        slot = super().decode_slot(state)
        state.score.zero_()  # this step's attention alone becomes every token's score
        return slot

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        slot_pos = state.slot_pos
        candidates = evictable_slots(self.config, state)
        return lowest(candidates, state.score, slot_pos)
