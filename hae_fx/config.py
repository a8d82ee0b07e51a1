"""`PolicyConfig`: the fields every eviction policy shares, validated in one place.

Each policy (`hae_fx.policies`) declares a frozen subclass with its own fields, so a policy's configuration says
only what that policy reads. Configs are validated at construction, so a bad value fails where it is written, with
a message naming the config class, the field and its allowed range, rather than deep inside a compiled graph.
`hae_fx.HAEConfig` is the `hae` policy's config; `HAEConfig(policy=name, ...)` builds any policy's config by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from hae_fx.errors import HAEConfigError
from hae_fx.kv_quant import KV_DTYPES


@dataclass(frozen=True)
class PolicyConfig:
    """The fields every policy shares.

    Attributes:
        capacity: KV slots per sequence and layer. Fixed for the life of a cache: memory never depends on the
            prompt length or `max_new_tokens`.
        sinks: the first tokens of each sequence that are never evicted (attention sinks).
        window: the most recent tokens that are never evicted. Evicting policies need room for
            `sinks + window + 1` tokens, so that one token is always left to choose from.
        kv_dtype: how K/V slots are stored: None keeps the model's dtype; `"int8"` or `"float8_e4m3fn"` store
            8-bit values with one fp32 scale per slot and KV head (`hae_fx.kv_quant`), dequantized inside the
            decode attention. Prefill attends over the prompt's unquantized keys, as without quantization.
        full_windows: whether windowed (sliding or chunked) layers keep their whole span whatever the capacity.
            False bounds every layer by `capacity`: a windowed layer is then a ring of `min(span, capacity)` slots,
            the most recent tokens. True leaves those layers exact (they see all they would see with a full cache)
            and evicts only in the global layers, so policies differ only where they choose; the cache then takes
            `span` slots per windowed layer.
    """

    #: the policy name this config selects (`hae_fx.policies.available()` lists them)
    policy: ClassVar[str] = ""

    capacity: int = 256
    sinks: int = 4
    window: int = 16
    kv_dtype: str | None = None
    full_windows: bool = False

    def __post_init__(self) -> None:
        require_int(self, "capacity", minimum=1)
        require_int(self, "sinks", minimum=0)
        require_int(self, "window", minimum=0)
        require_choice(self, "kv_dtype", (None, *KV_DTYPES))
        require_bool(self, "full_windows")
        self.validate()

    def validate(self) -> None:
        """Check the policy's own fields (and their relation to the common ones); raise `HAEConfigError`.

        The default suits an evicting policy without fields of its own: room beyond the protected tokens."""
        require_room_beyond_protected(self, self.capacity, "capacity")

    def replace(self, **changes: object) -> PolicyConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """The config as one JSON string (policy name and every field): how it travels through a custom op, whose
        arguments cannot be Python objects. `hae_fx.policies.policy_from_key` reads it back."""
        return json.dumps({"policy": self.policy, **dataclasses.asdict(self)}, sort_keys=True)


def require_int(config: PolicyConfig, name: str, *, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HAEConfigError(f"{_field(config, name)} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise HAEConfigError(f"{_field(config, name)} must be >= {minimum}, got {value}")


def require_optional_int(config: PolicyConfig, name: str, *, minimum: int) -> None:
    if getattr(config, name) is not None:
        require_int(config, name, minimum=minimum)


def require_fraction(config: PolicyConfig, name: str, *, below_one: bool = False) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HAEConfigError(f"{_field(config, name)} must be a number, got {type(value).__name__} {value!r}")
    upper_ok = value < 1 if below_one else value <= 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1)" if below_one else "[0, 1]"
        raise HAEConfigError(f"{_field(config, name)} must lie in {interval}, got {value}")


def require_non_negative(config: PolicyConfig, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise HAEConfigError(f"{_field(config, name)} must be a finite number >= 0, got {value!r}")


def require_bool(config: PolicyConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, bool):
        raise HAEConfigError(f"{_field(config, name)} must be True or False, got {value!r}")


def require_choice(config: PolicyConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise HAEConfigError(f"{_field(config, name)} must be one of {choices}, got {value!r}")


def require_room_beyond_protected(config: PolicyConfig, room: int, what: str) -> None:
    """`room` (the slots an evicting policy chooses among, named `what`) must exceed the protected tokens."""
    protected = config.sinks + config.window + 1
    if room < protected:
        raise HAEConfigError(
            f"{_field(config, 'capacity')}={config.capacity} is too small for policy {config.policy!r}: {what} must "
            f"be at least sinks + window + 1 = {config.sinks} + {config.window} + 1 = {protected}; raise capacity or "
            "lower sinks/window"
        )


def _field(config: PolicyConfig, name: str) -> str:
    return f"{type(config).__name__}.{name}"
