"""What hae_fx reads off each HF model before compiling it, and small models built in code for tests.

`family_of(model)` returns the `ModelFamily` that reads `model`: the entry in `FAMILIES` claiming its
`model_type`, or the generic reading, which covers HF's mainstream decoders and VLMs (their configs say where
the text decoder is, its attention geometry, each layer's attention kind and the image token). An entry is
needed only for facts a model keeps somewhere unusual.
"""

from __future__ import annotations

import torch

from hae_fx.errors import HAEUnsupportedModelError
from hae_fx.models.family import GENERIC, ModelFamily, decoder_layers

#: family entries for models the generic reading gets wrong (none of the tested families needs one today)
FAMILIES: tuple[ModelFamily, ...] = ()


def family_of(model: torch.nn.Module) -> ModelFamily:
    """The family that reads `model`.

    Raises:
        HAEUnsupportedModelError: `model` is not an HF generative model with a text decoder config.
    """
    for family in FAMILIES:
        if family.matches(model):
            return family
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate") or not hasattr(config, "get_text_config"):
        raise HAEUnsupportedModelError(
            f"hae_fx transforms HF generative models (a PreTrainedModel with a config and generate()); "
            f"{type(model).__name__} is not one"
        )
    text = config.get_text_config(decoder=True)
    if getattr(text, "num_hidden_layers", None) is None or getattr(text, "num_attention_heads", None) is None:
        raise HAEUnsupportedModelError(
            f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) has no text decoder "
            "config with num_hidden_layers and num_attention_heads; hae_fx needs a decoder-only language model"
        )
    return GENERIC


__all__ = ["FAMILIES", "GENERIC", "ModelFamily", "decoder_layers", "family_of"]
