"""What the passes need to know about each supported model family, and tiny test configs built in code.

A family answers three questions the graph cannot: which submodule is the text decoder (the part hae_fx
compiles), which token id marks image patches (to tag visual tokens), and the decoder's attention geometry.
"""

from __future__ import annotations

import torch

from hae_fx.errors import HAEUnsupportedModelError
from hae_fx.models.family import ModelFamily
from hae_fx.models.llama import TEXT_DECODER
from hae_fx.models.llava import LLAVA

FAMILIES: tuple[ModelFamily, ...] = (LLAVA, TEXT_DECODER)


def family_of(model: torch.nn.Module) -> ModelFamily:
    """The family `model` belongs to; raises `HAEUnsupportedModelError` naming the supported ones."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    supported = "; ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise HAEUnsupportedModelError(
        f"hae_fx does not support {type(model).__name__} (model_type={model_type!r}). Supported families: "
        f"{supported}. A new family needs a ModelFamily entry in hae_fx.models."
    )


__all__ = ["FAMILIES", "ModelFamily", "family_of"]
