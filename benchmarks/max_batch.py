"""The largest batch that fits on the device at a given context: HF's compiled static cache against hae at -50% KV.

A cache is static in both paths, so what a batch needs is known as soon as its first decode steps run: HF's
`StaticCache` is allocated for prompt + `max_new_tokens` at the start of `generate`, hae's `HAECache` for its
capacity. For each configuration (LLaVA-1.5-7B shapes, random bf16 weights, the 621-token LLaVA prompt, new tokens
up to `--context`), every run:

1. builds the model, compiles it as the speed benchmark does (`reduce-overhead`), and generates with
   `max_new_tokens = context - prompt`, stopped by a criterion after `STEPS` decode steps (the caches are then at
   their full size; hae's cache is made for the exact batch, `HAECache.for_model(model, config, batch)`, where
   `generate` alone would round the batch up to a power-of-two bucket);
2. records `torch.cuda.max_memory_allocated` over that call, compilation included.

Peak memory is linear in the batch (weights, plus per row the cache and the prompt's activations), so two points
(`--batches`, measured in parallel processes) give `peak = a + b * batch`, and the largest batch is the one whose
predicted peak stays under the device's total memory less `--margin-gib`. The line is only a first guess (on the
H200, `hae` at -50% KV ran out of memory at 105 rows, where it predicted 7 GiB to spare), so the batch it gives
is then run (alone) and the search brackets the answer (`next_batch`): after a run that fits, the next batch is
`--step` of it larger; after one that runs out of memory, `--step` less, or halfway between the largest that ran
and the smallest that did not once that is closer; at most `--tries` runs per configuration. The reported batch
is the largest that ran, with the smallest that ran out of memory and whether the two are adjacent (`settled`).

    python benchmarks/max_batch.py --context 4096 --out DIR          # on the GPU (6-10 minutes on an H200)
    python benchmarks/max_batch.py --configs hae50 --bracket 100 105 --out DIR   # continue a search cut short
    python benchmarks/max_batch.py --device cpu --quick --out DIR    # a functional check (no memory figures)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from speed import hae_config, llava_shaped, prompt_inputs
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from waves import run_in_waves

import hae_fx

#: decode steps each run takes before it is stopped: enough for the decode graph to be captured and replayed
STEPS = 4
CONFIGS = ("hf_static", "full", "hae50")


class StopAfter(StoppingCriteria):
    """Finishes every row after `steps` generated tokens, whatever `max_new_tokens` sized the cache for."""

    def __init__(self, steps: int) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool, device=input_ids.device)


def peak_at(name: str, batch: int, context: int, device: str, quick: bool) -> dict[str, Any]:
    """Compile and run configuration `name` at `batch` rows for a `context`-token sequence; its peak GiB. Each call
    runs in a process of its own (`measure`), so nothing of one run is left for the next to free."""
    model = llava_shaped(device, quick)
    inputs = prompt_inputs(model, images=1, batch=batch, device=device)
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = context - prompt_len
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False,
                              "stopping_criteria": StoppingCriteriaList([StopAfter(STEPS)])}
    config = hae_config(name, context)
    if name == "hf_static":
        kwargs.update(cache_implementation="static", disable_compile=device != "cuda")
    else:
        hae_fx.transform(model, config, mode="reduce-overhead" if device == "cuda" else None,
                         options=None if device == "cuda" else {"hae.compiler": "eager"})
        kwargs["past_key_values"] = hae_fx.HAECache.for_model(model, config, batch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate(**inputs, **kwargs)
    seconds = time.perf_counter() - start
    result = {"config": name, "batch": batch, "context": context, "prompt_len": prompt_len,
              "capacity": config.capacity if config is not None else context, "steps": out.shape[1] - prompt_len,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
              "seconds": seconds}
    return result


def largest_batch(points: list[dict[str, Any]], limit_gib: float) -> int:
    """The largest batch whose peak, on the line through two measured `(batch, peak_gib)` points, is under
    `limit_gib`."""
    (b0, p0), (b1, p1) = sorted((p["batch"], p["peak_gib"]) for p in points)
    per_row = (p1 - p0) / (b1 - b0)
    return math.floor(b0 + (limit_gib - p0) / per_row)


def next_batch(ran: int, failed: int | None, step: float) -> int | None:
    """The next batch of the search, given the largest batch that ran and the smallest that ran out of memory (None
    before any did); None once they are adjacent, when the largest batch is known. Below a failure it tries
    `step` less first, not the midpoint: the largest batch that ran may be one of the small measured points."""
    if failed is None:
        return ran + max(1, round(ran * step))
    if failed - ran <= 1:
        return None
    below = math.floor(failed * (1 - step))
    return below if ran < below < failed else (ran + failed) // 2


def _run(item: tuple[str, int, int, str, bool], turn) -> dict[str, Any]:
    """One process: `peak_at` (module level, for `run_in_waves`)."""
    name, batch, context, device, quick = item
    try:
        return peak_at(name, batch, context, device, quick)
    except torch.OutOfMemoryError as error:  # the allocator's account: what was asked, held and free
        return {"config": name, "batch": batch, "context": context, "out_of_memory": str(error).split("\n")[0]}


def measure(items: list[tuple], jobs: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def record(item: tuple, value: dict | None, error: str | None) -> None:
        results.append(value if value is not None else {"config": item[0], "batch": item[1], "error": error})
        print(json.dumps(results[-1]), flush=True)

    run_in_waves(_run, items, jobs, record)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["hf_static", "hae50"])
    parser.add_argument("--context", type=int, default=4096, help="prompt + new tokens each row is sized for")
    parser.add_argument("--batches", nargs=2, type=int, default=[4, 8], help="the two measured points")
    parser.add_argument("--margin-gib", type=float, default=1.0, help="device memory kept free of the prediction")
    parser.add_argument("--step", type=float, default=0.05, help="share of the batch added after a run that fits")
    parser.add_argument("--tries", type=int, default=5, help="runs of the search, per configuration")
    parser.add_argument("--bracket", nargs=2, type=int, metavar=("RAN", "FAILED"),
                        help="continue an earlier search of one configuration from the largest batch that ran and "
                             "the smallest that ran out of memory (the two-point line is then not measured)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="the tiny fp32 LLaVA at a 128-token context")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.bracket and (len(args.configs) != 1 or not 0 < args.bracket[0] < args.bracket[1]):
        parser.error("--bracket RAN FAILED continues the search of one configuration (--configs NAME), RAN < FAILED")
    context = 128 if args.quick else args.context
    args.out.mkdir(parents=True, exist_ok=True)
    points = [] if args.bracket else measure([(name, batch, context, args.device, args.quick)
                                              for name in args.configs for batch in args.batches],
                                             jobs=len(args.configs) * 2)
    total_gib = torch.cuda.mem_get_info()[1] / 2**30 if args.device == "cuda" else None
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                               "torch": torch.__version__, "context": context, "total_gib": total_gib,
                               "margin_gib": args.margin_gib, "points": points, "largest": {}}
    if total_gib is not None:
        for name in args.configs:
            mine = [p for p in points if p["config"] == name and p.get("peak_gib") is not None]
            if args.bracket:
                predicted = None
                ran, failed = args.bracket
                batch: int | None = next_batch(ran, failed, args.step)
            elif len(mine) < 2:
                continue
            else:
                predicted = largest_batch(mine, total_gib - args.margin_gib)
                ran, failed = max(p["batch"] for p in mine), None
                batch = predicted
            tried = []
            for _ in range(args.tries):  # alone on the device: one process at a time
                if batch is None:
                    break
                tried += measure([(name, batch, context, args.device, args.quick)], jobs=1)
                if tried[-1].get("peak_gib") is not None:
                    ran = max(ran, batch)
                else:
                    failed = batch if failed is None else min(failed, batch)
                batch = next_batch(ran, failed, args.step)
            summary["largest"][name] = {"predicted": predicted, "bracket_from": args.bracket, "batch": ran,
                                        "out_of_memory_at": failed,
                                        "settled": failed is not None and failed - ran == 1, "runs": tried}
        if "hf_static" in summary["largest"]:
            base = summary["largest"]["hf_static"]["batch"]
            for entry in summary["largest"].values():
                entry["vs_hf_static"] = entry["batch"] / base if entry["batch"] and base else None
    path = args.out / f"max_batch_llava7b_{context}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["largest"], indent=1))


if __name__ == "__main__":
    main()
