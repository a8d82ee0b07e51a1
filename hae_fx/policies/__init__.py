"""Eviction policies: each decides which tokens a fixed-capacity cache keeps; the ops and passes execute it.

A policy is a small object with two static-shape decisions (see `base.Policy`): which prompt tokens survive
prefill, and which slot a new decode token overwrites when the cache is full. Register new ones with
`register_policy`; `HAEConfig(policy=name)` then accepts them.
"""

from hae_fx.errors import HAEConfigError
from hae_fx.policies.base import Policy, SlotState
from hae_fx.policies.full import FullPolicy
from hae_fx.policies.hae import HAEPolicy
from hae_fx.policies.streaming import StreamingPolicy

_POLICIES: dict[str, Policy] = {}


def register_policy(policy: Policy) -> None:
    """Make `policy` available as `HAEConfig(policy=policy.name)`."""
    if policy.name in _POLICIES:
        raise ValueError(f"an eviction policy named {policy.name!r} is already registered")
    _POLICIES[policy.name] = policy


def get_policy(name: str) -> Policy:
    """The registered policy called `name`; raises `HAEConfigError` listing the known names otherwise."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise HAEConfigError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Names of the registered policies, in registration order."""
    return list(_POLICIES)


register_policy(FullPolicy())
register_policy(StreamingPolicy())
register_policy(HAEPolicy())

__all__ = ["Policy", "SlotState", "available", "get_policy", "register_policy"]
