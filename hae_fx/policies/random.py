"""`random`: uniform random eviction of non-protected tokens with a fixed seed: the control every table needs.

A policy that reads no attention at all tells how much of any other policy's accuracy comes from *what* it keeps
rather than from *how much*. Randomness must be reproducible and identical in eager and compiled graphs (Inductor's
RNG differs from eager's), so every draw is an integer hash: token at position `p`, decision step `s`, seed `z`,

    x = (p * 1103515245 + s * 12345 + z * 2654435761 + 1) mod M,   M = 2^31 - 1
    three rounds of: x = (x * 48271) mod M;  x = x ^ (x >> 7)

(MINSTD steps mixed by a shift; every product stays below 2^63). Smaller `x` means evicted first. Prefill draws at
step 0 and keeps the `capacity` highest; the decode step that places the token at position `seen` draws at step
`seen + 1` over the cache's unprotected tokens and evicts the lowest, so each step's victim is uniform over the
candidates, independently of earlier steps. Within a step the draws of distinct positions differ (each round is a
bijection), and both prefill and decode rank them in float64, which holds them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig, require_int
from hae_fx.policies import register_policy
from hae_fx.policies.base import (
    Policy,
    Prompt,
    SlotState,
    evictable_slots,
    lowest,
    protected_priority,
)

_MODULUS = 2**31 - 1


def draw(position: torch.Tensor, step: torch.Tensor, seed: int) -> torch.Tensor:
    """The hash of the module docstring, elementwise over int64 `position` and `step` (broadcast)."""
    x = (position * 1103515245 + step * 12345 + seed * 2654435761 + 1) % _MODULUS
    for _ in range(3):
        x = (x * 48271) % _MODULUS
        x = x ^ (x >> 7)
    return x


@dataclass(frozen=True)
class RandomConfig(PolicyConfig):
    """Attributes: `seed`, any int >= 0: the same seed evicts the same tokens."""

    policy = "random"

    seed: int = 0

    def validate(self) -> None:
        require_int(self, "seed", minimum=0)
        super().validate()


@register_policy
class RandomPolicy(Policy):
    config_class = RandomConfig

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        token_pos = prompt.token_pos
        key = draw(token_pos, torch.zeros_like(token_pos), self.config.seed).to(torch.float64)
        priority = protected_priority(self.config, prompt, key)
        return priority, torch.zeros_like(priority, dtype=torch.float32)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        slot_pos = state.slot_pos
        candidates = evictable_slots(self.config, state)
        key = draw(slot_pos, (state.seen + 1).unsqueeze(-1), self.config.seed).to(torch.float64)  # exact
        return lowest(candidates, key, slot_pos)
