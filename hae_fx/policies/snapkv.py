"""`snapkv`: SnapKV (Li et al. 2024, arXiv 2404.14469): the prompt's last queries (the observation window) vote
for the prefix tokens to keep, with pooled scores so that neighbouring tokens are kept together.

Prefill: the observation window is the last `window` prompt tokens (the common `window` field: they are kept, as
SnapKV keeps its window). Each prefix token's vote is the attention it receives from the window's queries, summed,
averaged over query heads and layers; the votes are pooled along positions (`pooling` `"avg"` or `"max"`, kernel
`kernel_size`, stride 1, padding `kernel_size // 2`, the window's own columns left out as SnapKV pools the prefix
only). Protected tokens (sinks and the window) are kept, then the prefix tokens with the highest pooled votes up to
`capacity`. The paper selects per head and layer; here one index set serves every head and layer (votes averaged
over them), as every hae_fx policy broadcasts one set.

Decode: SnapKV does not evict after prefill (its cache grows). A fixed capacity must, so each step with a full cache
drops the unprotected token with the lowest score: its pooled vote plus the attention it has received since
(averaged over heads and layers, H2O-style); a new token starts at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig, require_choice, require_int, require_room_beyond_protected
from hae_fx.errors import HAEConfigError
from hae_fx.policies import register_policy
from hae_fx.policies.base import Prompt, ScoredPolicy, layers_mean, protected_priority

POOLINGS = ("avg", "max")


@dataclass(frozen=True)
class SnapKVConfig(PolicyConfig):
    """Attributes: `window` (>= 1) is the observation window; `kernel_size` (odd, >= 1) and `pooling` shape the
    vote pooling (the SnapKV repository's defaults: 5, avg)."""

    policy = "snapkv"

    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def validate(self) -> None:
        require_int(self, "window", minimum=1)
        require_int(self, "kernel_size", minimum=1)
        if self.kernel_size % 2 == 0:
            raise HAEConfigError(f"SnapKVConfig.kernel_size must be odd (a token's pooled vote is centred on it), "
                                 f"got {self.kernel_size}")
        require_choice(self, "pooling", POOLINGS)
        require_room_beyond_protected(self, self.capacity, "capacity")


@register_policy
class SnapKVPolicy(ScoredPolicy):
    config_class = SnapKVConfig

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        token_pos, valid = prompt.token_pos, prompt.valid
        in_window = valid & (token_pos >= prompt.seen - self.config.window)
        votes = (layers_mean(attention) * in_window.unsqueeze(-1)).sum(dim=1)  # [B, T] over the window's queries
        votes = torch.where(in_window, 0.0, votes)
        score = pool_votes(votes, self.config.kernel_size, self.config.pooling)
        return protected_priority(self.config, prompt, score), score


def pool_votes(votes: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """`[B, T]` votes pooled along positions: stride 1, zero padding of `kernel_size // 2` (votes are >= 0, so zeros
    neither raise a maximum nor differ from SnapKV's `avg_pool1d` padding). Left padding holds zero votes too."""
    padded = torch.nn.functional.pad(votes, (kernel_size // 2, kernel_size // 2))
    windows = padded.unfold(-1, kernel_size, 1)
    return windows.mean(dim=-1) if pooling == "avg" else windows.amax(dim=-1)
