"""`ModelFamily`: the per-family facts hae_fx cannot read off a graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFamily:
    """Facts about one family of HF models.

    Attributes:
        name: short name used in messages.
        model_types: `config.model_type` values of the top-level models this family accepts.
        language_model: returns the text decoder (a module with `.layers`) inside a top-level model.
        image_token_id: returns the id of the image placeholder token, or None for text-only models.
    """

    name: str
    model_types: tuple[str, ...]
    language_model: Callable[[torch.nn.Module], torch.nn.Module]
    image_token_id: Callable[[torch.nn.Module], int | None]

    def matches(self, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types and hasattr(model, "generate")

    def text_config(self, model: torch.nn.Module):
        return model.config.get_text_config(decoder=True)

    def num_layers(self, model: torch.nn.Module) -> int:
        return self.text_config(model).num_hidden_layers

    def kv_geometry(self, model: torch.nn.Module) -> tuple[int, int]:
        """`(kv_heads, head_dim)` of the text decoder's attention."""
        text = self.text_config(model)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return kv_heads, head_dim
