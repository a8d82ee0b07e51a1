"""Prefill over prompts of many lengths: one dynamic-length graph against graphs compiled per length or per bucket.

For each model (the tiny LLaVA, SynthVLM) it measures, on the Inductor path:

- `exact`: a prefill graph compiled for one prompt length (what every new length used to cost): its compile time
  and its time to first token (TTFT) at that length;
- `dynamic` (what `hae_fx.transform` does): one graph whose prompt length is symbolic, compiled once at a warm-up
  length; then the TTFT of a new length, which compiles nothing;
- `bucket`: the new-length prompt left-padded to the next multiple of `--bucket` tokens, on a graph compiled for
  that bucket (the alternative design: one compile per bucket, padding computed at every prompt).

TTFT is `generate(max_new_tokens=1)` (prompt forward, no decode step), the median of `--repeats` runs, the three
variants taken in turn. Run: `OMP_NUM_THREADS=1 python benchmarks/prompt_lengths.py` (about 8 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava


def tiny_llava_prompt(length: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_llava(seed=0)
    base = llava_prompt(model.config, prefix=[1, 5], suffix=[])
    ids = base + [3 + i % 200 for i in range(length - len(base))]
    return model, {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 32, 32)}


def synthvlm_prompt(length: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from hae_fx.models.synthvlm import model as synthvlm
    from hae_fx.models.synthvlm.scenes import DESCRIBE_QUESTION

    model, tokenizer = synthvlm.load()
    base = synthvlm.prompt_ids(tokenizer, "")
    words = tokenizer.encode(DESCRIBE_QUESTION)
    ids = base + [words[i % len(words)] for i in range(length - len(base))]
    size = model.config.vision_config.image_size
    return model, {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, size, size)}


def left_pad(inputs: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids = inputs["input_ids"]
    pad = length - ids.shape[1]
    padded = torch.cat([torch.full((1, pad), pad_id), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    return {**inputs, "input_ids": padded, "attention_mask": mask}


def timed(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return time.perf_counter() - start


def interleaved_ttft(runs: dict[str, tuple[torch.nn.Module, dict]], repeats: int) -> dict[str, float]:
    """Median TTFT of each `(model, inputs)`, the runs taken in turn so that load on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, inputs) in runs.items():
            times[name].append(timed(model, inputs))
    return {name: statistics.median(values) for name, values in times.items()}


def measure(name: str, build: Callable[[int], tuple[torch.nn.Module, dict]], warm: int, new: int, bucket: int,
            capacity: int, repeats: int) -> None:
    config = hae_fx.HAEConfig(policy="streaming", capacity=capacity, sinks=4, window=8)
    bucket_len = -(-new // bucket) * bucket
    _, new_inputs = build(new)
    padded = left_pad(new_inputs, bucket_len, pad_id=0)

    # `hae_fx.transform` is the function; its module is where the prefill looks the marking up
    transform_module = importlib.import_module("hae_fx.transform")
    with mock.patch.object(transform_module, "mark_prompt_dynamic", lambda *args: None):
        exact, _ = build(new)
        hae_fx.transform(exact, config)
        exact_compile = timed(exact, new_inputs)
        bucketed, _ = build(new)
        hae_fx.transform(bucketed, config)
        bucket_compile = timed(bucketed, padded)

    dynamic, warm_inputs = build(warm)
    hae_fx.transform(dynamic, config)
    dynamic_compile = timed(dynamic, warm_inputs)
    torch._dynamo.utils.counters.clear()
    dynamic_first = timed(dynamic, new_inputs)
    new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    ttft = interleaved_ttft({"exact": (exact, new_inputs), "bucket": (bucketed, padded),
                             "dynamic": (dynamic, new_inputs)}, repeats)
    print(f"\n{name}: warm-up prompt {warm} tokens, new prompt {new} tokens, "
          f"bucket {bucket_len} (multiple of {bucket}); TTFT medians of {repeats} interleaved runs")
    print("| prefill | compile (s) | TTFT of the new length (ms) | vs exact |")
    print("| --- | --- | --- | --- |")
    print(f"| exact length | {exact_compile:.1f} | {ttft['exact'] * 1e3:.2f} | 1.00 |")
    print(f"| bucket (padded to {bucket_len}) | {bucket_compile:.1f} per bucket | {ttft['bucket'] * 1e3:.2f} | "
          f"{ttft['bucket'] / ttft['exact']:.2f} |")
    print(f"| dynamic length | {dynamic_compile:.1f} once | {ttft['dynamic'] * 1e3:.2f} (first call "
          f"{dynamic_first * 1e3:.1f}, {new_graphs} new graphs) | {ttft['dynamic'] / ttft['exact']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="+", default=["tiny-llava", "synthvlm"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    if "tiny-llava" in args.models:
        measure("tiny LLaVA", tiny_llava_prompt, warm=30, new=45, bucket=32, capacity=24, repeats=args.repeats)
    if "synthvlm" in args.models:
        measure("SynthVLM", synthvlm_prompt, warm=160, new=175, bucket=32, capacity=96, repeats=args.repeats)


if __name__ == "__main__":
    main()
