"""SynthVLM: a small, genuinely trained LLaVA that answers questions about grid-of-shapes scenes.

The architecture is HF's own `LlavaForConditionalGeneration` (CLIP vision tower, MLP projector, Llama decoder
with grouped-query attention), so hae_fx compiles it through exactly the code path a real LLaVA takes. A 96 px
image in 8 px patches gives 144 visual tokens, most of them background: that is what makes visual pruning
matter, and a 4x4 grid cell spans 3x3 patches, so answers depend on specific regions of the image.

The trained checkpoint ships inside the package (`CHECKPOINT_DIR`, safetensors, under 16 MB); `load()` reads
it offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from hae_fx.models.synthvlm.scenes import DEFAULT_IMAGE_SIZE, Cell
from hae_fx.models.synthvlm.tokenizer import WordTokenizer, build_vocab

IMAGE_SIZE = DEFAULT_IMAGE_SIZE
PATCH_SIZE = 8
VISUAL_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 144: CLIP's CLS feature is dropped ("default" strategy)
CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
TOKENIZER_FILE = "tokenizer.json"


def synthvlm_config(vocab_size: int | None = None) -> LlavaConfig:
    """The SynthVLM architecture: about 2.9 M parameters.

    Vision: CLIP, 128 wide, 3 layers, 8 px patches. Text: Llama, 192 wide, 4 layers, 6 query heads sharing 2 KV
    heads. The image placeholder is the tokenizer's `<image>` id.
    """
    vocab_size = len(build_vocab()) if vocab_size is None else vocab_size
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    text = LlamaConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                       bos_token_id=WordTokenizer.bos_id, eos_token_id=WordTokenizer.eos_id,
                       pad_token_id=WordTokenizer.pad_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=WordTokenizer.image_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=VISUAL_TOKENS)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


def set_generation_defaults(model: LlavaForConditionalGeneration) -> None:
    generation = model.generation_config
    generation.bos_token_id = WordTokenizer.bos_id
    generation.eos_token_id = WordTokenizer.eos_id
    generation.pad_token_id = WordTokenizer.pad_id
    generation.do_sample = False


def new_model(seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised SynthVLM (for training)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(synthvlm_config())
    set_generation_defaults(model)
    return model


def load(path: str | Path = CHECKPOINT_DIR, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> tuple[LlavaForConditionalGeneration, WordTokenizer]:
    """The trained model (in eval mode) and its tokenizer, from `path` (the shipped checkpoint by default)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"no SynthVLM checkpoint at {path} (config.json and {TOKENIZER_FILE} expected); train one with "
            f"`python -m hae_fx.models.synthvlm.train --out {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    set_generation_defaults(model)
    return model.to(device).eval(), WordTokenizer.load(path / TOKENIZER_FILE)


def save(model: LlavaForConditionalGeneration, tokenizer: WordTokenizer, path: str | Path) -> None:
    """`save_pretrained` (safetensors) plus the tokenizer's JSON, into `path`."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save(path / TOKENIZER_FILE)


def pixel_values(images: Sequence[Image.Image] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """`[N, 3, H, W]` float pixels in [-1, 1] from PIL images or `[N, H, W, 3]` uint8 arrays/tensors."""
    if isinstance(images, torch.Tensor):
        pixels = images
    else:
        array = images if isinstance(images, np.ndarray) else np.stack([np.asarray(i.convert("RGB")) for i in images])
        pixels = torch.from_numpy(array)
    return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def prompt_ids(tokenizer: WordTokenizer, question: str) -> list[int]:
    """`<bos>`, one image's placeholders, then the question: the prompt layout SynthVLM was trained on."""
    return [tokenizer.bos_id, *([tokenizer.image_id] * VISUAL_TOKENS), *tokenizer.encode(question)]


def cell_patches(cell: Cell, grid_size: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> list[int]:
    """Indices, among an image's visual tokens (patches in row-major order), of the patches of scene cell `cell` of
    a `grid_size` grid: those whose centre lies in the cell (so every patch belongs to exactly one cell, also when
    cells and patches do not align)."""
    side = image_size // patch_size
    cell_px = image_size / grid_size

    def cell_of(patch: int) -> int:  # the cell row (column) holding a patch row's (column's) centre
        return int((patch + 0.5) * patch_size // cell_px)

    row, col = cell
    return [r * side + c for r in range(side) if cell_of(r) == row for c in range(side) if cell_of(c) == col]
