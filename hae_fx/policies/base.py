"""The interface every eviction policy implements.

Both decisions are pure tensor functions with static shapes: no `.item()`, no boolean indexing, no
data-dependent sizes. They run inside the compiled prefill and decode graphs, so whatever they compute must
keep CUDA graphs possible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hae_fx.config import HAEConfig

#: priority given to prompt tokens that must be kept whatever else happens (sinks)
MUST_KEEP = 1e30
#: priority of prompt tokens that can never be kept (padding)
NEVER_KEEP = float("-inf")


class Policy:
    """Decides which tokens a fixed-capacity cache keeps.

    Attributes:
        name: the `HAEConfig.policy` value that selects this policy.
        evicts: whether the policy ever drops a token. Non-evicting policies need capacity for every token.
    """

    name: str = ""
    evicts: bool = True

    def validate(self, config: HAEConfig) -> None:
        """Raise `HAEConfigError` if `config` cannot work with this policy."""
        from hae_fx.errors import HAEConfigError

        if self.evicts and config.capacity < config.sinks + config.window + 1:
            raise HAEConfigError(
                f"HAEConfig.capacity={config.capacity} is too small for policy {self.name!r}: it must be at least "
                f"sinks + window + 1 = {config.sinks} + {config.window} + 1 = {config.sinks + config.window + 1}; "
                "raise capacity or lower sinks/window"
            )

    def prefill_priority(self, config: HAEConfig, token_pos: torch.Tensor) -> torch.Tensor:
        """Priority of each prompt token for a place in the cache after prefill.

        Args:
            token_pos: `[B, T]` logical position of each prompt token, -1 for padding.

        Returns:
            `[B, T]` float priorities; the `min(T, capacity)` highest are kept. Padding must get `NEVER_KEEP`.
        """
        raise NotImplementedError

    def decode_victim(self, config: HAEConfig, slot_pos: torch.Tensor) -> torch.Tensor:
        """The slot a new token overwrites when no slot is free.

        Args:
            slot_pos: `[B, C]` logical position held by each slot (every slot is occupied when this is used).

        Returns:
            `[B]` int64 slot indices.
        """
        raise NotImplementedError
