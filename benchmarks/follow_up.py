"""Time to first token of a follow-up turn: one compiled chunk against one decode step per token.

On the Inductor path, a transformed tiny LLaVA (`full`, which takes follow-ups as one chunk, `hae_fx.turns`) answers
a first prompt, then gets a follow-up of `--turn` new tokens on the returned cache. TTFT is the time of that
follow-up's `generate(max_new_tokens=1)`: the median of `--repeats` runs, each on a freshly answered first turn,
the two variants taken in turn:

- `chunk` (what `hae_fx.transform` does for a cache that never evicts): the turn in one graph;
- `token by token` (what evicting policies do): the turn through the decode step, one token at a time.

Run: `OMP_NUM_THREADS=1 python benchmarks/follow_up.py` (about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

import hae_fx
from hae_fx.models.llava import llava_prompt, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turn", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model = tiny_llava(seed=0)
    model.generation_config.eos_token_id = None
    hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=256))
    prompt = {"input_ids": torch.tensor([llava_prompt(model.config, prefix=[1, 5], suffix=[7, 8, 9])]),
              "pixel_values": torch.randn(1, 3, 32, 32)}
    turn = torch.tensor([[3 + (5 * i) % 190 for i in range(args.turn)]])

    def follow_up_seconds() -> float:
        first = model.generate(**prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        history = torch.cat([first.sequences, turn], dim=1)
        start = time.perf_counter()
        model.generate(input_ids=history, past_key_values=first.past_key_values, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - start

    token_by_token = mock.patch("hae_fx.turns.chunk_applies", return_value=False)
    with torch.no_grad():
        start = time.perf_counter()
        follow_up_seconds()  # compiles prefill, decode and the chunk graph
        with token_by_token:
            follow_up_seconds()
        print(f"warm-up (compiles) {time.perf_counter() - start:.1f} s")
        times: dict[str, list[float]] = {"chunk": [], "token by token": []}
        for _ in range(args.repeats):
            times["chunk"].append(follow_up_seconds())
            with token_by_token:
                times["token by token"].append(follow_up_seconds())
    chunk = statistics.median(times["chunk"])
    print(f"| follow-up of {args.turn} tokens | TTFT (ms) | vs chunk |")
    print("| --- | --- | --- |")
    for variant, samples in times.items():
        median = statistics.median(samples)
        print(f"| {variant} | {median * 1e3:.1f} | {median / chunk:.2f} |")


if __name__ == "__main__":
    main()
