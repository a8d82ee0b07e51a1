"""Checks a transformed model's `generate` makes before any work: the request is one hae_fx can serve exactly, and a
cache the caller built fits the model and the device.

A request hae_fx cannot serve is refused here, with the supported alternative, rather than failing inside Dynamo
or, worse, producing tokens from a cache that does not match the model:

- generation modes: hae_fx decodes one token per sequence per step from a fixed cache, greedily or by sampling.
  Beam search reorders sequences between steps, `num_return_sequences > 1` multiplies the batch after the cache is
  sized, and assisted or prompt-lookup decoding verifies several tokens per step and crops the cache back;
- `output_attentions=True` (the rewritten attention over the slots returns no weights) and `use_cache=False`
  (which would re-run the whole sequence through a cache that is never read);
- the length a `full` cache must hold, read like HF does: `max_new_tokens`, else `max_length`, else HF's default;
- a user-built `HAECache`: its layers and their kinds, dtype, device and hidden-state pruning must be the model's,
  and its policy must fit the model's depth;
- a cache's memory, estimated before allocating anything, must fit on its device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from hae_fx.errors import HAECapacityError, HAEConfigError, HAETensorParallelError

#: HF generation modes hae_fx runs: one token per sequence per step
SUPPORTED_MODES = ("greedy_search", "sample")


@dataclass(frozen=True)
class GenerateRequest:
    """What a `generate` call asks for, resolved the way HF resolves it.

    Attributes:
        batch, prompt_len: of the prompt tensor.
        max_new_tokens: tokens HF will generate at most.
    """

    batch: int
    prompt_len: int
    max_new_tokens: int


def check_generate_request(model: torch.nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> GenerateRequest:
    """Refuse what hae_fx cannot generate, before a cache is built or anything is compiled.

    Raises:
        HAEConfigError: a prompt that is not `[batch, tokens]`, a generation mode other than greedy or sampling,
            `num_return_sequences > 1`, `output_attentions=True` or `use_cache=False`.
    """
    if prompt.dim() < 2:
        raise HAEConfigError(
            f"the prompt must be [batch, tokens], got shape {tuple(prompt.shape)}; for one sequence pass "
            "input_ids.unsqueeze(0)"
        )
    batch, prompt_len = prompt.shape[:2]
    options = {name: value for name, value in kwargs.items() if name != "generation_config"}
    generation_config, _ = model._prepare_generation_config(kwargs.get("generation_config"), **options)
    mode = generation_config.get_generation_mode(kwargs.get("assistant_model"))
    mode = getattr(mode, "value", mode)
    if mode not in SUPPORTED_MODES:
        raise HAEConfigError(
            f"hae_fx generates greedily or by sampling (one token per sequence per step from a fixed cache); this "
            f"request is {mode} (num_beams={generation_config.num_beams}, assistant_model="
            f"{'set' if kwargs.get('assistant_model') is not None else None}, prompt_lookup_num_tokens="
            f"{generation_config.prompt_lookup_num_tokens}): use num_beams=1 without an assistant or prompt lookup, "
            "with do_sample=False (greedy) or do_sample=True"
        )
    if (generation_config.num_return_sequences or 1) > 1:
        raise HAEConfigError(
            f"num_return_sequences={generation_config.num_return_sequences} is not supported: the HAECache is sized "
            "for the prompt's batch; repeat the prompt rows instead (input_ids.repeat_interleave(n, dim=0), and the "
            "other inputs likewise) with do_sample=True"
        )
    if generation_config.output_attentions:
        raise HAEConfigError(
            "output_attentions=True is not supported: the attention over the cache slots is rewritten into "
            "hae::slot_attention, which returns no attention weights; per-slot accumulated attention is in "
            "HAECache.score (hae_fx.report summarises it)"
        )
    if generation_config.use_cache is False:
        raise HAEConfigError(
            "use_cache=False is not supported: hae_fx generates from its fixed-size HAECache; drop use_cache=False "
            "(or generate with the untransformed model)"
        )
    return GenerateRequest(batch=batch, prompt_len=prompt_len,
                           max_new_tokens=_max_new_tokens(model, generation_config, kwargs, prompt_len))


def _max_new_tokens(model: torch.nn.Module, generation_config, kwargs: dict[str, Any], prompt_len: int) -> int:
    """HF's rule (`GenerationMixin._prepare_generated_length`): `max_new_tokens` wins; an explicit `max_length`
    counts the prompt; without either HF generates its default `max_length` (20) new tokens, capped by the
    model's `max_position_embeddings`."""
    if generation_config.max_new_tokens is not None:
        return generation_config.max_new_tokens
    explicit = kwargs.get("max_length") is not None or model.generation_config.max_length is not None or (
        kwargs.get("generation_config") is not None and kwargs["generation_config"].max_length is not None)
    if explicit:
        return max(generation_config.max_length - prompt_len, 0)
    total = generation_config.max_length + prompt_len
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None:
        total = min(total, max_positions)
    return max(total - prompt_len, 0)


def check_full_fits(cache, request: GenerateRequest) -> None:
    """A policy that never evicts (`full`) needs room for the prompt and every new token."""
    if cache.policy.evicts:
        return
    needed = request.prompt_len + request.max_new_tokens
    if needed > cache.capacity:
        raise HAECapacityError(
            f"policy 'full' keeps every token but capacity={cache.capacity} < prompt ({request.prompt_len}) + "
            f"max_new_tokens ({request.max_new_tokens}) = {needed}; raise HAEConfig.capacity or choose an evicting "
            "policy such as 'streaming'"
        )


def check_cache_fits_model(cache, model: torch.nn.Module, family, model_policy) -> None:
    """A cache the caller built must be the one `HAECache.for_model` would build, except for its policy config.

    Its KV head count and head dim are checked against the first keys it receives instead (the config may name
    them in a way `ModelFamily.kv_geometry` does not read, and then a hand-built cache is the fix).

    Raises:
        HAEConfigError: layers, layer kinds, dtype, device or hidden-state pruning differ from the model's, or the
            cache's policy does not fit the model's depth (e.g. `dap_layer` beyond it).
        HAETensorParallelError: the cache was built for another tensor-parallel degree or process group.
    """
    fix = "build it with hae_fx.HAECache.for_model(model, config, batch)"
    num_layers = family.num_layers(model)
    if len(cache.layers) != num_layers:
        raise HAEConfigError(
            f"the HAECache has {len(cache.layers)} layers but the model's text decoder has {num_layers}; {fix}"
        )
    kinds = family.layer_kinds(model)
    cache_kinds = [layer.kind for layer in cache.layers]
    if cache_kinds != kinds:
        raise HAEConfigError(
            f"the HAECache's layer kinds {[str(kind) for kind in cache_kinds]} differ from the model's "
            f"{[str(kind) for kind in kinds]} (a windowed layer needs its ring of slots); {fix}"
        )
    layer = cache.layers[0]  # `dtype`: what its K/V dequantize to, whatever `kv_dtype` stores them as
    if layer.dtype != model.dtype or layer.device != model.device:
        raise HAEConfigError(
            f"the HAECache computes in {layer.dtype} on {layer.device} but the model computes in {model.dtype} on "
            f"{model.device}; {fix}"
        )
    check_cache_degree(cache, model, family)
    cache.policy.check_model(num_layers)
    if cache.pruned_after != model_policy.pruned_after():
        raise HAEConfigError(
            f"the HAECache prunes hidden states after layer {cache.pruned_after} but the model was transformed to "
            f"prune after layer {model_policy.pruned_after()} (None: no pruning); hidden-state pruning is installed "
            "by hae_fx.transform, so build the cache with the prune_hidden/dap_layer of model.hae_config"
        )


def check_cache_degree(cache, model: torch.nn.Module, family) -> None:
    """Refuse a cache built for another tensor-parallel layout than the model's: its buffers would hold another
    share of the KV heads, and its scores would be averaged over other ranks, or none."""
    from hae_fx.tensor_parallel import tensor_parallel_of

    expected = tensor_parallel_of(model, family.kv_geometry(model)[0])
    held = cache.tensor_parallel
    if held != expected:
        def described(tp) -> str:
            return "one process" if tp is None else f"degree {tp.degree} (process group {tp.group_name!r})"
        raise HAETensorParallelError(
            f"the HAECache was built for tensor parallelism of {described(held)} but the model runs on "
            f"{described(expected)}; build it on each rank with hae_fx.HAECache.for_model(model, config, batch)"
        )


def check_device_holds(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse an allocation of `nbytes` that `device` cannot hold now (before trying it).

    Raises:
        HAECapacityError: naming the bytes needed and the bytes free.
    """
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise HAECapacityError(
            f"{what} needs {nbytes:,} bytes ({nbytes / 2**30:.1f} GiB) on {device}, but only {free:,} bytes "
            f"({free / 2**30:.1f} GiB) are free there; lower capacity or batch"
        )


def free_bytes(device: torch.device) -> int | None:
    """Bytes free on `device` now: CUDA's free memory, the host's available memory for the CPU; None when
    unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None
