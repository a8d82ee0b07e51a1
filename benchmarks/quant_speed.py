"""Eviction times quantization on the GPU: decode speed and memory of torchao weights with hae's quantized KV.

On LLaVA-1.5-7B's shapes (random bf16 weights, `gpu_families.llava7b_config`), batch 8, a 621-token prompt (576 visual
tokens) and 128 new tokens, in one process, each row on a freshly built copy of the same weights:

- `hf_bf16`: HF `generate(cache_implementation="static")` (HF compiles its decode step), bf16 weights;
- `hf_int4`: the same with torchao int4 weight-only weights (`Int4WeightOnlyConfig`, group 128, tinygemm layout);
- `hae_int4_int8kv`: hae at half the full cache's slots, the same int4 weights, int8 KV (`kv_dtype="int8"`),
  under `mode="reduce-overhead"`;
- `hae_int4` (with `--all`): the same at bf16 KV, which separates the KV quantization's share.

Each row records decode ms/token (CUDA events around a long and a 2-token generate: prefill and first token
cancel), peak allocated memory while generating (`build_peak_gib` apart: each row builds bf16 weights before it
quantizes them), weight and KV bytes (quantized weights counted through their inner tensors), the
floor `(weight bytes + KV bytes read per step) / bandwidth` and the ratio to it, greedy-token agreement with
`hf_int4`, CUDA-graph skips and graph counts. HF's static cache reads every slot of its `prompt + new` buffer each
step; hae reads its capacity.

    python benchmarks/quant_speed.py --out DIR                  # every row (docs/quantization.md: their times)
    python benchmarks/quant_speed.py --device cpu --out DIR     # tiny LLaVA, int8 weights: a functional check
    python benchmarks/quant_speed.py --rows hae_int4_int8kv --out DIR   # one hae row (after hf_int4, its reference)
    python benchmarks/quant_speed.py --rows hae_int4 --text-layers 2 --out DIR   # a row's compile, in minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_families import build as build_model
from gpu_families import llava7b_config, release_memory
from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava

#: measured copy bandwidth of the H200 (docs/gpu.md), bytes/s
H200_BANDWIDTH = 4.26e12
BATCH = 8
NEW_TOKENS = 128
#: every row, in the default order
ROWS = ("hf_bf16", "hf_int4", "hae_int4_int8kv", "hae_int4")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) counts its inner tensors."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def decoder_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight a decode step reads: the language model and the LM head (not the vision tower)."""
    return sum(tensor_bytes(p) for name, p in model.named_parameters() if "vision_tower" not in name
               and "multi_modal_projector" not in name)


def build(device: str, text_layers: int | None) -> torch.nn.Module:
    """The seeded model of every row (each build is the same weights); `text_layers`: its first decoder layers only."""
    if device != "cuda":
        return tiny_llava(seed=0, text_layers=text_layers or 4, initializer_range=0.2)
    config = llava7b_config(tiny=False)
    if text_layers is not None:
        config.text_config.num_hidden_layers = text_layers
    return build_model(config, device, torch.bfloat16)


def quantize_weights(model: torch.nn.Module, device: str) -> str:
    """int4 weight-only on CUDA (tinygemm's tile-packed layout, which needs no extra kernel package); int8 weight-only
    on CPU, where torchao 0.18 has no int4 path. The vision tower stays bf16: decode never runs it."""
    config = (Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d") if device == "cuda"
              else Int8WeightOnlyConfig())
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear)
              and "vision_tower" not in fqn)
    return type(config).__name__


def prompt_inputs(model: torch.nn.Module, device: str, batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    suffix = torch.randint(3, 30000 if device == "cuda" else 200, (40,), generator=generator)
    ids = llava_prompt(model.config, prefix=[1, 3, 4, 5, 6], suffix=suffix.tolist())
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return {"input_ids": torch.tensor([ids] * batch, device=device), "pixel_values": pixels.to(device, model.dtype),
            "do_sample": False}


def decode_ms_per_token(model: torch.nn.Module, inputs: dict, device: str, **kwargs) -> tuple[torch.Tensor, float]:
    """Greedy tokens of a NEW_TOKENS generate, and its decode ms/token: CUDA events around it and around a 2-token
    generate (CPU: wall clock), after a warm-up that compiles and captures."""
    def run(count: int) -> tuple[torch.Tensor, float]:
        if device != "cuda":
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, **kwargs)
            return out, (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        out = model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, **kwargs)
        end.record()
        torch.cuda.synchronize()
        return out, begin.elapsed_time(end)

    run(NEW_TOKENS)  # compile, capture, warm up
    _, short = run(2)
    tokens, long = run(NEW_TOKENS)
    return tokens, (long - short) / (NEW_TOKENS - 2)


def hf_static_kv_bytes(model: torch.nn.Module, batch: int, length: int) -> int:
    """K/V bytes of HF's static cache for `length` tokens: what each of its decode steps reads."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * length * head_dim * model.dtype.itemsize


def measure(label: str, device: str, batch: int, text_layers: int | None,
            reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    release_memory(device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build(device, text_layers)
    weights = quantize_weights(model, device) if "int4" in label else str(model.dtype)
    inputs = prompt_inputs(model, device, batch)
    prompt_len = inputs["input_ids"].shape[1]
    # Every row builds bf16 weights before quantizing them: the build's peak is not what serving it costs.
    build_peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    release_memory(device)
    row: dict = {"label": label, "weights": weights, "batch": batch, "prompt_len": prompt_len,
                 "text_layers": model.config.text_config.num_hidden_layers,
                 "new_tokens": NEW_TOKENS, "weight_bytes": decoder_weight_bytes(model),
                 "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "torch": torch.__version__}
    if label.startswith("hf"):
        tokens, row["ms_per_token"] = decode_ms_per_token(model, inputs, device, cache_implementation="static")
        row["kv_bytes"] = hf_static_kv_bytes(model, batch, prompt_len + NEW_TOKENS)
    else:
        capacity = (prompt_len + NEW_TOKENS) // 2
        config = hae_fx.HAEConfig(policy="hae", capacity=capacity, bin_size=min(64, capacity // 4),
                                  kv_dtype="int8" if label.endswith("int8kv") else None)
        hae_fx.transform(model, config, mode="reduce-overhead" if device == "cuda" else None)
        tokens, row["ms_per_token"] = decode_ms_per_token(model, inputs, device)
        cache = hae_fx.HAECache.for_model(model, config, batch)
        row.update(kv_bytes=cache.kv_nbytes, capacity=capacity, kv_dtype=config.kv_dtype,
                   decode_graphs=len(model.hae_graphs["decode"]))
        del cache
    counters = torch._dynamo.utils.counters
    row.update(cudagraph_skips=counters["inductor"]["cudagraph_skips"],
               graph_breaks=sum(counters["graph_break"].values()),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
               build_peak_gib=build_peak_gib)
    row["floor_ms"] = (row["weight_bytes"] + row["kv_bytes"]) / H200_BANDWIDTH * 1e3
    row["floor_ratio"] = row["ms_per_token"] / row["floor_ms"]
    if reference is not None:
        new = slice(prompt_len, None)
        row["token_agreement_with_hf_int4"] = (tokens[:, new] == reference[:, new]).float().mean().item()
    del model
    return row, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--all", action="store_true", help="also hae at half capacity with int4 weights, bf16 KV")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None,
                        help="only these rows, in this order (default: all but hae_int4, which --all adds); a hae "
                             "row brings hf_int4 first, the reference of its token agreement. Splits a run that "
                             "does not fit one call's time limit (a 32-layer hae compile takes minutes)")
    parser.add_argument("--text-layers", type=int, default=None,
                        help="only the first N decoder layers (a quick check of a row's compile on the GPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    labels = args.rows or list(ROWS if args.all else ROWS[:-1])
    if "hf_int4" not in labels and any(label.startswith("hae") for label in labels):
        labels.insert(0, "hf_int4")
    rows, reference = [], None
    for label in labels:
        row, tokens = measure(label, args.device, args.batch, args.text_layers, reference)
        if label == "hf_int4":
            reference = tokens
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / f"quant_speed_{args.device}_b{args.batch}.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]["ms_per_token"]
    print(f"{'row':>16} {'ms/token':>9} {'vs ' + rows[0]['label']:>10} {'weights GB':>10} {'KV GB':>6} {'floor ms':>8} "
          f"{'x floor':>7} {'peak GiB':>8}")
    for row in rows:
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
        print(f"{row['label']:>16} {row['ms_per_token']:>9.3f} {row['ms_per_token'] / base:>10.2f} "
              f"{row['weight_bytes'] / 1e9:>10.2f} {row['kv_bytes'] / 1e9:>6.2f} {row['floor_ms']:>8.3f} "
              f"{row['floor_ratio']:>7.2f} {peak:>8}")


if __name__ == "__main__":
    main()
