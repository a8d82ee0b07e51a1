"""GPU facts for exported packages: the `.pt2` built for CUDA against the compiled `transform()` path, in one run.

Builds one LLaVA-shaped model on the GPU (LLaVA-1.5-7B shapes in bf16 by default, `--quick` for the tiny fp32
LLaVA of the tests), then:

1. exports it with `hae` at half the full cache (`hae_fx.export`): export seconds, package bytes;
2. loads the package (`hae_fx.load`): load seconds;
3. generates greedily with the package and with `hae_fx.transform(..., mode="reduce-overhead")` on the same model:
   whether the tokens are equal (and the share that agree), and decode ms/token of each, side by side.

Decode ms/token is the wall time of a generate call minus a one-token call (the prefill), per decode step, after
a warm-up call (which compiles whatever the path compiles).

    python benchmarks/export_gpu.py --out benchmarks/results/export_gpu.json [--quick] [--batch 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from speed import llava_shaped, prompt_inputs

import hae_fx


def decode_ms_per_token(generate: Callable[[int], torch.Tensor], new_tokens: int) -> tuple[float, torch.Tensor]:
    """`(ms per decode step, the tokens of the full call)` for `generate(max_new_tokens)`."""
    generate(new_tokens)
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate(1)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate(new_tokens)
    torch.cuda.synchronize()
    return (time.perf_counter() - start - prefill) / (new_tokens - 1) * 1e3, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--quick", action="store_true", help="the tiny fp32 LLaVA of the tests")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--package", type=Path, default=Path("/tmp/hae_export_gpu/model.pt2"))
    args = parser.parse_args()
    model = llava_shaped("cuda", tiny=args.quick)
    inputs = prompt_inputs(model, images=1, batch=args.batch, device="cuda")
    prompt_len = inputs["input_ids"].shape[1]
    full = prompt_len + args.new_tokens
    budget = full // 2
    config = hae_fx.HAEConfig(capacity=budget + max(1, budget // 8), bin_size=max(1, budget // 8), sinks=4,
                              window=min(16, budget // 4))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "model": "tiny-llava" if args.quick else "llava-1.5-7b-shaped", "batch": args.batch,
                               "prompt_len": prompt_len, "new_tokens": args.new_tokens, "config": config.key()}

    start = time.perf_counter()
    with torch.no_grad():
        hae_fx.export(model, inputs, args.package, config, max_prompt_len=prompt_len + 64)
    results["export_s"] = time.perf_counter() - start
    results["package_bytes"] = args.package.stat().st_size
    start = time.perf_counter()
    runner = hae_fx.load(args.package, expect_config=config)
    torch.cuda.synchronize()
    results["load_s"] = time.perf_counter() - start
    package_ms, package_tokens = decode_ms_per_token(
        lambda new: runner.generate(**inputs, max_new_tokens=new), args.new_tokens)
    runner = None  # the package's cache and programs go before the compiled path allocates its own
    torch.cuda.empty_cache()

    hae_fx.transform(model, config, mode="reduce-overhead")
    compiled_ms, compiled_tokens = decode_ms_per_token(
        lambda new: model.generate(**inputs, max_new_tokens=new, do_sample=False), args.new_tokens)
    new = slice(prompt_len, None)
    results.update(package_decode_ms=package_ms, compiled_decode_ms=compiled_ms,
                   tokens_equal=torch.equal(package_tokens, compiled_tokens),
                   token_agreement=(package_tokens[:, new] == compiled_tokens[:, new]).float().mean().item())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
