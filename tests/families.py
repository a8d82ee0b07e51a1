"""Tiny random models of the HF families hae_fx is tested on, built in code (no downloads), with prompts.

Each `Family` builds a fresh model from one fixed config and seed (so two builds share weights) and a left-padded
batch of prompts. `initializer_range=0.2` spreads random attention out, so that wrong masks change the logits
(with HF's 0.02 nearly uniform attention can hide them, and equal greedy tokens can hide wrong heads).
Windowed families get a window far shorter than prompt + new tokens, so the window matters at decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

VOCAB = 160
IMAGE = 150  # image placeholder id of the VLMs; 151-153 mark image starts and ends
WINDOW = 6

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB, initializer_range=0.2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


@dataclass(frozen=True)
class Family:
    """A tiny model of one HF family.

    Attributes:
        name: test id.
        config: builds the model config.
        image_tokens: placeholder tokens per image (0 for text-only models).
        extra_inputs: per-family model inputs besides ids and mask (pixels, grids, token types), from the ids.
        windowed: whether some layers attend within a window or chunk.
    """

    name: str
    config: Callable[[], object]
    image_tokens: int = 0
    extra_inputs: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]] | None = None
    windowed: bool = False

    def build(self, attn_implementation: str = "sdpa") -> torch.nn.Module:
        config = self.config()
        config._attn_implementation = attn_implementation
        torch.manual_seed(0)
        auto = AutoModelForImageTextToText if self.image_tokens else AutoModelForCausalLM
        model = auto.from_config(config).eval()
        model.generation_config.eos_token_id = None  # random weights emit EOS early; compare full token streams
        model.generation_config.pad_token_id = 0
        return model

    def inputs(self, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
        """Left-padded prompts of different lengths: text, then one image (VLMs), then text."""
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for row in range(batch):
            prefix = [1, *torch.randint(3, 140, (3,), generator=generator).tolist()]
            image = self._image_span() if self.image_tokens else []
            suffix = torch.randint(3, 140, (8 - 2 * row,), generator=generator).tolist()
            rows.append(prefix + image + suffix)
        width = max(map(len, rows))
        input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.extra_inputs is not None:
            inputs.update(self.extra_inputs(input_ids, generator))
        return inputs

    def _image_span(self) -> list[int]:
        return [IMAGE + 1, *[IMAGE] * self.image_tokens, IMAGE + 2]


def _text(model_type: str, **changes) -> Callable[[], object]:
    return lambda: AutoConfig.for_model(model_type, **{**_TEXT, **changes})


def _qwen_vl(model_type: str) -> Callable[[], object]:
    def config():
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, initializer_range=0.2)
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        text = dict(_TEXT, num_hidden_layers=3, rope_parameters=rope)
        if model_type == "qwen2_5_vl":
            vision.update(out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[0], window_size=8)
        if model_type == "qwen3_vl":
            vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                          deepstack_visual_indexes=[0], initializer_range=0.2)
            text = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
        return AutoConfig.for_model(model_type, vision_config=vision, text_config=text, image_token_id=IMAGE,
                                    video_token_id=IMAGE + 3, vision_start_token_id=IMAGE + 1,
                                    vision_end_token_id=IMAGE + 2)
    return config


def _qwen_vl_pixels(input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = input_ids.shape[0]  # one 4x4-patch image per prompt, merged 2x2 into 4 tokens
    return {"pixel_values": torch.randn(batch * 16, 3 * 2 * 4 * 4, generator=generator),
            "image_grid_thw": torch.tensor([[1, 4, 4]] * batch)}


def _gemma3() -> object:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    text = dict(_TEXT, num_hidden_layers=7, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)
    return AutoConfig.for_model("gemma3", vision_config=vision, text_config=text, mm_tokens_per_image=4,
                                image_token_index=IMAGE, boi_token_index=IMAGE + 1, eoi_token_index=IMAGE + 2)


def _gemma3_inputs(input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(input_ids.shape[0], 3, 16, 16, generator=generator),
            "token_type_ids": (input_ids == IMAGE).long()}


def _paligemma() -> object:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4, projection_dim=64)
    text = dict(_TEXT, model_type="gemma", head_dim=16, num_hidden_layers=3)
    return AutoConfig.for_model("paligemma", vision_config=vision, text_config=text, image_token_index=IMAGE,
                                projection_dim=64, hidden_size=64)


def _llava_next() -> object:
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=8, patch_size=4, projection_dim=32)
    return AutoConfig.for_model("llava_next", vision_config=vision, text_config=dict(_TEXT, model_type="llama"),
                                image_token_index=IMAGE, vision_feature_layer=-1, image_grid_pinpoints=[[8, 8]])


def _llava_next_pixels(input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = input_ids.shape[0]  # an 8x8 image: the base view and one tile, 4 + 4 features and 2 row ends
    return {"pixel_values": torch.randn(batch, 2, 3, 8, 8, generator=generator),
            "image_sizes": torch.tensor([[8, 8]] * batch)}


def _mistral3() -> object:
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4, head_dim=16)
    text = dict(_TEXT, model_type="mistral", sliding_window=None, head_dim=16)
    return AutoConfig.for_model("mistral3", vision_config=vision, text_config=text, image_token_index=IMAGE,
                                spatial_merge_size=2, vision_feature_layer=-1)


def _mistral3_pixels(input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = input_ids.shape[0]
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator),
            "image_sizes": torch.tensor([[16, 16]] * batch)}


def _llava_onevision() -> object:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=4)
    return AutoConfig.for_model("llava_onevision", vision_config=vision, text_config=dict(_TEXT, model_type="qwen2"),
                                image_token_index=IMAGE, vision_feature_layer=-1, image_grid_pinpoints=[[8, 8]])


def _aya_vision() -> object:
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    text = dict(_TEXT, model_type="cohere2", sliding_window=WINDOW)  # three sliding layers to one global
    return AutoConfig.for_model("aya_vision", vision_config=vision, text_config=text, image_token_index=IMAGE,
                                downsample_factor=2, vision_feature_layer=-1)


def _janus() -> object:
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4,
                  projection_dim=64, depth=1, num_image_tokens=16, mlp_ratio=2.0)
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, num_hidden_layers=1)
    return AutoConfig.for_model("janus", vision_config=vision, vq_config=vq,
                                text_config=dict(_TEXT, model_type="llama"), image_token_id=IMAGE)


def _square_pixels(input_ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(input_ids.shape[0], 3, 16, 16, generator=generator)}


FAMILIES: tuple[Family, ...] = (
    Family("llama", _text("llama")),
    Family("mistral-window", _text("mistral", sliding_window=WINDOW), windowed=True),
    Family("qwen2", _text("qwen2")),
    Family("qwen2-window", _text("qwen2", sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2),
           windowed=True),
    Family("qwen3", _text("qwen3", head_dim=16)),
    Family("phi3", _text("phi3")),
    Family("olmo2", _text("olmo2")),
    Family("stablelm-partial-rotary", _text("stablelm", partial_rotary_factor=0.25)),
    Family("granite", _text("granite")),
    Family("cohere", _text("cohere")),
    Family("falcon-multi-query", lambda: AutoConfig.for_model(
        "falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, alibi=False,
        new_decoder_architecture=False, vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
    Family("gpt-neox", lambda: AutoConfig.for_model(
        "gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=2)),
    Family("gpt2", lambda: AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2)),
    Family("gemma3-text", _text("gemma3_text", num_hidden_layers=7, sliding_window=WINDOW, head_dim=16,
                                query_pre_attn_scalar=16), windowed=True),
    Family("llama4-chunked", lambda: AutoConfig.for_model(
        "llama4_text", **{**_TEXT, "head_dim": 16, "intermediate_size_mlp": 128, "attention_chunk_size": WINDOW - 1,
                          "num_local_experts": 2, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2}),
           windowed=True),
    Family("qwen2-vl", _qwen_vl("qwen2_vl"), image_tokens=4, extra_inputs=_qwen_vl_pixels),
    Family("qwen2.5-vl", _qwen_vl("qwen2_5_vl"), image_tokens=4, extra_inputs=_qwen_vl_pixels),
    Family("qwen3-vl", _qwen_vl("qwen3_vl"), image_tokens=4, extra_inputs=_qwen_vl_pixels),
    Family("gemma3-vlm", _gemma3, image_tokens=4, extra_inputs=_gemma3_inputs, windowed=True),
    Family("paligemma-prefix-lm", _paligemma, image_tokens=16, extra_inputs=_gemma3_inputs),
    Family("llava-next", _llava_next, image_tokens=10, extra_inputs=_llava_next_pixels),
    Family("mistral3-pixtral", _mistral3, image_tokens=4, extra_inputs=_mistral3_pixels),
    Family("llava-onevision", _llava_onevision, image_tokens=10, extra_inputs=_llava_next_pixels),
    Family("aya-vision", _aya_vision, image_tokens=4, extra_inputs=_square_pixels, windowed=True),
    Family("janus", _janus, image_tokens=16, extra_inputs=_square_pixels),
)

#: gemma3-text with a window longer than the capacities the tests give, and shorter than prompt + new tokens: with
#: `PolicyConfig.full_windows` its sliding layers keep more tokens than the global layers' capacity
GEMMA3_TEXT_WIDE = Family("gemma3-text-wide", _text("gemma3_text", num_hidden_layers=7, sliding_window=20,
                                                    head_dim=16, query_pre_attn_scalar=16), windowed=True)
BY_NAME = {family.name: family for family in [*FAMILIES, GEMMA3_TEXT_WIDE]}


def phi4_multimodal() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """Phi-4-multimodal, whose text decoder runs its vision and audio towers itself (refused with images), and a
    prompt with one 16x16 image (13 placeholder tokens: 2x2 features per crop, row ends, the separator)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4, crop_size=16, image_token_id=IMAGE, feature_layer=-1)
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
                 depthwise_separable_out_channel=32, nemo_conv_channels=32, audio_token_id=IMAGE + 3)
    config = AutoConfig.for_model("phi4_multimodal", **_TEXT, vision_config=vision, audio_config=audio)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7, *[IMAGE] * 13, 8, 9, 10]]),
              "image_pixel_values": torch.randn(1, 2, 3, 16, 16), "image_sizes": torch.tensor([[16, 16]]),
              "image_attention_mask": torch.ones(1, 2, 4, 4, dtype=torch.long)}
    return model, inputs
