"""What `transform` installs on a model's instances, recorded so that it can be taken off again.

`transform` sets attributes on instances only (the model's `forward` and `generate`, its language model's `forward`,
decoder layers' `forward` for hidden-state pruning, `hae_config`, `hae_graphs`). The installed functions close over
the model they were made for, so two things need the record:

- `copy.deepcopy(model)` would copy those closures by reference, and the copy would run the original's weights and
  cache checks. The installed `__deepcopy__` takes the installation off, copies the plain model, puts the
  installation back, and transforms the copy with the same arguments: it compiles its own graphs.
- transforming again after `model.hae_config = None` (the sign that the caller wants a new transform) takes the
  previous installation off first, instead of wrapping hae_fx's wrappers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ABSENT = object()

#: the instance attribute that holds a transformed model's `Installation`
ATTRIBUTE = "_hae_installation"


@dataclass
class Installation:
    """Attributes set on instances: per `(object, name)`, the value before and the value installed."""

    _before: list[tuple[object, str, object]] = field(default_factory=list)
    _installed: list[tuple[object, str, object]] = field(default_factory=list)

    def set(self, target: object, name: str, value: object) -> None:
        """Set `target.name = value` on the instance, remembering what it replaced."""
        self._before.append((target, name, vars(target).get(name, _ABSENT)))
        setattr(target, name, value)
        self._installed.append((target, name, value))

    def remove(self) -> None:
        """Restore every attribute to its value before `set` (latest first)."""
        for target, name, before in reversed(self._before):
            if before is _ABSENT:
                vars(target).pop(name, None)
            else:
                setattr(target, name, before)

    def restore(self) -> None:
        """Put the installed values back after `remove`."""
        for target, name, value in self._installed:
            setattr(target, name, value)


def installation_of(model: object) -> Installation | None:
    return vars(model).get(ATTRIBUTE)


def install_deepcopy(installation: Installation, model: object,
                     transform_copy: Callable[[Any], Any]) -> None:
    """Make `copy.deepcopy(model)` return a copy of the plain model transformed by `transform_copy`."""

    def deepcopy_transformed(memo: dict[int, Any]) -> Any:
        installation.remove()
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            installation.restore()
        return transform_copy(clone)

    installation.set(model, "__deepcopy__", deepcopy_transformed)
    installation.set(model, ATTRIBUTE, installation)
