"""Where hae_fx's compiled path parts from HF: next-token logits and the cache's contents after every step.

For one model (benchmarks/gpu_families.py's shapes and seeded random weights, its first `--text-layers` decoder
layers), each path generates greedily with `max_new_tokens=n` for every n in 1..N, on a fresh build of the same
weights, with hae's `full` policy at a capacity of prompt + N:

- `hf`: HF's `generate(cache_implementation="static", disable_compile=True)`, the logits reference;
- `hae_eager`: the rewritten graphs run eagerly (`"hae.compiler": "eager"`), the cache-state reference;
- `hae_inductor`: Inductor, `mode="default"`; `hae_inductor_cudagraphs`: `mode="reduce-overhead"` (CUDA only);
- `hae_inductor_reference_attention`: Inductor with the reference attention math in place of the fused Triton
  kernel (`hae_fx.ops.slot_attention.reference_attention`);
- `hae_inductor[key=value,...]`, one per `--inductor-variant`: Inductor, `mode="default"`, with those
  `torch._inductor.config` settings patched in for the compile (to bisect an Inductor pass).

After each generate it reads the `HAECache` (`out.past_key_values`): per layer, the position each slot holds
(`slot_pos` of the layer's slot group, or a windowed layer's `ring_pos`) and its K/V rows. n = 1 is the prefill's
state (no decode step has run); n = k + 1 is the state after decode step k, which is the one step that separates it
from state n = k: the slots that changed between the two are where step k put its token. Every compiled path's
state is compared with `hae_eager`'s at the same n, by position, not slot index (slot order may legitimately
differ): positions missing, extra or duplicated in a row, then, for positions both hold, K and V rows farther apart
than `--tolerance` times the largest reference entry of that layer and row. The first divergence (smallest n,
then layer) says which step and which layer first computes differently. Writes everything into `--out` (JSON) and
prints a summary.

    python benchmarks/cuda_exactness.py --model llava7b --out DIR/llava.json              # on the GPU
    python benchmarks/cuda_exactness.py --model qwen2_5_vl_7b --out DIR/qwen.json
    python benchmarks/cuda_exactness.py --model llava7b --tiny --device cpu --out DIR/x.json   # a functional check
    python benchmarks/cuda_exactness.py --model llava7b --paths hae_inductor \
        --inductor-variant allow_buffer_reuse=False --out DIR/llava_reuse.json
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config
from gpu_families import MODELS, StepLogits, build, model_and_inputs
from transformers import LogitsProcessorList

import hae_fx
from hae_fx.cache import HAECache
from hae_fx.ops.slot_attention import reference_attention

PATHS = ("hf", "hae_eager", "hae_inductor", "hae_inductor_cudagraphs", "hae_inductor_reference_attention")
#: each hae path: (torch.compile mode, transform options, whether the fused kernel is switched off)
HAE_PATHS: dict[str, tuple[str | None, dict | None, bool]] = {
    "hae_eager": (None, {"hae.compiler": "eager"}, False),
    "hae_inductor": ("default", None, False),
    "hae_inductor_cudagraphs": ("reduce-overhead", None, False),
    "hae_inductor_reference_attention": ("default", None, True),
}
#: the order of the divergences reported for one layer: which positions it holds, then their K/V rows (the fed
#: tokens and `seen`, which concern every layer, come first)
KINDS = ("tokens", "seen", "missing", "extra", "duplicated", "keys", "values")

#: one cache state: `layers` (per layer `positions [B, S]`, `keys`/`values [B, Hkv, S, D]`), `seen [B]`, the last
#: decode step's `step_slot` per slot group, and the greedy `tokens [B, n]`
State = dict


def cache_state(cache: HAECache, tokens: torch.Tensor) -> State:
    """A copy (on the cache's device) of what `cache` holds now."""
    layers = []
    for layer in cache.layers:
        positions = layer.ring_pos if layer.kind.windowed else \
            cache.slots.groups[cache.layer_group[layer.layer_idx]].core["slot_pos"]
        if positions.dim() != 2:
            raise ValueError("cuda_exactness compares one index set per layer; this policy keeps one per KV head")
        layers.append({"positions": positions.clone(), "keys": layer.keys.to(torch.float32, copy=True),
                       "values": layer.values.to(torch.float32, copy=True)})
    return {"layers": layers, "seen": cache.slots.seen.clone(), "tokens": tokens.clone(),
            "step_slot": [group.core["step_slot"].clone() for group in cache.slots.groups]}


def compare_states(reference: State, state: State, tolerance: float) -> tuple[list[dict], list[dict]]:
    """Divergences of `state` from `reference` (each `{"layer", "row", "kind", "positions", ...}`, layer None for
    the tokens fed to the decode steps and `seen`), in report order (`KINDS` within a layer), and per layer the
    largest |ΔK| and |ΔV| over the positions both hold."""
    found: list[dict] = []
    fed, reference_fed = state["tokens"][:, :-1], reference["tokens"][:, :-1]  # the tokens decode steps consumed
    if not torch.equal(reference_fed, fed):
        row, step = (reference_fed != fed).nonzero()[0].tolist()
        found.append({"layer": None, "row": row, "kind": "tokens", "positions": [],
                      "detail": f"decode step {step + 1} was fed another token (the cache differs as a consequence)"})
    if not torch.equal(reference["seen"], state["seen"]):
        found.append({"layer": None, "row": None, "kind": "seen", "positions": [],
                      "detail": f"seen {state['seen'].tolist()}, reference {reference['seen'].tolist()}"})
    gaps = []
    for index, (ref, got) in enumerate(zip(reference["layers"], state["layers"], strict=True)):
        gap = {"max_abs_dk": 0.0, "max_abs_dv": 0.0}
        for row, (ref_row, got_row) in enumerate(zip(ref["positions"].tolist(), got["positions"].tolist(),
                                                     strict=True)):
            ref_slot = {p: s for s, p in enumerate(ref_row) if p >= 0}
            counts = Counter(p for p in got_row if p >= 0)
            for kind, positions in (("missing", sorted(ref_slot.keys() - counts.keys())),
                                    ("extra", sorted(counts.keys() - ref_slot.keys())),
                                    ("duplicated", sorted(p for p, c in counts.items() if c > 1))):
                if positions:
                    found.append({"layer": index, "row": row, "kind": kind, "positions": positions})
            got_slot = {p: s for s, p in reversed(list(enumerate(got_row))) if p >= 0}  # a duplicate's first slot
            common = sorted(ref_slot.keys() & got_slot.keys())
            if not common:
                continue
            ref_index = torch.tensor([ref_slot[p] for p in common], device=ref["keys"].device)
            got_index = torch.tensor([got_slot[p] for p in common], device=got["keys"].device)
            for kind, name in (("keys", "max_abs_dk"), ("values", "max_abs_dv")):
                expected = ref[kind][row][:, ref_index]  # [Hkv, positions, D]
                delta = (got[kind][row][:, got_index].to(expected.device) - expected).abs().amax(dim=(0, 2))
                gap[name] = max(gap[name], delta.max().item())
                scale = expected.abs().max().item()
                bad = (delta > tolerance * scale).nonzero().flatten().tolist()
                if bad:
                    found.append({"layer": index, "row": row, "kind": kind, "positions": [common[i] for i in bad],
                                  "max_abs": delta.max().item(), "scale": scale})
        gaps.append(gap)
    order = {kind: rank for rank, kind in enumerate(KINDS)}
    found.sort(key=lambda d: (-1 if d["layer"] is None else d["layer"], order[d["kind"]]))
    return found, gaps


def placement(before: State | None, after: State) -> list[list[list[str]]]:
    """Per layer and row, what the step between two consecutive states wrote: `"slot s: position a -> b"` for each
    slot whose position changed (-1: free). From the empty cache (`before` None): the prefill's count."""
    if before is None:
        return [[[f"{sum(p >= 0 for p in row)} positions held"] for row in layer["positions"].tolist()]
                for layer in after["layers"]]
    return [[[f"slot {s}: position {a} -> {b}" for s, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
             for old, new in zip(was["positions"].tolist(), now["positions"].tolist(), strict=True)]
            for was, now in zip(before["layers"], after["layers"], strict=True)]


def describe(divergence: dict) -> str:
    where = "" if divergence["layer"] is None else f"layer {divergence['layer']} row {divergence['row']} "
    positions = divergence["positions"]
    text = f"{where}{divergence['kind']}"
    if positions:
        text += f" at positions {positions[:8]}{' ...' if len(positions) > 8 else ''}"
    if "max_abs" in divergence:
        text += f" (max |Δ| {divergence['max_abs']:.3g}, reference scale {divergence['scale']:.3g})"
    return text + (f": {divergence['detail']}" if "detail" in divergence else "")


def variant_name(text: str) -> str:
    """The path name of an `--inductor-variant` (`key=value,...`); its values are Python literals."""
    name = f"hae_inductor[{text}]"
    try:
        settings = variant_settings(name)
    except (ValueError, SyntaxError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not `key=value,...` with Python literal values") from error
    unknown = settings.keys() - torch._inductor.config.get_config_copy().keys()
    if unknown:
        raise argparse.ArgumentTypeError(f"{sorted(unknown)} are not Inductor config keys")
    return name


def variant_settings(name: str) -> dict:
    """The Inductor settings a path name carries (none for the fixed paths)."""
    if not name.startswith("hae_inductor["):
        return {}
    pairs = (item.partition("=") for item in name[len("hae_inductor["):-1].split(","))
    return {key.strip(): ast.literal_eval(value.strip()) for key, _, value in pairs}


def run_path(name: str, config, inputs: dict, new_tokens: int, capacity: int, device: str,
             dtype: torch.dtype) -> list[tuple[list[torch.Tensor], State | None]]:
    """Per n in 1..N: the steps' logits and (hae paths) the cache state after `generate(max_new_tokens=n)`."""
    model = build(config, device, dtype)
    prompt = inputs["input_ids"].shape[1]
    if name == "hf":
        steps = StepLogits()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       cache_implementation="static", disable_compile=True,
                       logits_processor=LogitsProcessorList([steps]))
        return [(steps.steps[:n], None) for n in range(1, new_tokens + 1)]
    mode, options, reference_math = HAE_PATHS.get(name, HAE_PATHS["hae_inductor"])
    settings = variant_settings(name)
    runs = []
    with contextlib.ExitStack() as context:  # the compile (the first generate) happens in here
        if reference_math:
            context.enter_context(reference_attention())
        if settings:
            context.enter_context(torch._inductor.config.patch(settings))
        hae_fx.transform(model, hae_fx.HAEConfig(policy="full", capacity=capacity), mode=mode, options=options)
        for n in range(1, new_tokens + 1):
            steps = StepLogits()
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 return_dict_in_generate=True, logits_processor=LogitsProcessorList([steps]))
            runs.append((steps.steps, cache_state(out.past_key_values, out.sequences[:, prompt:])))
    return runs


def measure(model: str, paths: list[str], tiny: bool, text_layers: int, batch: int, new_tokens: int, device: str,
            dtype: torch.dtype, tolerance: float, out: Path) -> dict:
    """Run `paths` in order, writing the result to `out` and printing each path's summary as it completes (a run
    cut short keeps the paths done)."""
    config, inputs = model_and_inputs(model, tiny, text_layers, batch, device, dtype)
    prompt = inputs["input_ids"].shape[1]
    result: dict = {"model": model, "tiny": tiny, "text_layers": text_layers, "batch": batch, "prompt": prompt,
                    "new_tokens": new_tokens, "dtype": str(dtype), "tolerance": tolerance,
                    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "paths": {}}
    print(f"{model} ({text_layers} text layers, batch {batch}, prompt {prompt}, {dtype}, {result['device']}, "
          f"torch {torch.__version__})", flush=True)
    hf_logits: list[torch.Tensor] = []
    reference_states: list[State] = []
    for name in paths:
        started = time.perf_counter()
        try:
            runs = run_path(name, config, inputs, new_tokens, prompt + new_tokens, device, dtype)
        except Exception as error:  # a path that fails to compile or run must not cost the others their results
            result["paths"][name] = {"error": f"{type(error).__name__}: {error}"}
            out.write_text(json.dumps(result, indent=1))
            print(f"  {name}: failed: {result['paths'][name]['error'][:2000]}", flush=True)
            continue
        if name == "hf":
            hf_logits = runs[-1][0]
        per_n, previous = [], None
        for n, (logits, state) in enumerate(runs, start=1):
            entry: dict = {"n": n}
            if hf_logits:
                pairs = list(zip(logits, hf_logits, strict=False))
                entry["max_abs_dlogit"] = [(step - ref).abs().max().item() for step, ref in pairs]
                entry["argmax_equal_hf"] = "".join("y" if torch.equal(step.argmax(-1), ref.argmax(-1)) else "n"
                                                   for step, ref in pairs)
            if state is not None:
                entry["placement"] = placement(previous, state)
                entry["step_slot"] = [slot.tolist() for slot in state["step_slot"]] if n > 1 else None
                if name == "hae_eager":
                    reference_states.append(state)
                elif reference_states:
                    entry["divergences"], entry["cache_gaps"] = compare_states(reference_states[n - 1], state,
                                                                               tolerance)
                previous = state
            per_n.append(entry)
        first = next(({"n": entry["n"], **entry["divergences"][0]} for entry in per_n if entry.get("divergences")),
                      None)
        result["paths"][name] = {"per_n": per_n, "first_divergence_from_hae_eager": first,
                                 "compared_with_hae_eager": bool(reference_states) and name != "hae_eager",
                                 "seconds": time.perf_counter() - started}
        out.write_text(json.dumps(result, indent=1))
        if lines := summary(result, name):
            print("\n".join(lines), flush=True)
        del runs, previous
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def summary(result: dict, name: str) -> list[str]:
    """Path `name`'s lines of the summary: its logits against HF's at n = N, and its first divergence."""
    path = result["paths"][name]
    if name == "hf":
        return []
    last = path["per_n"][-1]
    if "max_abs_dlogit" not in last:  # hf failed
        return [f"  {name}: ran in {path['seconds']:.0f} s; no hf logits to compare with"]
    lines = [f"  {name} ({path['seconds']:.0f} s): max |Δlogit| vs hf per step "
             + ", ".join(f"{d:.2g}" for d in last["max_abs_dlogit"])
             + f"; greedy tokens equal hf's at steps {last['argmax_equal_hf']}"]
    if name == "hae_eager":
        return lines
    if not path["compared_with_hae_eager"]:
        return [*lines, "    no hae_eager state to compare with"]
    first = path["first_divergence_from_hae_eager"]
    if first is None:
        return [*lines, "    cache state equals hae_eager's after every step"]
    step = "the prefill" if first["n"] == 1 else f"decode step {first['n'] - 1}"
    lines.append(f"    first divergence from hae_eager: after {step} (n={first['n']}): {describe(first)}")
    entry, reference = path["per_n"][first["n"] - 1], result["paths"]["hae_eager"]["per_n"][first["n"] - 1]
    layer, row = first["layer"] or 0, first["row"] or 0
    lines.append(f"    what it wrote at layer {layer} row {row}: {entry['placement'][layer][row][:4]}; "
                 f"hae_eager: {reference['placement'][layer][row][:4]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny configs, for a functional check on any machine")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=None,
                        help="default: all (hae_inductor_cudagraphs on cuda only); hf and hae_eager, the "
                             "references, always run first")
    parser.add_argument("--inductor-variant", type=variant_name, action="append", default=[],
                        help="another Inductor path with these `torch._inductor.config` settings (`key=value,...`, "
                             "Python literals), compared like the others; repeatable")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="a K/V row diverges beyond this times the largest reference entry of its layer and row")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    chosen = set(args.paths or PATHS) | {"hf", "hae_eager"}
    paths = [p for p in PATHS if p in chosen and (args.device == "cuda" or p != "hae_inductor_cudagraphs")]
    paths += args.inductor_variant
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # every path compiles from scratch: no graph of an earlier run or path is reused
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        measure(args.model, paths, args.tiny, args.text_layers, args.batch, args.new_tokens, args.device,
                getattr(torch, args.dtype), args.tolerance, args.out)


if __name__ == "__main__":
    main()
