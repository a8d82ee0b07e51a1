"""Decode attention over cache slots on one GPU: the fused Triton kernel against the alternatives.

Side by side, in one process, at decode shapes (one query token, bf16):
- `ref`: the reference math (`attend_slots`, what `hae::slot_attention` decomposed to before the kernel),
  compiled by Inductor;
- `fused`: `hae::slot_attention` (the Triton kernel, per-slot weights included), and `fused_nw`:
  `hae::slot_attention_no_weight`;
- PyTorch's `scaled_dot_product_attention` with no mask (flash, cuDNN and the default choice; the best is
  reported) and with the boolean slot mask (default choice).

Each call is timed as a CUDA graph of one call on each of several input sets (together several times the L2, so
the K/V bytes come from HBM as in decode), replayed many times: the median over replays, per call. GB/s counts
the K and V bytes read. Before timing, the script checks the kernel against an fp64 reference (bf16, fp16 and
fp32, grouped heads, many query rows per KV head, free slots, a row with no valid slot, permuted queries) and runs
`torch.library.opcheck`; it then compiles a decode step (slot write, attention, score update) under
`mode="reduce-overhead"` and reports `cudagraph_skips`, whether Inductor inlined the kernel, and the step time
with the kernel and with the reference; and it builds an AOTInductor package of the op and runs it in a
process that never imports hae_fx.

    python benchmarks/attention_kernel.py --out DIR [--quick] [--sweep] [--no-aoti]

Writes `attention_kernel.json` (everything) and `attention_kernel.csv` (the table) under DIR, and the table to
stdout.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch._library.triton import set_wrap_triton_enabled
from torch.nn.attention import SDPBackend, sdpa_kernel

import hae_fx  # noqa: F401  (registers the ops)
from hae_fx.ops.slot_attention import attend_slots
from hae_fx.ops.slot_attention_kernel import BLOCK_C, launch_slot_attention, split_count

#: the module, which `hae_fx.ops.slot_attention` is not: the package re-exports the op under that name
slot_attention_module = importlib.import_module("hae_fx.ops.slot_attention")

#: name -> (query heads, KV heads, head dim)
HEADS = {
    "llava-1.5-7b 32/32 D128": (32, 32, 128),
    "qwen2.5-7b 28/4 D128": (28, 4, 128),
    "gemma-3-like 8/1 D256": (8, 1, 256),
}
BATCHES = (1, 8, 32)
CAPACITIES = (448, 877, 1133, 4096)
#: input sets per timed graph are chosen so that together they hold at least this many K/V bytes (L2: 60 MB)
ROTATION_BYTES = 256 * 2**20
MAX_SETS = 64
FREE_SLOT_FRACTION = 0.1


def slot_inputs(batch: int, q_heads: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                q_len: int = 1) -> tuple[torch.Tensor, ...]:
    """Random decode inputs: query, K/V cache, slot positions with a tenth of the slots free (-1)."""
    q = torch.randn(batch, q_heads, q_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, capacity, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, device="cuda", dtype=dtype)
    slot_pos = torch.randperm(batch * capacity, device="cuda").view(batch, capacity)
    slot_pos[torch.rand(batch, capacity, device="cuda") < FREE_SLOT_FRACTION] = -1
    slot_pos[:, 0] = 0
    return q, k, v, slot_pos


def describe(error: Exception) -> str:
    """An exception in a line of the report: its type and the end of its message (where Triton says why)."""
    return f"{type(error).__name__}: ...{str(error)[-700:]}"


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return math.inf
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes: int) -> None:
    """Leave NaNs in the caching allocator's free blocks, so an output element the kernel fails to write
    shows up as NaN rather than as a stale plausible value."""
    torch.full((nbytes // 4 + 1,), float("nan"), device="cuda")


# ---------------------------------------------------------------------------------------------------- checks

CHECKS = [
    # batch, q heads, kv heads, query tokens, capacity, head dim, dtype, variant
    (4, 32, 32, 1, 877, 128, torch.bfloat16, ""),
    (4, 28, 4, 1, 1133, 128, torch.bfloat16, ""),
    (2, 8, 1, 1, 4096, 256, torch.bfloat16, ""),
    (3, 28, 4, 1, 877, 128, torch.float16, ""),
    (2, 8, 2, 1, 300, 64, torch.float32, ""),
    (2, 40, 2, 1, 300, 64, torch.bfloat16, ""),  # 20 query rows per KV head
    (2, 112, 4, 1, 500, 128, torch.bfloat16, ""),  # 28 rows per KV head: two row blocks
    (1, 4, 4, 1, 100, 80, torch.bfloat16, ""),
    (8, 32, 32, 1, 64, 128, torch.bfloat16, ""),
    (2, 28, 4, 1, 877, 128, torch.bfloat16, "permuted"),
    (2, 28, 4, 1, 877, 128, torch.bfloat16, "no_valid_slot"),
    (32, 32, 32, 1, 1133, 128, torch.float32, ""),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
WEIGHT_TOLERANCE = 1e-4


def check_case(batch, q_heads, kv_heads, q_len, capacity, head_dim, dtype, variant) -> dict:
    q, k, v, slot_pos = slot_inputs(batch, q_heads, kv_heads, capacity, head_dim, dtype, q_len)
    if variant == "permuted":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    if variant == "no_valid_slot":
        slot_pos[0] = -1
    scale = head_dim ** -0.5
    ref_out, ref_weight = attend_slots(q.double(), k.double(), v.double(), slot_pos, scale)
    poison_allocator(q.numel() * q.element_size() * 4 + batch * capacity * q_heads * q_len * 4)
    out, weight = torch.ops.hae.slot_attention(q, k, v, slot_pos, scale)
    out_nw = torch.ops.hae.slot_attention_no_weight(q, k, v, slot_pos, scale)
    same_out, _ = attend_slots(q, k, v, slot_pos, scale)
    forced = {}
    for name, kwargs in {"one_split": {"splits": 1}, "many_splits": {"splits": 64}}.items():
        with set_wrap_triton_enabled(False):  # launch directly, as the op does eagerly
            f_out, f_weight = launch_slot_attention(q, k, v, slot_pos, scale, True, **kwargs)
        forced[name] = max(relative_error(f_out, ref_out) / TOLERANCE[dtype],
                           relative_error(f_weight, ref_weight) / WEIGHT_TOLERANCE)
    result = {
        "shape": [batch, q_heads, kv_heads, q_len, capacity, head_dim], "dtype": str(dtype), "variant": variant,
        "out_err": relative_error(out, ref_out), "weight_err": relative_error(weight, ref_weight),
        "no_weight_out_err": relative_error(out_nw, ref_out),
        "reference_same_dtype_out_err": relative_error(same_out, ref_out),
        "out_contiguous": out.is_contiguous(), "weight_dtype": str(weight.dtype),
        "forced_variants_err_over_tolerance": forced,
    }
    result["ok"] = (result["out_err"] <= TOLERANCE[dtype] and result["no_weight_out_err"] <= TOLERANCE[dtype]
                    and result["weight_err"] <= WEIGHT_TOLERANCE and out.is_contiguous()
                    and weight.dtype == torch.float32 and all(e <= 1 for e in forced.values()))
    return result


def opchecks() -> dict:
    results = {}
    q, k, v, slot_pos = slot_inputs(2, 8, 2, 300, 64, torch.bfloat16)
    permuted = q.transpose(1, 2).contiguous().transpose(1, 2)
    cases = {
        "slot_attention": (torch.ops.hae.slot_attention.default, (q, k, v, slot_pos, 0.125)),
        "slot_attention permuted q": (torch.ops.hae.slot_attention.default, (permuted, k, v, slot_pos, 0.125)),
        "slot_attention_no_weight": (torch.ops.hae.slot_attention_no_weight.default, (q, k, v, slot_pos, 0.125)),
        "slot_attention_fused": (torch.ops.hae.slot_attention_fused.default, (permuted, k, v, slot_pos, 0.125, True)),
    }
    for name, (op, args) in cases.items():
        try:
            torch.library.opcheck(op, args)
            results[name] = "ok"
        except Exception as error:  # recorded: the run goes on to the timings
            results[name] = describe(error)
    return results


# ---------------------------------------------------------------------------------------------------- timing

def time_per_call(call: Callable[[int], object], sets: int, replays: int = 25) -> float:
    """Microseconds per call: a CUDA graph of `call(i)` for every input set `i`, replayed `replays` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(sets):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(sets):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / sets


def kv_bytes(batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * batch * kv_heads * capacity * head_dim * dtype.itemsize


def make_sets(batch, q_heads, kv_heads, capacity, head_dim, dtype):
    sets = max(1, min(MAX_SETS, math.ceil(ROTATION_BYTES / kv_bytes(batch, kv_heads, capacity, head_dim, dtype))))
    return [slot_inputs(batch, q_heads, kv_heads, capacity, head_dim, dtype) for _ in range(sets)]


def _reference(q, k, v, slot_pos, scale: float):
    out, slot_weight = attend_slots(q, k, v, slot_pos, scale)
    return out.contiguous(), slot_weight


def time_shape(name: str, batch: int, capacity: int, dtype: torch.dtype, reference: Callable) -> dict:
    q_heads, kv_heads, head_dim = HEADS[name]
    scale = head_dim ** -0.5
    data = make_sets(batch, q_heads, kv_heads, capacity, head_dim, dtype)
    masks = [(slot_pos >= 0)[:, None, None, :] for *_, slot_pos in data]
    gqa = q_heads != kv_heads
    calls: dict[str, Callable[[int], object]] = {
        "ref_inductor": lambda i: reference(*data[i], scale),
        "fused": lambda i: torch.ops.hae.slot_attention(*data[i], scale),
        "fused_nw": lambda i: torch.ops.hae.slot_attention_no_weight(*data[i], scale),
        "sdpa_default": lambda i: F.scaled_dot_product_attention(*data[i][:3], scale=scale, enable_gqa=gqa),
        "sdpa_mask": lambda i: F.scaled_dot_product_attention(*data[i][:3], attn_mask=masks[i], scale=scale,
                                                              enable_gqa=gqa),
    }
    for backend_name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def sdpa(i: int, backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*data[i][:3], scale=scale, enable_gqa=gqa)
        calls[backend_name] = sdpa
    row = {"heads": name, "batch": batch, "capacity": capacity, "sets": len(data),
           "kv_mb": kv_bytes(batch, kv_heads, capacity, head_dim, dtype) / 1e6}
    for key, call in calls.items():
        try:
            row[f"{key}_us"] = time_per_call(call, len(data))
        except Exception as error:  # a backend that refuses the shape is recorded as such
            row[f"{key}_us"] = None
            row[f"{key}_error"] = describe(error)
    no_mask = {k: row[f"{k}_us"] for k in ("sdpa_default", "sdpa_flash", "sdpa_cudnn") if row[f"{k}_us"]}
    best = min(no_mask, key=no_mask.get)
    row["sdpa_best_us"], row["sdpa_best"] = no_mask[best], best
    for key in ("ref_inductor", "fused", "fused_nw", "sdpa_best", "sdpa_mask"):
        if row[f"{key}_us"]:
            row[f"{key}_gbps"] = row["kv_mb"] * 1e6 / (row[f"{key}_us"] * 1e-6) / 1e9
    row["fused_vs_sdpa"] = row["fused_us"] / row["sdpa_best_us"]
    row["fused_vs_sdpa_mask"] = row["fused_us"] / row["sdpa_mask_us"] if row["sdpa_mask_us"] else None
    row["ref_vs_fused"] = row["ref_inductor_us"] / row["fused_us"]
    return row


SWEEP_SHAPES = [("llava-1.5-7b 32/32 D128", 1, 4096), ("llava-1.5-7b 32/32 D128", 8, 877),
                ("llava-1.5-7b 32/32 D128", 32, 1133), ("qwen2.5-7b 28/4 D128", 8, 877),
                ("qwen2.5-7b 28/4 D128", 32, 4096), ("gemma-3-like 8/1 D256", 1, 4096),
                ("gemma-3-like 8/1 D256", 32, 1133)]
SWEEP_CONFIGS = [dict(block_c=32), dict(block_c=64), dict(block_c=64, num_stages=3), dict(block_c=64, num_warps=8),
                 dict(block_c=128), dict(block_c=128, num_warps=8), dict(block_c=64, split_factor=0.5),
                 dict(block_c=64, split_factor=2), dict(block_c=64, split_factor=4)]


def sweep(dtype: torch.dtype) -> list[dict]:
    """Launch parameters of the kernel (with weights) at a few shapes: what the defaults were chosen from."""
    return [row for name, batch, capacity in SWEEP_SHAPES for row in _sweep_shape(name, batch, capacity, dtype)]


def _sweep_shape(name: str, batch: int, capacity: int, dtype: torch.dtype) -> list[dict]:
    q_heads, kv_heads, head_dim = HEADS[name]
    data = make_sets(batch, q_heads, kv_heads, capacity, head_dim, dtype)
    rows = []
    for config in SWEEP_CONFIGS:
        kwargs = {k: v for k, v in config.items() if k != "split_factor"}
        default_splits = split_count(batch * kv_heads, capacity, torch.device("cuda"), kwargs["block_c"])
        kwargs["splits"] = max(1, round(default_splits * config.get("split_factor", 1)))
        row = {"heads": name, "batch": batch, "capacity": capacity, "config": json.dumps(config),
               "splits": kwargs["splits"]}

        def call(i: int, kwargs: dict = kwargs) -> object:
            return launch_slot_attention(*data[i], head_dim ** -0.5, True, **kwargs)

        try:
            with set_wrap_triton_enabled(False):
                row["us"] = time_per_call(call, len(data))
            row["gbps"] = kv_bytes(batch, kv_heads, capacity, head_dim, dtype) / (row["us"] * 1e-6) / 1e9
        except Exception as error:
            row["us"], row["error"] = None, describe(error)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- compiled decode step

def compiled_step_check(dtype: torch.dtype, out_dir: Path, batch: int = 8, capacity: int = 877) -> dict:
    """A decode step (slot write, attention, score update) under `mode="reduce-overhead"`: CUDA-graph skips,
    what Inductor generated (also written to `out_dir`), agreement with eager, and step time with the kernel and
    with the reference. Inductor's caches are off: both paths compile the same Dynamo graph."""
    q_heads, kv_heads, head_dim = HEADS["llava-1.5-7b 32/32 D128"]
    scale = head_dim ** -0.5
    _, k_cache, v_cache, slot_pos = slot_inputs(batch, q_heads, kv_heads, capacity, head_dim, dtype)
    score = torch.zeros(batch, capacity, device="cuda")
    for tensor in (k_cache, v_cache, slot_pos, score):
        torch._dynamo.mark_static_address(tensor)

    def step(q, k, v, slot):
        torch.ops.hae.slot_write_(k_cache, v_cache, k, v, slot, None, None)
        out, slot_weight = torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, scale)
        score.add_(slot_weight)
        return out

    def inputs():
        return (torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=dtype),
                torch.randn(batch, kv_heads, 1, head_dim, device="cuda", dtype=dtype),
                torch.randn(batch, kv_heads, 1, head_dim, device="cuda", dtype=dtype),
                torch.randint(0, capacity, (batch, 1), device="cuda"))

    result = {}
    for path in ("fused", "reference"):
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()
        original = slot_attention_module.uses_fused_kernel
        if path == "reference":
            slot_attention_module.uses_fused_kernel = lambda *args: False
        try:
            compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            args = inputs()
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                out, codes = run_and_get_code(compiled, *args)
            (out_dir / f"compiled_step_{path}.py").write_text("\n".join(codes))
            for _ in range(4):
                args = inputs()
                out = compiled(*args).clone()
            expected, _ = attend_slots(args[0], k_cache, v_cache, slot_pos, scale)
            code = "\n".join(codes)
            timing_args = [inputs() for _ in range(8)]
            for i in range(20):
                compiled(*timing_args[i % 8])
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(200):
                compiled(*timing_args[i % 8])
            end.record()
            end.synchronize()
            result[path] = {
                "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "kernel_inlined": "_split_kernel" in code, "hae_op_calls_left": code.count("torch.ops.hae"),
                "clone_kernels": code.count("clone"),
                "out_err_vs_eager_reference": relative_error(out, expected.double()),
                "step_us": start.elapsed_time(end) * 1e3 / 200,
            }
        finally:
            slot_attention_module.uses_fused_kernel = original
    result["shape"] = [batch, q_heads, kv_heads, capacity, head_dim, str(dtype)]
    return result


_LOAD_WITHOUT_HAE = """
import sys, torch
assert "hae_fx" not in sys.modules
package = torch._inductor.aoti_load_package(sys.argv[1])
inputs = torch.load(sys.argv[2])
out, slot_weight = package(*inputs["args"])
err = ((out.double() - inputs["out"].double()).norm() / inputs["out"].double().norm()).item()
werr = ((slot_weight.double() - inputs["weight"].double()).norm() / inputs["weight"].double().norm()).item()
print(f"AOTI_ERR {err:.3e} {werr:.3e} {int(hasattr(torch.ops.hae, 'slot_attention'))}")
"""


class _SlotAttention(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, slot_pos):
        return torch.ops.hae.slot_attention(q, k_cache, v_cache, slot_pos, 0.125)


def aoti_check(dtype: torch.dtype) -> dict:
    """Export `hae::slot_attention`, package it with AOTInductor, run the package where hae_fx is never
    imported: the kernel must be inside the package, not a call back into Python."""
    args = slot_inputs(4, 28, 4, 877, 64, dtype)
    program = torch.export.export(_SlotAttention(), args)
    exported_ops = sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function"})
    with tempfile.TemporaryDirectory() as tmp:
        package = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "sa.pt2"))
        out, weight = torch.ops.hae.slot_attention(*args, 0.125)
        torch.save({"args": args, "out": out, "weight": weight}, os.path.join(tmp, "io.pt"))
        run = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_HAE, package, os.path.join(tmp, "io.pt")],
                             capture_output=True, text=True, timeout=300)
        with zipfile.ZipFile(package) as archive:
            sources = "".join(archive.read(n).decode(errors="replace") for n in archive.namelist()
                              if n.endswith((".cpp", ".py", ".json")))
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("AOTI_ERR")), None)
    return {"exported_ops": exported_ops, "returncode": run.returncode, "stderr_tail": run.stderr[-600:],
            "result": line, "kernel_in_package": "_split_kernel" in sources}


# ------------------------------------------------------------------------------------------------- output

COLUMNS = [("heads", "heads", "{}"), ("B", "batch", "{}"), ("C", "capacity", "{}"), ("KV MB", "kv_mb", "{:.1f}"),
           ("ref Inductor µs", "ref_inductor_us", "{:.1f}"), ("fused µs", "fused_us", "{:.1f}"),
           ("fused GB/s", "fused_gbps", "{:.0f}"), ("fused no-weight µs", "fused_nw_us", "{:.1f}"),
           ("SDPA µs (best, no mask)", "sdpa_best_us", "{:.1f}"), ("backend", "sdpa_best", "{}"),
           ("SDPA bool-mask µs", "sdpa_mask_us", "{:.1f}"), ("fused / SDPA", "fused_vs_sdpa", "{:.2f}"),
           ("fused / SDPA-mask", "fused_vs_sdpa_mask", "{:.2f}"), ("ref / fused", "ref_vs_fused", "{:.2f}")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "—" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--quick", action="store_true", help="batch 8, capacity 877 only")
    parser.add_argument("--sweep", action="store_true", help="also time launch-parameter variants")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package check")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.recompile_limit = 256
    dtype = torch.bfloat16
    started = time.time()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "triton": __import__("triton").__version__, "default_block_c": BLOCK_C}

    def save() -> None:
        (args.out / "attention_kernel.json").write_text(json.dumps(report, indent=1, default=str))

    torch.manual_seed(0)
    report["checks"] = []
    for case in CHECKS:
        try:
            report["checks"].append(check_case(*case))
        except Exception as error:  # recorded, and the run goes on: one failing shape should not hide the rest
            report["checks"].append({"shape": case[:6], "dtype": str(case[6]), "variant": case[7], "ok": False,
                                     "error": describe(error)})
    report["opcheck"] = opchecks()
    save()
    print("checks:", "all ok" if all(c["ok"] for c in report["checks"]) else
          [c for c in report["checks"] if not c["ok"]], "| opcheck:", report["opcheck"], flush=True)

    try:
        report["compiled_step"] = compiled_step_check(dtype, args.out)
    except Exception as error:
        report["compiled_step"] = {"error": describe(error)}
    save()
    print("compiled decode step:", report["compiled_step"], flush=True)

    if not args.no_aoti:
        try:
            report["aoti"] = aoti_check(dtype)
        except Exception as error:
            report["aoti"] = {"error": describe(error)}
        print("aoti:", report["aoti"], flush=True)

    if args.sweep:
        report["sweep"] = sweep(dtype)
        save()
        for row in report["sweep"]:
            print("sweep", row["heads"], row["batch"], row["capacity"], row["config"], row["splits"],
                  f"{row['us']:.1f} µs" if row["us"] else row.get("error"), flush=True)

    reference = torch.compile(_reference, dynamic=False, fullgraph=True)
    shapes = [(n, b, c) for n in HEADS for b in BATCHES for c in CAPACITIES]
    if args.quick:
        shapes = [(n, 8, 877) for n in HEADS]
    report["table"] = []
    for name, batch, capacity in shapes:
        try:
            report["table"].append(time_shape(name, batch, capacity, dtype, reference))
        except Exception as error:
            report["table"].append({"heads": name, "batch": batch, "capacity": capacity,
                                    "error": describe(error)})
        print({k: v for k, v in report["table"][-1].items() if not k.endswith("_gbps")}, flush=True)
        torch.cuda.empty_cache()
        save()
    with open(args.out / "attention_kernel.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for row in report["table"] for k in row}))
        writer.writeheader()
        writer.writerows(report["table"])

    report["seconds"] = time.time() - started
    save()
    print(markdown_table(report["table"]))


if __name__ == "__main__":
    main()
