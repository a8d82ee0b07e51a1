"""GPU facts for the `hae` policy: decode under `mode="reduce-overhead"` (CUDA graphs) and prefill/decode timings
against `full` at the same prompt, on the tiny LLaVA and on a LLaVA-1.5-7B-shaped model with random bf16 weights.

Each run writes one JSON per policy under `--out` and prints the ratios against `full` of every result there for
the same model and batch (run all policies on one machine, in one session, so they compare like with like).

    python benchmarks/gpu_hae.py --model tiny --out DIR
    python benchmarks/gpu_hae.py --model llava7b --policies full hae hae_prune --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed import llava_shaped
from transformers import LlavaForConditionalGeneration

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava, visual_token_count

REPEATS = 3
#: where models run; `--device cpu` is a quick functional check of the script (no CUDA graphs)
DEVICE = "cuda"


def llava7b_shaped() -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's shapes with random bf16 weights, built on `DEVICE` (`benchmarks/speed.py` documents them)."""
    return llava_shaped(DEVICE, tiny=False)


MODELS = {
    "tiny": dict(build=lambda: tiny_llava(seed=0, text_layers=4, initializer_range=0.2).to(DEVICE), suffix=40,
                 max_token_id=200, new_tokens=128, capacity=32, bin_size=8, max_visual_keep=4),
    "llava7b": dict(build=llava7b_shaped, suffix=40, max_token_id=30000, new_tokens=128, capacity=448, bin_size=64,
                    max_visual_keep=192),
}


def policy_config(name: str, spec: dict, prompt_len: int) -> hae_fx.HAEConfig:
    full_capacity = prompt_len + spec["new_tokens"]
    hae = hae_fx.HAEConfig(policy="hae", capacity=spec["capacity"], bin_size=spec["bin_size"])
    return {
        "full": hae_fx.HAEConfig(policy="full", capacity=full_capacity),
        "hae": hae,
        "hae_prune": hae.replace(prune_hidden=True, max_visual_keep=spec["max_visual_keep"]),
        "streaming": hae_fx.HAEConfig(policy="streaming", capacity=spec["capacity"]),
    }[name]


def prompt_inputs(model, spec: dict, batch: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    suffix = torch.randint(3, spec["max_token_id"], (spec["suffix"],), generator=generator)
    ids = llava_prompt(model.config, prefix=[1, 3, 4, 5, 6], suffix=suffix.tolist())
    image_size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    return dict(input_ids=torch.tensor([ids] * batch, device=DEVICE),
                pixel_values=pixels.to(DEVICE, model.dtype), do_sample=False)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(call) -> float:
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def measure(model, inputs: dict, new_tokens: int) -> dict:
    """Median over REPEATS of the prefill (a 1-token generate) and of the decode step (the rest of a
    `new_tokens` generate, per token), after a warm-up of each that compiles and captures the CUDA graphs."""
    def prefill():
        return model.generate(**inputs, max_new_tokens=1)

    def generate():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    prefill(), generate()
    prefill_ms = [timed(prefill) for _ in range(REPEATS)]
    total_ms = [timed(generate) for _ in range(REPEATS)]
    prefill_median = statistics.median(prefill_ms)
    return {"prefill_ms": prefill_median,
            "decode_ms_per_token": (statistics.median(total_ms) - prefill_median) / (new_tokens - 1),
            "prefill_ms_runs": prefill_ms, "generate_ms_runs": total_ms}


def run_policy(model_name: str, policy: str, batch: int, out: Path) -> dict:
    spec = MODELS[model_name]
    model = spec["build"]()
    inputs = prompt_inputs(model, spec, batch)
    prompt_len = inputs["input_ids"].shape[1]
    config = policy_config(policy, spec, prompt_len)
    torch._dynamo.utils.counters.clear()
    build_start = time.perf_counter()
    hae_fx.transform(model, config, mode="reduce-overhead" if DEVICE == "cuda" else None)
    result = {"model": model_name, "policy": policy, "batch": batch, "prompt_len": prompt_len,
              "visual_tokens": visual_token_count(model.config), "new_tokens": spec["new_tokens"],
              "config": dict(vars(config))}
    out_cache = model.generate(**inputs, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                               return_dict_in_generate=True)
    result["first_generate_s_with_compile"] = time.perf_counter() - build_start
    result.update(measure(model, inputs, spec["new_tokens"]))
    counters = torch._dynamo.utils.counters
    result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    result["graph_breaks"] = sum(counters["graph_break"].values())
    result["unique_graphs"] = counters["stats"]["unique_graphs"]
    cache = out_cache.past_key_values
    report = hae_fx.report(cache)
    result["kv_bytes"] = report.kv_bytes
    result["report"] = str(report)
    result["prefill_kept_len"] = cache.prefill_kept_len
    result["prefill_kept_visual"] = [len(set(kept) & set(visual)) for kept, visual in
                                     zip(cache.prefill_kept, cache.prompt_visual_positions, strict=True)]
    records = model.hae_graphs["prefill"]
    result["prefill_tokens_per_layer"] = records[-1].tokens_per_layer if records else {}
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    (out / f"gpu_hae_{model_name}_b{batch}_{policy}.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("report", "config")}, default=str), flush=True)
    print(report, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--policies", nargs="+", default=["full", "hae", "hae_prune", "streaming"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    for policy in args.policies:
        run_policy(args.model, policy, args.batch, args.out)
        torch._dynamo.reset()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(summary(args.out, args.model, args.batch))


def summary(out: Path, model_name: str, batch: int) -> str:
    """Ratios against `full` for every policy result of `model_name` at `batch` under `out`."""
    results = {}
    for path in sorted(out.glob(f"gpu_hae_{model_name}_b{batch}_*.json")):
        result = json.loads(path.read_text())
        results[result["policy"]] = result
    if "full" not in results:
        return "no full-cache result to compare with"
    full = results["full"]
    lines = [f"{model_name}, batch {batch}, prompt {full['prompt_len']} tokens, {full['new_tokens']} new tokens"]
    for policy, result in results.items():
        lines.append(
            f"{policy:>10}: prefill {result['prefill_ms']:.2f} ms ({result['prefill_ms'] / full['prefill_ms']:.2f}x "
            f"full), decode {result['decode_ms_per_token']:.3f} ms/token "
            f"({result['decode_ms_per_token'] / full['decode_ms_per_token']:.2f}x full), "
            f"KV {result['kv_bytes'] / full['kv_bytes']:.2f}x full, cudagraph_skips {result['cudagraph_skips']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
