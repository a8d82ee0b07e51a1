"""`h2o`: Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048): keep the tokens with the most accumulated
attention, plus a recent window.

Each token's score is the attention it has received from every query so far (prompt queries at prefill, then one
per decode step), averaged over query heads and layers. Prefill keeps the `capacity` highest-scoring prompt tokens
besides the protected ones; every decode step with a full cache drops the lowest-scoring unprotected token and the
new token takes its slot with score 0 (the paper zeroes a dropped token's score). The paper scores and evicts per
head and layer; here one index set serves every head and layer (the scores are their mean), as every hae_fx policy
broadcasts one set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies import register_policy
from hae_fx.policies.base import Prompt, ScoredPolicy, layers_mean, protected_priority


@dataclass(frozen=True)
class H2OConfig(PolicyConfig):
    """`window` is H2O's recent budget; `capacity - sinks - window` is its heavy-hitter budget."""

    policy = "h2o"


@register_policy
class H2OPolicy(ScoredPolicy):
    config_class = H2OConfig

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        score = layers_mean(attention).sum(dim=1)  # attention each key received from every prompt query
        return protected_priority(self.config, prompt, self.prefill_rank(prompt, score)), score

    def prefill_rank(self, prompt: Prompt, score: torch.Tensor) -> torch.Tensor:
        """`[B, T]` how the unprotected prompt tokens rank, from their accumulated attention `score` (H2O: the score
        itself; subclasses add priors)."""
        return score
