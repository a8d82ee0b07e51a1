"""GPU facts for the foundation: tiny LLaVA decode under `mode="reduce-overhead"`.

Checks, on one CUDA device: hae tokens equal the eager references (HF eager static cache for `full`; hae's
eager-reference path for `streaming`), `cudagraph_skips == 0`, and which Triton kernels Inductor generated for
the decode graph (does the slot write fuse with the slot mask and the attention?). Times decode side by side
with HF's own compiled static-cache path, as ratios from one run.

    python benchmarks/gpu_foundation.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava

NEW_TOKENS = 64


def prompt(model, device):
    ids = torch.tensor([llava_prompt(model.config, prefix=[1, 17, 42], suffix=[7, 8, 9, 10])], device=device)
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                .to(device), max_new_tokens=NEW_TOKENS, do_sample=False)


def decode_ms_per_token(generate, inputs) -> float:
    """Wall time of a generate call minus a 1-token call (the prefill), per decode step, after a warm-up call
    (which compiles whatever the path compiles)."""
    generate(**inputs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(**{**inputs, "max_new_tokens": 1})
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    generate(**inputs)
    torch.cuda.synchronize()
    return (time.perf_counter() - start - prefill) / (NEW_TOKENS - 1) * 1e3


def kernel_names(codes: list[str]) -> list[str]:
    return sorted({name for code in codes for name in re.findall(r"def (triton_\w+)\(", code)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    reference = tiny_llava(seed=0).to(device)
    inputs = prompt(reference, device)
    hf_eager = reference.generate(**inputs, cache_implementation="static", disable_compile=True)

    configs = {"full": hae_fx.HAEConfig(policy="full", capacity=96),
               "streaming": hae_fx.HAEConfig(policy="streaming", capacity=24, sinks=4, window=8)}
    for name, config in configs.items():
        torch._dynamo.utils.counters.clear()
        model = hae_fx.transform(tiny_llava(seed=0).to(device), config, mode="reduce-overhead")
        out, codes = run_and_get_code(model.generate, **inputs)
        # run_and_get_code returns the code of every graph compiled during the call: prefill first, then decode
        eager_ref = hae_fx.transform(tiny_llava(seed=0).to(device), config, options={"hae.compiler": "eager"})
        expected = hf_eager if name == "full" else eager_ref.generate(**inputs)
        decode_code = codes[-1]
        results[name] = {
            "tokens_equal_eager": out.tolist() == expected.tolist(),
            "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],
            "decode_triton_kernels": kernel_names([decode_code]),
            "prefill_triton_kernels": kernel_names(codes[:-1]),
            "decode_extern_hae_calls": decode_code.count("torch.ops.hae"),
            "decode_ms_per_token": decode_ms_per_token(model.generate, inputs),
            "kv_bytes": hae_fx.HAECache.for_model(model, config, 1).kv_nbytes,
        }
        (args.out / f"gpu_foundation_decode_{name}.py").write_text(decode_code)

    hf_compiled_ms = decode_ms_per_token(
        lambda **kw: reference.generate(**kw, cache_implementation="static"), inputs)  # HF auto-compiles on CUDA
    results["hf_static_inductor_reduce_overhead_ms_per_token"] = hf_compiled_ms
    results["hf_eager_static_ms_per_token"] = decode_ms_per_token(
        lambda **kw: reference.generate(**kw, cache_implementation="static", disable_compile=True), inputs)
    for name in configs:
        results[name]["speedup_vs_hf_compiled"] = hf_compiled_ms / results[name]["decode_ms_per_token"]
    text = json.dumps(results, indent=2)
    (args.out / "gpu_foundation.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
