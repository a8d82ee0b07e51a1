"""`HAEConfig`: the one object that says how a model's KV cache is bounded and evicted.

It is frozen and validated at construction, so a bad value fails where it is written, with a message naming the
field and its allowed range, rather than deep inside a compiled graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hae_fx.errors import HAEConfigError


@dataclass(frozen=True)
class HAEConfig:
    """How `hae_fx.transform` bounds and evicts a model's KV cache.

    Attributes:
        policy: name of the eviction policy (`hae_fx.policies.available()` lists them): `"full"` keeps every token
            and needs `capacity >= prompt + new tokens`; `"streaming"` keeps `sinks` first tokens plus the most
            recent ones (StreamingLLM).
        capacity: KV slots per sequence and layer. Fixed for the life of a cache: memory never depends on the
            prompt length or `max_new_tokens`.
        sinks: the first tokens of each sequence that are never evicted (attention sinks).
        window: the most recent tokens that are never evicted. Evicting policies need
            `capacity >= sinks + window + 1`, so that one slot is always left to choose from.
    """

    policy: str = "streaming"
    capacity: int = 256
    sinks: int = 4
    window: int = 16

    def __post_init__(self) -> None:
        from hae_fx.policies import get_policy  # the policy registry imports this module

        get_policy(self.policy)  # raises HAEConfigError naming the known policies
        _require_int("capacity", self.capacity, minimum=1)
        _require_int("sinks", self.sinks, minimum=0)
        _require_int("window", self.window, minimum=0)
        get_policy(self.policy).validate(self)

    def replace(self, **changes: object) -> HAEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HAEConfigError(f"HAEConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise HAEConfigError(f"HAEConfig.{name} must be >= {minimum}, got {value}")
