"""`fastv`: FastV (Chen et al. 2024, arXiv 2403.06764): image tokens the last prompt token ignores are dropped after
an early layer, from the hidden states (so later layers compute less) and from the cache.

Prefill: layer `layer - 1`'s attention of the last prompt token, averaged over query heads, ranks the image tokens.
Text is never ranked below an image token (FastV prunes images only), protected tokens (sinks, and the last
`max(window, 1)` prompt tokens, so the last one always survives) come first, and the `capacity` highest are kept:
the capacity sets FastV's ratio `R`. With `prune_hidden` (the paper's form) layers from `layer` on compute on the
kept tokens only; without it, only the caches shrink. Unlike the paper, whose layers below `layer` keep every token,
every layer keeps the one set (index broadcasting, as every hae_fx policy).

Decode: FastV reuses its set unchanged. A fixed capacity must evict, so each step with a full cache drops the
unprotected token with the lowest score: the prefill attention it got plus the attention it has received since
(averaged over heads and layers); a new token starts at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig, require_bool, require_int
from hae_fx.errors import HAEConfigError
from hae_fx.modality import VISUAL
from hae_fx.policies import register_policy
from hae_fx.policies.base import MUST_KEEP, NEVER_KEEP, Prompt, ScoredPolicy, last_query_row


@dataclass(frozen=True)
class FastVConfig(PolicyConfig):
    """Attributes: `layer` (>= 1), FastV's `K`: pruning acts from this decoder layer on, from layer `K - 1`'s
    attention (the paper's default 2; `K` = the depth prunes the caches only); `prune_hidden`, whether layers `>= K`
    compute on the kept tokens only."""

    policy = "fastv"

    layer: int = 2
    prune_hidden: bool = True

    def validate(self) -> None:
        require_int(self, "layer", minimum=1)
        require_bool(self, "prune_hidden")
        super().validate()


@register_policy
class FastVPolicy(ScoredPolicy):
    config_class = FastVConfig

    def check_model(self, num_layers: int) -> None:
        if self.config.layer > num_layers:
            raise HAEConfigError(
                f"FastVConfig.layer={self.config.layer} reads layer {self.config.layer - 1}'s attention, beyond the "
                f"model's depth: its text decoder has {num_layers} layers (0..{num_layers - 1}); choose a layer in "
                f"1..{num_layers}"
            )

    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        return (self.config.layer - 1,)

    def pruned_after(self) -> int | None:
        return self.config.layer - 1 if self.config.prune_hidden else None

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        token_pos, valid = prompt.token_pos, prompt.valid
        score = last_query_row(prompt, attention[0])
        protected = valid & ((token_pos < self.config.sinks) | (token_pos >= prompt.seen - max(self.config.window, 1)))
        ranked = torch.where(prompt.modality == VISUAL, score, score + 2.0)  # text above every image token
        priority = torch.where(protected, MUST_KEEP, ranked)
        return torch.where(valid, priority, NEVER_KEEP), score
