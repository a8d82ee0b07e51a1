"""`ModelFamily`: the facts hae_fx reads off an HF model's config and modules before compiling it.

Every fact has a generic reading that covers HF's mainstream decoders (Llama, Mistral, Qwen, Gemma, Phi, OLMo,
GPT-NeoX, GPT-2, Falcon and the VLMs built on them); a family entry overrides only what a model stores
somewhere unusual. What the graph itself shows (where attention is, its form) is found by the passes, and a
layout they cannot handle is refused there, by what was found.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hae_fx.errors import HAEUnsupportedModelError
from hae_fx.layer_kinds import LayerKind, layer_kinds

#: config attributes that hold the image placeholder token id, in the order HF models use them
IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index")


@dataclass(frozen=True)
class ModelFamily:
    """How to read one family of HF models.

    Attributes:
        name: short name used in messages.
        model_types: `config.model_type` values this entry claims; the generic reading has none.
        find_language_model: overrides how the text decoder (the module hae_fx compiles) is found.
        find_image_token_id: overrides how the image placeholder token id is found (None: text only).
    """

    name: str
    model_types: tuple[str, ...] = ()
    find_language_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    find_image_token_id: Callable[[torch.nn.Module], int | None] | None = None

    def matches(self, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in self.model_types

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The text decoder: the module whose layers read the KV cache."""
        if self.find_language_model is not None:
            return self.find_language_model(model)
        layers = self.num_layers(model)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        if _layer_list(decoder, layers) is not None:
            return decoder
        # HF's get_decoder misses some wrappers (Llama 4's text model): the shallowest non-vision module that
        # holds the decoder's layer list
        for name, module in model.named_modules():
            if "vision" not in name and "visual" not in name and _layer_list(module, layers) is not None:
                return module
        decoder_layers(decoder, layers)  # raises, naming what was looked for
        return decoder

    def image_token_id(self, model: torch.nn.Module) -> int | None:
        if self.find_image_token_id is not None:
            return self.find_image_token_id(model)
        for name in IMAGE_TOKEN_ATTRIBUTES:
            value = getattr(model.config, name, None)
            if isinstance(value, int):
                return value
        return None

    def text_config(self, model: torch.nn.Module):
        return model.config.get_text_config(decoder=True)

    def num_layers(self, model: torch.nn.Module) -> int:
        return self.text_config(model).num_hidden_layers

    def kv_geometry(self, model: torch.nn.Module) -> tuple[int, int]:
        """`(kv_heads, head_dim)` of the text decoder's attention.

        KV heads go by several names: `num_key_value_heads` (Llama and most), `num_kv_heads` (Falcon's new
        layout), `multi_query` (Falcon's and GPT-BigCode's single shared head). The cache checks the first
        keys it is given against this, so a name missing here fails loudly rather than attending over
        zero heads.
        """
        text = self.text_config(model)
        heads = text.num_attention_heads
        if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
            kv_heads = 1
        else:
            kv_heads = getattr(text, "num_key_value_heads", None) or getattr(text, "num_kv_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return kv_heads, head_dim

    def check_supported(self, model: torch.nn.Module) -> None:
        """Refuse layouts the config announces and hae_fx cannot compute exactly.

        ALiBi (`alibi=True`, Falcon; MPT's `attn_config.alibi`) adds a per-key position bias to the attention
        logits, sized by the sequence rather than the slots; the rewritten attention would drop it.
        """
        text = self.text_config(model)
        attn_config = getattr(text, "attn_config", None)
        if getattr(text, "alibi", False) or getattr(attn_config, "alibi", False):
            raise HAEUnsupportedModelError(
                f"{type(model).__name__} uses ALiBi position biases (config alibi=True): its attention adds a bias per "
                "key position that hae::slot_attention over fixed slots does not apply; hae_fx supports rotary and "
                "learned absolute positions"
            )

    def towers_inside(self, language_model: torch.nn.Module) -> list[str]:
        """Paths of the models nested in the text decoder (a vision or audio tower it runs in its own forward,
        Phi-4-multimodal's image embedding), as `path (ClassName)`.

        hae_fx compiles the text decoder as one prefill graph; a tower inside it is traced into that graph, and
        towers branch on their data (crop counts, `nonzero` of the image tokens), which Dynamo cannot trace.
        """
        return [f"{name} ({type(module).__name__})" for name, module in language_model.named_modules()
                if name and isinstance(module, PreTrainedModel) and module.config is not language_model.config]

    def layer_kinds(self, model: torch.nn.Module) -> list[LayerKind]:
        """Each decoder layer's attention kind (global, sliding window, chunked)."""
        return layer_kinds(self.text_config(model))


GENERIC = ModelFamily(name="generic")


def tower_not_traceable(language_model: torch.nn.Module, towers: list[str],
                        error: torch._dynamo.exc.Unsupported) -> HAEUnsupportedModelError:
    """The refusal of a prompt whose prefill Dynamo cannot trace because a tower inside the text decoder ran in it
    (`ModelFamily.towers_inside`): names the towers, Dynamo's reason and where it stopped."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    frames = [line.strip() for line in str(error).splitlines() if line.strip().startswith("File ")]
    where = f" ({frames[-1]})" if frames else ""
    return HAEUnsupportedModelError(
        f"{type(language_model).__name__}, the text decoder hae_fx compiles, runs {', '.join(towers)} inside its own "
        f"forward, and Dynamo cannot trace that into one prefill graph: {reason}{where}. hae_fx supports models whose "
        "vision tower runs outside the text decoder (LLaVA, Qwen-VL, Gemma 3 layouts); prompts without image or audio "
        "inputs still run"
    )


def decoder_layers(decoder: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList:
    """The decoder's list of layers: `decoder.layers`, or its one `ModuleList` of `num_layers` modules (GPT-2's
    `h`). Raises `HAEUnsupportedModelError` when there is none."""
    layers = _layer_list(decoder, num_layers)
    if layers is None:
        raise HAEUnsupportedModelError(
            f"hae_fx could not find the decoder layers of {type(decoder).__name__}: it has no `layers` and no single "
            f"ModuleList of {num_layers} modules; add a ModelFamily entry in hae_fx.models whose find_language_model "
            "returns the module holding them"
        )
    return layers


def _layer_list(module: torch.nn.Module, num_layers: int) -> torch.nn.ModuleList | None:
    layers = getattr(module, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    candidates = [child for child in module.children()
                  if isinstance(child, torch.nn.ModuleList) and len(child) == num_layers]
    return candidates[0] if len(candidates) == 1 else None
