"""Decode speed, time to first token and memory of HF's generation paths and hae_fx's, side by side in one process.

Every configuration runs the same prompts on a fresh build of the same random weights: HF eager (dynamic cache),
HF `generate(cache_implementation="static")` (HF compiles its decode step, `reduce-overhead`), hae `full`,
`full` with HF's own decode loop (`transform(decode_loop="hf")`), `full` without projection fusion
(`transform(fuse_projections=False)`: q/k/v and gate/up as separate matmuls), hae at -50% and -80% KV, `hae` with
hidden-state pruning, and `streaming` at -50%. `--policies` adds each named registered policy at `--capacity` slots
(`h2o@448`, protecting what the accuracy sweep protects: 4 sinks, a window and bin of an eighth of the capacity).
Decode ms/token is the median interval between consecutive steps, each marked by a CUDA event that a logits
processor records; the floor is (decoder weights + live KV bytes) / the copy bandwidth measured in the same run, so
`floor ratio` says how far a step is from reading its bytes once. `--jobs N` builds and compiles N configurations at
once, each in its own process, and then times them one at a time (benchmarks/waves.py): most of a run is compiling.

    python benchmarks/speed.py --model llava7b --batch 8 --out benchmarks/results          # on the GPU
    python benchmarks/speed.py --configs hf_static --policies all --capacity 448 --jobs 5 --out DIR  # every policy
    python benchmarks/speed.py --device cpu --quick --out DIR                               # a functional check
    python benchmarks/speed.py --batch 8 --configs full full_nofuse --out DIR                # projection fusion

Writes `speed_<model>_<prompt>.csv` (one row per configuration and batch), a JSON with every measurement and a
plot under `--out`, and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_families import build, llava7b_config, release_memory
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LogitsProcessor
from waves import run_in_waves

import hae_fx
from hae_fx.config import PolicyConfig
from hae_fx.models.llava import llava_prompt, tiny_llava, visual_token_count
from hae_fx.policies import available, sweep_config

#: HF and hae_fx generation paths; the hae ones name their capacity as a share of a full cache's
CONFIGS = ("hf_eager", "hf_static", "full", "full_hf_loop", "full_nofuse", "hae50", "hae80", "hae50_prune",
           "streaming50")
#: capacity as a share of prompt + new tokens
KV_SHARE = {"hae50": 0.5, "hae80": 0.2, "hae50_prune": 0.5, "streaming50": 0.5}
#: prompts: LLaVA-1.5's single image (576 visual tokens at 7B shapes), and five images (2,880 visual tokens)
PROMPTS = {"llava": 1, "visual": 5}


def llava_shaped(device: str, tiny: bool) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B's shapes (ViT-L/14 at 336 px: 576 visual tokens; Llama-2-7B: 32 layers, 32 heads, 4096
    hidden) with random bf16 weights built on `device`; `tiny`: the fp32 tiny LLaVA of the tests."""
    if tiny:
        return tiny_llava(seed=0, text_layers=2, initializer_range=0.2).to(device)
    return build(llava7b_config(tiny=False), device, torch.bfloat16)


def prompt_inputs(model, images: int, batch: int, device: str) -> dict[str, torch.Tensor]:
    """BOS and 4 text tokens, `images` images each followed by 8 text tokens, then 32 text tokens."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.config.text_config.vocab_size, 30000)
    ids = [1, 3, 4, 5, 6]
    for _ in range(images):
        text = torch.randint(3, vocab - 8, (8,), generator=generator).tolist()
        ids = llava_prompt(model.config, prefix=ids, suffix=text)
    ids += torch.randint(3, vocab - 8, (32,), generator=generator).tolist()
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch * images, 3, size, size, generator=generator)
    return {"input_ids": torch.tensor([ids] * batch, device=device), "pixel_values": pixels.to(device, model.dtype)}


class StepEvents(LogitsProcessor):
    """Records an event on the device stream at every decoding step (HF calls logits processors once per step)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.events: list[Any] = []
        self.host_times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        self.host_times.append(time.perf_counter())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.host_times, self.host_times[1:], strict=False)]


@dataclass
class Result:
    config: str
    batch: int
    prompt_len: int
    visual_tokens: int
    new_tokens: int
    capacity: int | None
    kv_bytes: int
    decode_ms: float
    decode_wall_ms: float
    ttft_ms: float
    first_generate_s: float
    peak_gib: float
    peak_with_compile_gib: float
    floor_ms: float
    floor_ratio: float
    token_agreement: float | None
    cudagraph_skips: int
    graphs: int
    gpu_busy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB (64 MiB on the CPU)."""
    size = (1 << 30) if device == "cuda" else (64 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(12):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times[2:])


def decoder_weight_bytes(model) -> int:
    """Bytes a decode step reads of weights: the text decoder and the LM head (the vision tower runs only at
    prefill)."""
    vision = {id(p) for part in (model.model.vision_tower, model.model.multi_modal_projector)
              for p in part.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in vision)


def kv_bytes_per_token(model, batch: int) -> int:
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * head_dim * model.dtype.itemsize


def policy_config(label: str) -> PolicyConfig:
    """The config of a `policy@capacity` label: the registered policy at that capacity, protecting 4 sinks and a
    window and bin of an eighth of it (fields a policy does not declare are left out)."""
    name, capacity = label.split("@")
    slots = int(capacity)
    return sweep_config(name, capacity=slots, sinks=min(4, slots // 4), window=max(1, slots // 8),
                        bin_size=max(1, slots // 8))


def hae_config(name: str, full_capacity: int) -> PolicyConfig | None:
    if "@" in name:
        return policy_config(name)
    if name in ("full", "full_hf_loop", "full_nofuse"):
        return hae_fx.HAEConfig(policy="full", capacity=full_capacity)
    if name not in KV_SHARE:
        return None
    capacity = round(KV_SHARE[name] * full_capacity)
    # the tiny model's capacities need fewer protected tokens than the defaults
    protected = {} if capacity >= 64 else {"sinks": 2, "window": 4}
    if name.startswith("streaming"):
        return hae_fx.HAEConfig(policy="streaming", capacity=capacity, **protected)
    config = hae_fx.HAEConfig(policy="hae", capacity=capacity, bin_size=max(2, capacity // 8), **protected)
    return config.replace(prune_hidden=True) if name.endswith("_prune") else config


def cache_bytes(cache) -> int:
    if isinstance(cache, hae_fx.HAECache):
        return cache.kv_nbytes
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def run_config(name: str, args, batch: int, images: int, bandwidth: float,
               turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> tuple[Result, torch.Tensor]:
    """Build, compile (the first generate) and time one configuration; returns its row (without token agreement,
    which needs the reference's tokens) and its greedy tokens. The timed part runs inside `turn()`."""
    device = args.device
    model = llava_shaped(device, args.quick)
    inputs = prompt_inputs(model, images, batch, device)
    prompt_len = inputs["input_ids"].shape[1]
    new_tokens = args.new_tokens
    config = hae_config(name, prompt_len + new_tokens)
    generate_kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if name == "hf_static":
        generate_kwargs["cache_implementation"] = "static"
        if device != "cuda":
            generate_kwargs["disable_compile"] = True  # the CPU check runs HF's static cache eagerly
    elif name == "hf_eager":
        generate_kwargs["disable_compile"] = True
    else:
        mode = "reduce-overhead" if device == "cuda" else None
        options = None if device == "cuda" else {"hae.compiler": "eager"}
        hae_fx.transform(model, config, mode=mode, options=options,
                         decode_loop="hf" if name == "full_hf_loop" else "hae",
                         fuse_projections=name != "full_nofuse")
    torch._dynamo.utils.counters.clear()

    def generate(tokens: int, steps: StepEvents | None = None, **extra) -> Any:
        kwargs = {**generate_kwargs, "max_new_tokens": tokens, "min_new_tokens": tokens, **extra}
        if steps is not None:
            kwargs["logits_processor"] = [steps]
        return model.generate(**inputs, **kwargs)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    recording = name in args.memory_snapshot and device == "cuda"
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    start = time.perf_counter()
    generate(new_tokens)
    synchronize(device)
    first_generate_s = time.perf_counter() - start
    if recording:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        path = args.out / f"peak_allocations_{name}_b{batch}.json"
        path.write_text(json.dumps(peak_allocations(snapshot), indent=1))
    peak_with_compile = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0

    with turn():
        timed_from = time.time()
        measured = _timed_part(generate, new_tokens, device, want_busy=args.busy)
        timed_until = time.time()
    ttfts, intervals, wall_ms, peak, out, busy, kernels = measured
    decode_ms = statistics.median(intervals)
    ttft = statistics.median(ttfts)

    tokens = out.sequences[:, prompt_len:].cpu()
    kv = cache_bytes(out.past_key_values)
    capacity = config.capacity if config is not None else None
    per_token = kv_bytes_per_token(model, batch)
    live = [min(capacity or 1 << 60, prompt_len + step) * per_token for step in range(new_tokens)]
    floor_ms = (decoder_weight_bytes(model) + statistics.mean(live)) / bandwidth * 1e3
    counters = torch._dynamo.utils.counters
    visual_tokens = images * visual_token_count(model.config)
    result = Result(config=name, batch=batch, prompt_len=prompt_len, visual_tokens=visual_tokens,
                    new_tokens=new_tokens, capacity=capacity, kv_bytes=kv, decode_ms=decode_ms,
                    decode_wall_ms=(wall_ms - ttft) / max(new_tokens - 1, 1), ttft_ms=ttft,
                    first_generate_s=first_generate_s, peak_gib=peak, peak_with_compile_gib=peak_with_compile,
                    floor_ms=floor_ms, floor_ratio=decode_ms / floor_ms, token_agreement=None,
                    cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                    graphs=counters["stats"]["unique_graphs"], gpu_busy=busy,
                    extra={"decode_ms_p10_p90": [_quantile(intervals, 0.1), _quantile(intervals, 0.9)],
                           "ttft_runs_ms": ttfts, "weights_bytes": decoder_weight_bytes(model),
                           "timed_unix_s": [timed_from, timed_until], "decode_kernels_us": kernels})
    return result, tokens


def _timed_part(generate: Callable[..., Any], new_tokens: int, device: str, want_busy: bool) -> tuple:
    """TTFT (three one-token calls), then a `new_tokens` generate with a CUDA event per step, then optionally the
    GPU-busy profile: `(ttfts, step intervals, wall ms, peak GiB, the generate's output, busy share, µs per decode
    step by kernel)`."""
    ttfts = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        generate(1)
        synchronize(device)
        ttfts.append((time.perf_counter() - start) * 1e3)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = StepEvents(device)
    synchronize(device)
    start = time.perf_counter()
    out = generate(new_tokens, steps, return_dict_in_generate=True)
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    intervals = steps.intervals_ms()
    busy, kernels = decode_profile(generate) if want_busy and device == "cuda" else (None, {})
    return ttfts, intervals, wall_ms, peak, out, busy, kernels


def release(device: str) -> None:
    """Free the last configuration's model, cache and compiled graphs before the next one is built."""
    torch._dynamo.reset()
    release_memory(device)


def peak_allocations(snapshot: dict, top: int = 40) -> dict[str, Any]:
    """The blocks alive at the moment of peak allocated memory in a `torch.cuda.memory` history, largest first,
    each with the innermost frames of its allocation stack."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live, total, peak, peak_index = {}, 0, 0, -1
    for index, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
            if total > peak:
                peak, peak_index = total, index
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])
    live_at_peak: dict[int, dict] = {}
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live_at_peak[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            live_at_peak.pop(event["addr"], None)
    blocks = sorted(live_at_peak.values(), key=lambda e: -e["size"])
    # blocks allocated before recording started (the weights) are not in the history
    return {"peak_recorded_bytes": peak, "blocks_alive": len(blocks),
            "largest": [{"bytes": e["size"], "frames": [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} "
                                                        f"{f['name']}" for f in e.get("frames", [])
                                                        if f["filename"].endswith(".py")][:8]}
                        for e in blocks[:top]]}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def kernel_profile(call: Callable[[], Any]) -> tuple[float, list[tuple[float, float]], dict[str, float]]:
    """One call under torch.profiler: `(wall µs, its kernels' (start, end) spans, µs per kernel name)`."""
    from torch.profiler import ProfilerActivity, profile

    synchronize("cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call()
        synchronize("cuda")
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start]
    by_name: dict[str, float] = {}
    for event in kernels:
        by_name[event.name] = by_name.get(event.name, 0.0) + event.time_range.end - event.time_range.start
    return wall_us, sorted((e.time_range.start, e.time_range.end) for e in kernels), by_name


def busy_share(wall_us: float, spans: list[tuple[float, float]]) -> float | None:
    """Share of `wall_us` during which some kernel ran (the union of the kernels' spans)."""
    if not spans:
        return None
    busy, (current_start, current_end) = 0.0, spans[0]
    for begin, end in spans[1:]:
        if begin > current_end:
            busy += current_end - current_start
            current_start, current_end = begin, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy / wall_us


#: decode steps the GPU-busy profile covers, and the kernels per step it reports
PROFILED_STEPS, TOP_KERNELS = 32, 12


def decode_profile(generate: Callable[[int], Any]) -> tuple[float | None, dict[str, float]]:
    """`(GPU-busy share of a PROFILED_STEPS-token generate, µs per decode step of its TOP_KERNELS costliest kernels
    and of all of them as "total")`. A one-token generate (the prefill and the first token) is profiled too and
    its kernels are taken off, so the kernels are those of the decode steps."""
    _, _, prefill = kernel_profile(lambda: generate(1))
    wall_us, spans, whole = kernel_profile(lambda: generate(PROFILED_STEPS + 1))
    per_step = {name: (us - prefill.get(name, 0.0)) / PROFILED_STEPS for name, us in whole.items()}
    top = dict(sorted(per_step.items(), key=lambda item: -item[1])[:TOP_KERNELS])
    return busy_share(wall_us, spans), {**{name: round(us, 2) for name, us in top.items()},
                                        "total": round(sum(per_step.values()), 2)}


COLUMNS = ("config", "batch", "prompt_len", "visual_tokens", "capacity", "kv_bytes", "decode_ms", "decode_wall_ms",
           "floor_ms", "floor_ratio", "ttft_ms", "first_generate_s", "peak_gib", "peak_with_compile_gib", "gpu_busy",
           "token_agreement", "cudagraph_skips", "graphs")


def table(results: list[Result]) -> str:
    """Markdown table, with decode and TTFT ratios against HF static (compiled) at the same batch."""
    base = {r.batch: r for r in results if r.config == "hf_static"}
    header = [*COLUMNS, "decode vs hf_static", "ttft vs hf_static"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in results:
        row = asdict(r)
        cells = [_cell(row[c]) for c in COLUMNS]
        ref = base.get(r.batch)
        cells += [f"{r.decode_ms / ref.decode_ms:.2f}" if ref else "", f"{r.ttft_ms / ref.ttft_ms:.2f}" if ref else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r.config}\nB{r.batch}" for r in results]
    speed.bar(labels, [r.decode_ms for r in results], color="tab:blue", label="decode ms/token")
    speed.plot(labels, [r.floor_ms for r in results], "k_", markersize=20, label="floor")
    speed.set_ylabel("ms per token")
    speed.legend()
    memory.bar(labels, [r.peak_gib for r in results], color="tab:orange")
    memory.set_ylabel("peak GiB (steady generate)")
    for axis in (speed, memory):
        axis.tick_params(axis="x", labelrotation=60, labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llava7b"], default="llava7b")
    parser.add_argument("--prompt", choices=sorted(PROMPTS), default="llava")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--policies", nargs="+", default=[], choices=[*available(), "all"],
                        help="registered policies to add at --capacity slots each (all: every one but full)")
    parser.add_argument("--capacity", type=int, default=448, help="slots of each --policies configuration")
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="the tiny fp32 LLaVA and 8 new tokens")
    parser.add_argument("--busy", action="store_true",
                        help="also profile a 33-token generate: GPU-busy time and the decode step's costliest kernels")
    parser.add_argument("--memory-snapshot", nargs="*", default=[], choices=CONFIGS,
                        help="configs whose first generate records the CUDA allocator history; writes the blocks "
                             "alive at peak to peak_allocations_<config>_b<batch>.json")
    parser.add_argument("--jobs", type=int, default=1,
                        help="configurations built and compiled at once, each in its own process, then timed one "
                             "at a time (benchmarks/waves.py); bounded by device memory")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 8)
    args.out.mkdir(parents=True, exist_ok=True)
    model_name = "tiny" if args.quick else args.model
    bandwidth = measure_bandwidth(args.device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    policies = [p for p in available() if p != "full"] if "all" in args.policies else args.policies
    configs = args.configs + [f"{policy}@{args.capacity}" for policy in policies]
    configs = sorted(configs, key=lambda c: c != "hf_static")  # the token reference first
    work = [(batch, name) for batch in args.batch for name in configs]
    measured: dict[tuple[int, str], tuple[Result, torch.Tensor]] = {}
    failures: dict[str, str] = {}
    progress = tqdm(total=len(work), desc="speed", unit="config")

    def record(item: tuple[int, str], value: tuple[Result, torch.Tensor] | None, error: str | None = None) -> None:
        if value is None:
            failures[f"{item[1]} batch {item[0]}"] = error or ""
            progress.write(f"{item[1]} batch {item[0]} failed:\n{error}")
        else:
            measured[item] = value
            progress.write(json.dumps(asdict(value[0])))
        progress.update()

    if args.jobs > 1:
        run_in_waves(_measure, [(batch, name, args, bandwidth) for batch, name in work], args.jobs,
                     lambda item, value, error: record(item[:2], value and (value[0], torch.tensor(value[1])), error))
    else:
        for batch, name in work:
            progress.set_postfix_str(f"{name} batch {batch}")
            record((batch, name), run_config(name, args, batch, PROMPTS[args.prompt], bandwidth))
            release(args.device)
    progress.close()
    results = []
    for batch, name in work:  # in the order asked, each with its tokens' agreement with HF static's
        if (batch, name) in measured:
            result, tokens = measured[batch, name]
            if (batch, "hf_static") in measured:
                result.token_agreement = (tokens == measured[batch, "hf_static"][1]).float().mean().item()
            results.append(result)
    stem = args.out / f"speed_{model_name}_{args.prompt}"
    with open(f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    Path(f"{stem}.json").write_text(json.dumps({"bandwidth_bytes_per_s": bandwidth, "device": _device_name(args.device),
                                                "jobs": args.jobs, "results": [asdict(r) for r in results],
                                                "failures": failures}, indent=2))
    plot(results, Path(f"{stem}.png"))
    print(table(results))
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)} (tracebacks in {stem}.json)")


def _measure(item: tuple[int, str, argparse.Namespace, float], turn: Callable) -> tuple[Result, list]:
    """One `--jobs` process: one configuration at one batch (tokens as a list: a tensor would cross the process
    boundary through shared memory, which needs the sender alive until it is read)."""
    batch, name, args, bandwidth = item
    result, tokens = run_config(name, args, batch, PROMPTS[args.prompt], bandwidth, turn)
    return result, tokens.tolist()


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
