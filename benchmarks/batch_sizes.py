"""A new batch size: batch buckets (padding to the next power of two) against a dynamic batch dimension.

On the Inductor path, a Llama-shaped decoder (random weights, `streaming` eviction) prefills a prompt and decodes
`--steps` tokens at batch 3 through `torch.compile(model, backend="hae")`, three ways:

- `exact`: graphs compiled for batch 3 (what every new batch size used to cost);
- `bucket` (what `hae_fx.transform` does): graphs compiled for batch 4, the 3 rows padded with a fourth;
- `dynamic`: graphs whose batch dimension is symbolic (every input and cache buffer marked dynamic in dim 0),
  compiled at batch 2, then run at batch 3 (Dynamo's counters say whether that compiled anything).

It prints each variant's compile time (first prefill and decode calls) and its decode time per token at batch 3,
the median of `--steps` steps. Run: `OMP_NUM_THREADS=1 python benchmarks/batch_sizes.py` (about 4 minutes on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hae_fx

PROMPT = 64


def build() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def run(compiled, model, config, rows: int, real: int, steps: int, dynamic: bool) -> tuple[float, list[float]]:
    """Prefill and decode `rows` rows (`real` of them real); returns (seconds of the first prefill and decode call,
    seconds per later decode step)."""
    cache = hae_fx.HAECache.for_model(model, config, batch=rows)
    ids = torch.randint(3, 2000, (rows, PROMPT), generator=torch.Generator().manual_seed(real))

    def marked(*tensors: torch.Tensor) -> None:
        if dynamic:
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)

    marked(*cache.buffers(), ids)
    cache.begin_prefill(torch.arange(PROMPT).expand(rows, PROMPT))
    marked(cache.prompt_pos, cache.prompt_modality)
    start = time.perf_counter()
    with torch.no_grad():
        out = compiled(input_ids=ids, past_key_values=cache)
        cache.end_prefill()
        timings = []
        for step in range(steps + 1):
            token = out.logits[:, -1:].argmax(-1)
            position = torch.full((rows, 1), PROMPT + step)
            marked(token, position)
            begin = time.perf_counter()
            out = compiled(input_ids=token, past_key_values=cache, position_ids=position)
            timings.append(time.perf_counter() - begin)
            if step == 0:
                first = time.perf_counter() - start
    return first, timings[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    config = hae_fx.HAEConfig(policy="streaming", capacity=96, sinks=4, window=16)
    rows = []
    for variant, rows_run, warm_rows, dynamic in (("exact", 3, None, False), ("bucket", 4, None, False),
                                                  ("dynamic", 3, 2, True)):
        torch._dynamo.reset()
        model = build()
        compiled = torch.compile(model, backend="hae", fullgraph=True, dynamic=None if dynamic else False)
        with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
            if warm_rows is not None:
                compile_s, _ = run(compiled, model, config, warm_rows, warm_rows, 2, dynamic)
                torch._dynamo.utils.counters.clear()
            first, timings = run(compiled, model, config, rows_run, 3, args.steps, dynamic)
            if warm_rows is None:
                compile_s = first
        new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if warm_rows is not None else "-"
        rows.append((variant, compile_s, statistics.median(timings) * 1e3, new_graphs))
    print("| variant | compile (s) | decode ms/token at batch 3 | new graphs at batch 3 |")
    print("| --- | --- | --- | --- |")
    for variant, compile_s, per_token, new_graphs in rows:
        print(f"| {variant} | {compile_s:.1f} | {per_token:.2f} | {new_graphs} |")


if __name__ == "__main__":
    main()
