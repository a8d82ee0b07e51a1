"""GPU facts for exported packages: the `.pt2` built for CUDA against the compiled `transform()` path, in one run.

Builds one LLaVA-shaped model on the device (LLaVA-1.5-7B shapes in bf16 by default, `--quick` for the tiny fp32
LLaVA of the tests), then:

1. exports it with `hae` at half the full cache (`hae_fx.export`): export seconds, package bytes;
2. loads the package (`hae_fx.load`): load seconds;
3. generates greedily with the package and with `hae_fx.transform(..., mode="reduce-overhead")` on the same model:
   whether the tokens are equal (and the share that agree), and decode ms/token of each, side by side;
4. samples with the package (`generate(do_sample=True, temperature=, top_k=, top_p=, seed=S)`) and with HF's
   `generate(do_sample=True, ...)` on the same transformed model after `torch.manual_seed(S)`: whether the sampled
   tokens are equal (and the share that agree). The runner draws from a generator seeded with `S`, one multinomial
   call over the batch per step, which is HF's order of draws from the default generator, so equal logits give
   equal tokens (tests/test_export.py checks the same on the CPU).

Decode ms/token is the wall time of a generate call minus a one-token call (the prefill), per decode step, after
a warm-up call (which compiles whatever the path compiles).

`--image-features` keeps the vision tower out of the package: the package's prefill takes LLaVA's projected image
features (`hae_fx.models.llava.image_features`, computed here once from the same pixels), and the compiled path
still runs on the pixels, so equal tokens also check that the two image routes agree. It is the route for a torch
whose `torch.export` does not take the vision tower (docs/deploy.md).

`--stage export` then `--stage measure` (same arguments) build the package in one process and load and measure
it in another, as a deployment would: on the GPU machine's torch 2.11, loading a CUDA package in the process that
compiled it crashed (docs/gpu.md).

`--device cpu` (with `--quick` only) is a functional check on a machine without a GPU: the `transform()` path then
runs its rewritten graphs without Inductor (the eager-reference compiler), so its times are not a speed
measurement.

    python benchmarks/export_gpu.py --out benchmarks/results/export_gpu.json [--quick] [--batch 8] [--new-tokens 128]
    python benchmarks/export_gpu.py --image-features --out benchmarks/results/export_gpu_features.json
    python benchmarks/export_gpu.py --quick --device cpu --out /tmp/export_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from speed import llava_shaped, prompt_inputs, synchronize

import hae_fx
from hae_fx.models.llava import image_features

#: the sampling settings of step 4 (each filter drops tokens of the tiny and the 7B-shaped vocabulary)
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}


def decode_ms_per_token(generate: Callable[[int], torch.Tensor], new_tokens: int, device: str
                        ) -> tuple[float, torch.Tensor]:
    """`(ms per decode step, the tokens of the full call)` for `generate(max_new_tokens)`."""
    generate(new_tokens)
    synchronize(device)
    start = time.perf_counter()
    generate(1)
    synchronize(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    tokens = generate(new_tokens)
    synchronize(device)
    return (time.perf_counter() - start - prefill) / (new_tokens - 1) * 1e3, tokens


def agreement(tokens: torch.Tensor, expected: torch.Tensor, prompt_len: int) -> dict[str, Any]:
    """Whether two generations are equal, and the share of their new tokens that agree."""
    new = slice(prompt_len, None)
    return {"equal": torch.equal(tokens, expected),
            "agreement": (tokens[:, new] == expected[:, new]).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--quick", action="store_true", help="the tiny fp32 LLaVA of the tests")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a functional check without a GPU (with --quick only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="the seed of the sampled comparison")
    parser.add_argument("--image-features", action="store_true",
                        help="the package takes projected image features; the vision tower stays outside it")
    parser.add_argument("--package", type=Path, default=Path("/tmp/hae_export_gpu/model.pt2"))
    parser.add_argument("--stage", choices=["all", "export", "measure"], default="all",
                        help="export: build the package, write its facts to --out and stop; measure: in a fresh "
                             "process, load the package an export stage with the same arguments built, and measure")
    args = parser.parse_args()
    device = args.device
    if device == "cpu" and not args.quick:
        parser.error("--device cpu runs the tiny LLaVA only: add --quick")
    model = llava_shaped(device, tiny=args.quick)
    inputs = prompt_inputs(model, images=1, batch=args.batch, device=device)
    prompt_len = inputs["input_ids"].shape[1]
    full = prompt_len + args.new_tokens
    budget = full // 2
    config = hae_fx.HAEConfig(capacity=budget + max(1, budget // 8), bin_size=max(1, budget // 8), sinks=4,
                              window=min(16, budget // 4))
    package_inputs = inputs
    if args.image_features:
        package_inputs = {"input_ids": inputs["input_ids"],
                          "image_features": image_features(model, inputs["pixel_values"])}
    results: dict[str, Any] = {
        "image_input": "image_features" if args.image_features else "pixel_values",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "model": "tiny-llava" if args.quick else "llava-1.5-7b-shaped", "batch": args.batch, "prompt_len": prompt_len,
        "new_tokens": args.new_tokens, "config": config.key(), "sampling": {**SAMPLING, "seed": args.seed}}

    if args.stage == "measure":
        built = json.loads(args.out.read_text())
        results.update(export_s=built["export_s"], package_bytes=built["package_bytes"], loaded_in="a fresh process")
    else:
        start = time.perf_counter()
        with torch.no_grad():
            hae_fx.export(model, package_inputs, args.package, config, max_prompt_len=prompt_len + 64)
        results["export_s"] = time.perf_counter() - start
        results["package_bytes"] = args.package.stat().st_size
    if args.stage == "export":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        return
    start = time.perf_counter()
    runner = hae_fx.load(args.package, expect_config=config)
    synchronize(device)
    results["load_s"] = time.perf_counter() - start
    package_ms, package_tokens = decode_ms_per_token(
        lambda new: runner.generate(**package_inputs, max_new_tokens=new), args.new_tokens, device)
    package_sampled = runner.generate(**package_inputs, max_new_tokens=args.new_tokens, do_sample=True,
                                      seed=args.seed, **SAMPLING)
    runner = None  # the package's cache and programs go before the compiled path allocates its own
    if device == "cuda":
        torch.cuda.empty_cache()

    if device == "cuda":
        hae_fx.transform(model, config, mode="reduce-overhead")
    else:
        hae_fx.transform(model, config, options={"hae.compiler": "eager"})
    results["transform_path"] = "inductor, reduce-overhead" if device == "cuda" else "eager reference"
    compiled_ms, compiled_tokens = decode_ms_per_token(
        lambda new: model.generate(**inputs, max_new_tokens=new, do_sample=False), args.new_tokens, device)
    torch.manual_seed(args.seed)
    compiled_sampled = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=True, **SAMPLING)
    greedy = agreement(package_tokens, compiled_tokens, prompt_len)
    sampled = agreement(package_sampled, compiled_sampled, prompt_len)
    results.update(package_decode_ms=package_ms, compiled_decode_ms=compiled_ms,
                   tokens_equal=greedy["equal"], token_agreement=greedy["agreement"],
                   sampled_tokens_equal=sampled["equal"], sampled_token_agreement=sampled["agreement"],
                   sampled_differs_from_greedy=not torch.equal(package_sampled, package_tokens))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
