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
from hae_fx.policies.base import Prompt, ScoredPolicy, SlotState, last_query_row, layers_mean, protected_priority


@dataclass(frozen=True)
class TOVAConfig(PolicyConfig):
    policy = "tova"

    sinks: int = 0
    window: int = 0


@register_policy
class TOVAPolicy(ScoredPolicy):
    config_class = TOVAConfig

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        score = last_query_row(prompt, layers_mean(attention))
        return protected_priority(self.config, prompt, score), score

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        slot = super().decode_slot(state)
        state.score.zero_()  # this step's attention alone becomes every token's score
        return slot
