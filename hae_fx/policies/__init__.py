"""Eviction policies: each decides which tokens a fixed-capacity cache keeps; the ops and passes execute it.

A policy is one module here: a frozen config dataclass (`hae_fx.config.PolicyConfig` plus the policy's fields)
and a `Policy` subclass with the hooks of `base.Policy`, decorated with `register_policy`, which makes it
available by name (`HAEConfig(policy=name, ...)`) and by config type (`hae_fx.transform(model, SnapKVConfig(...))`).
Every module of this package is imported here, so adding a policy is adding its file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pkgutil

from hae_fx.config import PolicyConfig
from hae_fx.errors import HAEConfigError
from hae_fx.policies.base import Policy, Prompt, SlotState

_POLICIES: dict[str, type[Policy]] = {}


def register_policy(policy: type[Policy]) -> type[Policy]:
    """Make `policy` available by its config's `policy` name and config type (usable as a class decorator)."""
    name = policy.name()
    if not name:
        raise ValueError(f"{policy.__name__}.config_class must set the ClassVar `policy` to the policy's name")
    if name in _POLICIES:
        raise ValueError(f"an eviction policy named {name!r} is already registered")
    _POLICIES[name] = policy
    return policy


def get_policy(name: str) -> type[Policy]:
    """The registered policy called `name`; raises `HAEConfigError` listing the known names otherwise."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise HAEConfigError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(available())}"
        ) from None


def config_class(name: str) -> type[PolicyConfig]:
    """The config dataclass of the policy called `name`."""
    return get_policy(name).config_class


def sweep_config(name: str, **fields: object) -> PolicyConfig:
    """Policy `name`'s config from settings a sweep gives every policy, leaving out those its config does not
    declare (a recycle bin's size for a policy without one): how benchmarks run every policy by one rule."""
    config = config_class(name)
    declared = {field.name for field in dataclasses.fields(config)}
    return config(**{key: value for key, value in fields.items() if key in declared})


def policy_for(config: PolicyConfig) -> Policy:
    """The policy `config` selects, bound to it."""
    if not isinstance(config, PolicyConfig):
        raise HAEConfigError(
            f"config must be an eviction policy config (hae_fx.HAEConfig or a hae_fx.policies config), got "
            f"{type(config).__name__}"
        )
    policy = get_policy(config.policy)
    if type(config) is not policy.config_class:
        raise HAEConfigError(f"{type(config).__name__} is not the config of the registered policy {config.policy!r}")
    return policy(config)


@functools.cache
def policy_from_key(key: str) -> Policy:
    """The policy of a config's `PolicyConfig.key` (how custom ops receive it)."""
    fields = json.loads(key)
    return policy_for(config_class(fields.pop("policy"))(**fields))


def available() -> list[str]:
    """Names of the registered policies, in registration order."""
    return list(_POLICIES)


#: registered first, in this order; the other modules follow alphabetically
_FIRST = ("full", "streaming", "hae")


def _import_policy_modules() -> None:
    found = {module.name for module in pkgutil.iter_modules(__path__)} - {"base"}
    for name in (*_FIRST, *sorted(found - set(_FIRST))):
        importlib.import_module(f"{__name__}.{name}")


_import_policy_modules()

__all__ = ["Policy", "Prompt", "SlotState", "available", "config_class", "get_policy", "policy_for",
           "policy_from_key", "register_policy"]
