"""GPU facts for families beyond LLaVA: Qwen2.5-VL-7B (3-D mRoPE) and Gemma-3-4B (five sliding-window layers per
global one, bidirectional image blocks) shapes with random bf16 weights.

In one process per model: HF's `generate(cache_implementation="static")` (HF compiles its decode step), then hae
`full` and an evicting policy under `mode="reduce-overhead"`, each on a freshly built copy of the same weights.
It records greedy-token agreement with HF, how far hae's next-token logits are from HF's while the tokens agree
(greedy tokens of random weights can hide wrong attention, or flip on rounding alone: the logits tell the two
apart), CUDA-graph skips, decode ms/token, peak memory and KV bytes, and writes one JSON per model under `--out`.

    python benchmarks/gpu_families.py --model qwen2_5_vl_7b gemma3_4b --out DIR
    python benchmarks/gpu_families.py --model qwen2_5_vl_7b --dtype float32 --text-layers 8 --hf-eager \
        --mode default --configs full --batch 2 --new-tokens 32 --out DIR   # which side a logits gap comes from
    (`--hae-compiler eager` in place of `--mode default`: hae's rewritten graphs run eagerly, no Inductor, no CUDA
    graphs; on CUDA the slot attention is still the fused kernel, which the ops' implementation calls)
    python benchmarks/gpu_families.py --model qwen2_5_vl_7b --tiny --device cpu --out DIR   # a functional check
    python benchmarks/gpu_families.py --model qwen2_5_vl_7b --fp32-reference --out DIR   # bf16 error, hae vs HF

`--fp32-reference` asks what greedy tokens cannot answer in bf16: random weights give next-token logits that are
either nearly flat (the default init: rounding flips the argmax) or, with a wide `--initializer-range` over many
layers, chaotic (two correct attention kernels already give uncorrelated logits). So every model is built in fp32
and cast to `--dtype`; HF's fp32 eager static cache gives the reference tokens and logits; HF in bf16 and each hae
configuration then decode that same token path (forced), and each step's logits are compared with the fp32 ones.
hae is as exact as HF's own bf16 path when its error is no larger than HF's.

`--model llava7b` runs LLaVA-1.5-7B's shapes (benchmarks/speed.py's model) the same way.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

import hae_fx
from hae_fx.models.llava import tiny_llava_config, visual_token_count

IMAGE = 151655  # Qwen2.5-VL's image pad id; Gemma 3 uses its own (262144)


def llava7b_config(tiny: bool) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (ViT-L/14 at 336 px: 576 visual tokens; Llama-2-7B: 32 layers, 32 heads, 4096 hidden);
    `tiny`: the tiny LLaVA of the tests, with attention spread out as a trained model's (`tiny_llava_config`)."""
    if tiny:
        return tiny_llava_config(text_layers=2, initializer_range=0.2)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def llava_inputs(config, batch: int, device: str, tiny: bool) -> dict:
    size = config.vision_config.image_size
    return _prompt(batch, device, [config.image_token_id] * visual_token_count(config),
                   extra={"pixel_values": torch.randn(batch, 3, size, size, generator=_generator())},
                   vocab=min(config.text_config.vocab_size - 8, 30000))


def qwen2_5_vl_config(tiny: bool) -> object:
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    if tiny:
        vision.update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[0])
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters={**text["rope_parameters"], "mrope_section": [2, 3, 3]})
    return AutoConfig.for_model("qwen2_5_vl", vision_config=vision, text_config=text, image_token_id=IMAGE,
                                video_token_id=IMAGE + 1, vision_start_token_id=IMAGE - 3,
                                vision_end_token_id=IMAGE - 2)


def qwen_inputs(config, batch: int, device: str, tiny: bool) -> dict:
    grid = 8 if tiny else 32  # 448 px at 14 px patches: 1024 patches merged 2x2 into 256 tokens
    tokens = grid * grid // 4
    return _prompt(batch, device, [IMAGE - 3, *[IMAGE] * tokens, IMAGE - 2], extra={
        "pixel_values": torch.randn(batch * grid * grid, 3 * 2 * 14 * 14, generator=_generator(), device="cpu"),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch)})


def gemma3_4b_config(tiny: bool) -> object:
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=896, patch_size=14)
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256,
                vocab_size=262208, max_position_embeddings=131072)
    if tiny:
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64)
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
    return AutoConfig.for_model("gemma3", vision_config=vision, text_config=text,
                                mm_tokens_per_image=16 if tiny else 256, image_token_index=262144,
                                boi_token_index=255999, eoi_token_index=256000)


def gemma3_inputs(config, batch: int, device: str, tiny: bool) -> dict:
    tokens, size = config.mm_tokens_per_image, config.vision_config.image_size
    inputs = _prompt(batch, device, [255999, *[262144] * tokens, 256000], extra={
        "pixel_values": torch.randn(batch, 3, size, size, generator=_generator())})
    inputs["token_type_ids"] = (inputs["input_ids"] == 262144).long()
    return inputs


MODELS: dict[str, tuple[Callable, Callable]] = {
    "llava7b": (llava7b_config, llava_inputs),
    "qwen2_5_vl_7b": (qwen2_5_vl_config, qwen_inputs),
    "gemma3_4b": (gemma3_4b_config, gemma3_inputs),
}


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _prompt(batch: int, device: str, image: list[int], extra: dict, vocab: int = 30000) -> dict:
    generator = _generator()
    prefix = torch.randint(10, vocab, (24,), generator=generator).tolist()
    suffix = torch.randint(10, vocab, (40,), generator=generator).tolist()
    ids = torch.tensor([[2, *prefix, *image, *suffix]] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def model_and_inputs(name: str, tiny: bool, text_layers: int | None, batch: int, device: str,
                     dtype: torch.dtype, initializer_range: float | None = None) -> tuple[object, dict]:
    """`name`'s config (its first `text_layers` decoder layers, all when None, or more for a tiny config; its text
    weights drawn with std `initializer_range` when given) and a prompt of `batch` rows on `device`, floating-point
    inputs in `dtype`."""
    make_config, make_inputs = MODELS[name]
    config = make_config(tiny)
    if initializer_range is not None:
        config.get_text_config().initializer_range = initializer_range
    if text_layers is not None:
        config.get_text_config().num_hidden_layers = text_layers
        types = getattr(config.get_text_config(), "layer_types", None)
        if types:  # cut, or repeat the pattern when a tiny config is made deeper than it was built
            config.get_text_config().layer_types = [types[i % len(types)] for i in range(text_layers)]
    inputs = make_inputs(config, batch, device, tiny).items()
    return config, {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs}


def build(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights from a fixed seed, built on `device` in `dtype`: every build is the same model."""
    for part in (config, config.get_text_config(), config.vision_config):
        part._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class StepLogits(LogitsProcessor):
    """Keeps every step's next-token logits (HF and hae's decode loop call logits processors once per step)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.detach().float().clone())
        return scores


def timed_generate(model, inputs: dict, new_tokens: int, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Greedy tokens of `new_tokens`, every step's logits, and decode ms/token from the difference against a 2-token
    run (prefill and first token cancel out). The logits come from a fourth run, after warm-up and both timed ones:
    copying them each step would slow the timed run, and by then decode replays its steady-state graph."""
    def run(count: int, processors: list | None = None) -> tuple[torch.Tensor, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                             logits_processor=LogitsProcessorList(processors or []), **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    run(new_tokens)  # compile and warm up
    _, short = run(2)
    tokens, long = run(new_tokens)
    logits = StepLogits()
    run(new_tokens, [logits])
    return tokens, logits.steps, (long - short) / (new_tokens - 2) * 1e3


def logit_agreement(steps: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """How far hae's logits are from HF's while both decode the same tokens: the largest absolute difference at the
    first step and over the steps before the first greedy disagreement, HF's smallest top-1/top-2 margin over those
    steps (a difference above the margin can flip a token), and that first disagreeing step."""
    same = 0
    while same < len(steps) and torch.equal(steps[same].argmax(-1), reference[same].argmax(-1)):
        same += 1
    compared = range(min(max(same, 1), len(steps)))
    top2 = [reference[i].topk(2, dim=-1).values for i in compared]
    return {"first_step_max_abs_diff": (steps[0] - reference[0]).abs().max().item(),
            "max_abs_diff_while_equal": max((steps[i] - reference[i]).abs().max().item() for i in compared),
            "hf_min_top2_margin_while_equal": min((t[..., 0] - t[..., 1]).min().item() for t in top2),
            "first_disagreeing_step": same if same < len(steps) else None}


class ForcedPath(StepLogits):
    """Records each step's logits, then forces the reference token: every run decodes the same path, so each step's
    logits compare like for like."""

    def __init__(self, targets: torch.Tensor, prompt_length: int) -> None:
        super().__init__()
        self.targets = targets  # [B, new tokens]
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        super().__call__(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_length
        target = self.targets[:, step : step + 1].to(scores.device)
        return torch.full_like(scores, -torch.inf).scatter_(1, target, 0.0)


def errors_against(steps: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    """Largest and mean absolute logit error against the reference, at the first step and over every step."""
    diffs = [(step - ref).abs() for step, ref in zip(steps, reference, strict=True)]
    return {"first_step_max_abs": diffs[0].max().item(), "max_abs": max(d.max().item() for d in diffs),
            "mean_abs": torch.stack([d.mean() for d in diffs]).mean().item()}


#: hae configurations: (policy, share of prompt + new tokens as capacity, transform keyword arguments)
CONFIGS: dict[str, tuple[str, float, dict]] = {
    "full": ("full", 1.0, {}),
    "full_nofuse": ("full", 1.0, {"fuse_projections": False}),
    "streaming_half": ("streaming", 0.5, {}),
}


def run_header(name: str, config, batch: int, prompt_len: int, new_tokens: int, dtype: torch.dtype, device: str,
               mode: str | None, hae_compiler: str) -> dict:
    """What every result file records about its run."""
    return {"model": name, "text_layers": config.get_text_config().num_hidden_layers, "batch": batch,
            "initializer_range": config.get_text_config().initializer_range, "prompt": prompt_len,
            "new_tokens": new_tokens, "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "hae_mode": mode, "hae_compiler": hae_compiler}


def release_memory(device: str) -> None:
    """Frees what the last model left behind and starts the allocator's peak afresh."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def hae_model(config, label: str, sequence_len: int, device: str, dtype: torch.dtype, mode: str | None,
              hae_compiler: str, built_in: torch.dtype | None = None) -> tuple[torch.nn.Module, object]:
    """A fresh build (in `built_in`, cast to `dtype`; default built in `dtype`) transformed with the `CONFIGS` entry
    `label` at its share of `sequence_len` tokens, after releasing the last model's memory and resetting the peak and
    the Dynamo counters; returns the model and its hae config."""
    policy, share, transform_options = CONFIGS[label]
    hae_config = hae_fx.HAEConfig(policy=policy, capacity=int(sequence_len * share))
    release_memory(device)
    torch._dynamo.utils.counters.clear()
    model = build(config, device, built_in or dtype).to(dtype)
    return hae_fx.transform(model, hae_config, mode=mode, options={"hae.compiler": hae_compiler},
                            **transform_options), hae_config


def measure(name: str, batch: int, new_tokens: int, device: str, tiny: bool, out: Path,
            dtype: torch.dtype, configs: list[str], text_layers: int | None, hf_eager: bool,
            mode: str | None, hae_compiler: str = "inductor", initializer_range: float | None = None) -> dict:
    config, inputs = model_and_inputs(name, tiny, text_layers, batch, device, dtype, initializer_range)
    prompt_len = inputs["input_ids"].shape[1]
    result = run_header(name, config, batch, prompt_len, new_tokens, dtype, device, mode, hae_compiler)
    result["hf_reference"] = "static cache, eager" if hf_eager or device != "cuda" else "static cache, compiled"

    started = time.perf_counter()
    model = build(config, device, dtype)
    reference, reference_logits, result["hf_static_ms_per_token"] = timed_generate(
        model, inputs, new_tokens, cache_implementation="static", disable_compile=hf_eager)
    print(f"{name}: HF static {result['hf_static_ms_per_token']:.2f} ms/token, "
          f"{time.perf_counter() - started:.0f} s with its compile", flush=True)
    del model
    for label in configs:
        model, hae_config = hae_model(config, label, prompt_len + new_tokens, device, dtype, mode, hae_compiler)
        tokens, logits, ms = timed_generate(model, inputs, new_tokens)
        new = slice(prompt_len, None)
        agreement = (tokens[:, new] == reference[:, new]).float().mean().item()
        cache = hae_fx.HAECache.for_model(model, hae_config, batch)
        result[label] = {"ms_per_token": ms, "token_agreement_with_hf": agreement,
                         "tokens_equal_hf": tokens.tolist() == reference.tolist(),
                         "logits": logit_agreement(logits, reference_logits),
                         "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"],
                         "decode_graphs": len(model.hae_graphs["decode"]), "kv_bytes": cache.kv_nbytes,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
        del model, cache
        path = out / f"gpu_families_{name}_{str(dtype).removeprefix('torch.')}_{result['text_layers']}l.json"
        path.write_text(json.dumps(result, indent=1))
        print(json.dumps({label: result[label]}), flush=True)
    return result


def measure_against_fp32(name: str, batch: int, new_tokens: int, device: str, tiny: bool, out: Path,
                         dtype: torch.dtype, configs: list[str], text_layers: int | None, hf_eager: bool,
                         mode: str | None, hae_compiler: str = "inductor",
                         initializer_range: float | None = None) -> dict:
    """`--fp32-reference` (the module docstring): every model's per-step logit error against HF's fp32 path."""
    config, reference_inputs = model_and_inputs(name, tiny, text_layers, batch, device, torch.float32,
                                                initializer_range)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in reference_inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    result = run_header(name, config, batch, prompt_len, new_tokens, dtype, device, mode, hae_compiler)
    result.update(reference="HF static cache, eager, float32",
                  hf="static cache, eager" if hf_eager or device != "cuda" else "static cache, compiled")

    def forced_logits(model, **kwargs) -> list[torch.Tensor]:
        path = ForcedPath(targets[:, prompt_len:], prompt_len)
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([path]), **kwargs)
        return path.steps

    model = build(config, device, torch.float32)
    reference_logits = StepLogits()
    targets = model.generate(**reference_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([reference_logits]),
                             cache_implementation="static", disable_compile=True)
    model = model.to(dtype)
    forced_logits(model, cache_implementation="static", disable_compile=hf_eager)  # compile and warm up
    result["hf_error"] = errors_against(forced_logits(model, cache_implementation="static",
                                                      disable_compile=hf_eager), reference_logits.steps)
    del model
    hf_max = result["hf_error"]["max_abs"]  # 0 where HF's path is the reference's own (fp32, eager)
    for label in configs:
        model, _ = hae_model(config, label, prompt_len + new_tokens, device, dtype, mode, hae_compiler,
                             built_in=torch.float32)
        forced_logits(model)  # compile and warm up
        error = errors_against(forced_logits(model), reference_logits.steps)
        result[label] = {"error": error, "max_abs_vs_hf": error["max_abs"] / hf_max if hf_max else None,
                         "cudagraph_skips": torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]}
        del model
        print(json.dumps({label: result[label]}), flush=True)
    path = out / f"gpu_families_{name}_{str(dtype).removeprefix('torch.')}_{result['text_layers']}l_vs_fp32.json"
    path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["gemma3_4b", "qwen2_5_vl_7b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="weights and activations (default: bfloat16 on cuda, float32 elsewhere); float32 makes "
                             "greedy tokens of random weights comparable across attention kernels")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["full", "streaming_half"])
    parser.add_argument("--text-layers", type=int, default=None,
                        help="keep the first N decoder layers (a shorter compile for a logits check)")
    parser.add_argument("--hf-eager", action="store_true",
                        help="the HF reference without HF's decode compile (on CUDA HF compiles its static-cache "
                             "step; elsewhere it never does)")
    parser.add_argument("--mode", choices=["reduce-overhead", "default"], default=None,
                        help="hae's torch.compile mode (default: reduce-overhead on cuda, Inductor's default "
                             "elsewhere)")
    parser.add_argument("--hae-compiler", choices=["inductor", "eager"], default="inductor",
                        help="eager: hae's rewritten graphs run eagerly, without Inductor or CUDA graphs (on CUDA "
                             "the ops' implementation still calls the fused attention kernel)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a functional check on any machine")
    parser.add_argument("--initializer-range", type=float, default=None,
                        help="std of the random text weights (default: the config's): a wider one spreads the "
                             "next-token logits, so that bf16 rounding rarely flips a greedy token")
    parser.add_argument("--fp32-reference", action="store_true",
                        help="per-step logit error of HF and hae in --dtype against HF's fp32 path, on its tokens "
                             "(see above); no timing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    run = measure_against_fp32 if args.fp32_reference else measure
    for name in args.model:
        print(json.dumps(run(name, args.batch, args.new_tokens, args.device, args.tiny, args.out, dtype,
                             args.configs, args.text_layers, args.hf_eager,
                             args.mode or ("reduce-overhead" if args.device == "cuda" else None),
                             args.hae_compiler, args.initializer_range)),
              flush=True)


if __name__ == "__main__":
    main()
