"""Tiny LLaVA (`LlavaForConditionalGeneration`) models built in code: CLIP vision tower, projector, Llama decoder.

Image patches enter the decoder as `image_token_id` placeholders replaced by projected features, so the
visual tokens of a prompt are exactly `input_ids == image_token_id`. hae_fx compiles only the language model
(`model.model.language_model`); the vision tower stays eager, as it does under HF's own compile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

if TYPE_CHECKING:
    import torch


def tiny_llava_config(*, text_layers: int = 2, image_size: int = 32, patch_size: int = 8, vocab_size: int = 256,
                      attn_implementation: str = "sdpa", initializer_range: float = 0.02,
                      kv_heads: int = 2) -> LlavaConfig:
    """A LLaVA config small enough for CPU tests: `(image_size / patch_size)^2` visual tokens per image
    (16 by default; the CLS feature is dropped), 4 query heads sharing `kv_heads` KV heads (grouped-query), and
    `vocab_size - 6` as the image token id. HF's default `initializer_range` (0.02) gives a random model almost
    uniform attention; about 0.2 spreads it out the way trained models do, so that eviction has real choices."""
    image_token_id = vocab_size - 6
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                       num_key_value_heads=kv_heads, vocab_size=vocab_size, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=initializer_range)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         initializer_range=initializer_range)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    return config


def tiny_llava(seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA in eval mode (`tiny_llava_config` documents the shape)."""
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval()
    model.generation_config.eos_token_id = None  # random weights emit EOS early; compare full token streams
    model.generation_config.pad_token_id = 0
    return model


def visual_token_count(config: LlavaConfig) -> int:
    """Visual tokens one image contributes (CLIP patches, plus the CLS token when the strategy keeps it)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """What LLaVA's vision tower and projector give the decoder, `[N, hidden]`: one row per image placeholder token
    of the batch, in order. An exported package whose tower stays outside it takes these
    (`hae_fx.export(..., {"image_features": ...})`, docs/deploy.md)."""
    import torch

    config = model.config
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixel_values,
                                             vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy)
    return torch.cat(list(out.pooler_output)).reshape(-1, config.text_config.hidden_size)


def llava_prompt(config: LlavaConfig, *, prefix: list[int], suffix: list[int]) -> list[int]:
    """Token ids of `prefix`, one image's placeholders, then `suffix`."""
    return [*prefix, *([config.image_token_id] * visual_token_count(config)), *suffix]
