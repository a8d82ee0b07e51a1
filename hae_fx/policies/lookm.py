"""`lookm`: LOOK-M (Wan et al. 2024, arXiv 2406.18139): text-prior eviction of multimodal caches, with the evicted
prompt keys and values merged into their most similar kept ones rather than lost.

- **Score:** H2O's accumulated attention: what a token has received from every query so far (all prompt queries
  at prefill, then one per decode step), averaged over query heads and layers.
- **Text prior.** LOOK-M adds `-inf` to image tokens' scores, so text is kept first and images are evicted first:
  prefill keeps the protected tokens, then text, then image tokens, the highest scores first within each; each
  decode step with a full cache drops the lowest-scoring unprotected image token while one is left, else the
  lowest-scoring unprotected text token.
- **Merging** (`hae::prefill_merge_write_`): at prefill each dropped prompt token is averaged into the kept token
  whose key is most cosine-similar, per layer and KV head, when that similarity reaches the mean of the dropped
  tokens' best similarities (LOOK-M's averaged merging). LOOK-M compresses the prompt; the tokens a fixed capacity
  forces out while decoding are dropped without merging.

One index set serves every head and layer (scores averaged over them), as every hae_fx policy broadcasts one set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.modality import VISUAL
from hae_fx.policies import register_policy
from hae_fx.policies.base import Prompt, SlotState, evictable_slots, lowest
from hae_fx.policies.h2o import H2OPolicy


@dataclass(frozen=True)
class LookMConfig(PolicyConfig):
    """`window` is LOOK-M's recent budget; the rest of `capacity` beyond the sinks holds the heavy hitters."""

    policy = "lookm"


@register_policy
class LookMPolicy(H2OPolicy):
    """H2O's scores with LOOK-M's text prior, merging what the prefill drops."""

    config_class = LookMConfig
    merges_evicted = True

    def prefill_rank(self, prompt: Prompt, score: torch.Tensor) -> torch.Tensor:
        # text above every image token, each ranked by score: images map into [-1, 0), below any text score
        return torch.where(prompt.modality == VISUAL, -1 / (1 + score), score)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        candidates = evictable_slots(self.config, state)
        visual = candidates & (state.modality == VISUAL)
        return torch.where(visual.any(dim=-1), lowest(visual, state.score, state.slot_pos),
                           lowest(candidates, state.score, state.slot_pos))
