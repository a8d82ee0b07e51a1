"""`transform(model, config)`: make an HF model generate with an `HAECache`, prefill and decode compiled
through the hae backend.

What it installs, on the model instance only (its class and weight values are untouched):

- `model.generate`: takes the model's `HAECache` for the batch (one, reset and reused by every call that passes
  none, as HF's static cache is: a returned cache is the next call's), checks the request fits (`full` needs room
  for prompt + new tokens), and calls HF's `generate` with HF's own compile turned off (hae_fx compiles).
- `model.forward`: with an `HAECache`, the first call (the prompt) stages the prompt's positions and visual
  mask in the cache and runs normally, its language model compiled (prefill graph); later calls run one
  compiled decode step (`fullgraph=True`, `dynamic=False`): one graph, replayed every step. A later call with
  several tokens (a follow-up turn, `hae_fx.turns`) runs them as one compiled chunk (a cache that never evicts) or
  through that decode step one by one.
- the language model's `forward`: compiled prefill while the cache is empty, with the prompt's length a dynamic
  dimension (`hae_fx.prompt_shapes`): one graph for every prompt length.
- for a policy that prunes hidden states (`Policy.pruned_after`, e.g. `HAEConfig(prune_hidden=True)`), the forward
  of the decoder layers after that layer (`hae_fx.pruning`): during prefill they compute on the kept tokens.
- its decoder layers' sibling projection weights (q/k/v, gate/up) become rows of one storage per group, the same
  bytes (`hae_fx.packing`), so that the compiled graphs run each group as one matmul (`hae_fx.passes.projections`).

Each compile is logged at INFO on the `hae_fx` logger when it starts and when it ends (CPU compiles take tens of
seconds).

The vision tower stays eager during prefill, as under HF's own compile (its graphs break on data-dependent
code); decode never runs it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hae_fx.backend import FUSE_OPTION, GraphRecord, hae_backend
from hae_fx.batch_buckets import bucket, drop_padding, pad_request
from hae_fx.cache import TEXT, VISUAL, HAECache
from hae_fx.config import PolicyConfig
from hae_fx.decode_loop import hae_sample
from hae_fx.errors import HAECapacityError, HAEConfigError, HAEError
from hae_fx.installation import Installation, install_deepcopy, installation_of
from hae_fx.models import ModelFamily, decoder_layers, family_of
from hae_fx.models.family import tower_not_traceable
from hae_fx.packing import pack_projections
from hae_fx.policies import policy_for
from hae_fx.policies.hae import HAEConfig
from hae_fx.prompt_shapes import mark_prompt_dynamic
from hae_fx.pruning import install_hidden_pruning
from hae_fx.turns import run_turn
from hae_fx.validation import check_cache_fits_model, check_full_fits, check_generate_request

#: `transform(decode_loop=...)`: hae_fx's loop for greedy and multinomial decoding, or HF's for everything
DECODE_LOOPS = ("hae", "hf")

log = logging.getLogger("hae_fx")

#: prefill graphs one transformed model may compile: one per batch size and per shape the graph specialises on (a
#: one-token prompt); every prompt length of a batch size shares one graph
PREFILL_SHAPES_PER_MODEL = 64

#: Inductor settings of the graphs that run once per request (the prompt's, and a follow-up turn's chunk), unless
#: `options` names them: coordinate-descent tuning benchmarks each kernel's neighbouring launch configs on its first
#: run, which pays on a decode step replayed per token and not on a dynamic-length prompt graph. torchao's
#: `quantize_` turns it on process-wide (`set_inductor_config=True`, its default); on an H200 the prompt graph of
#: two LLaVA-7B-shaped layers with int4 weights was still being tuned after 250 s (docs/quantization.md).
ONCE_PER_REQUEST_INDUCTOR = {"coordinate_descent_tuning": False}


def _own_code(function: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of `function` with its own code object.

    Dynamo caches compiled graphs per code object and caps recompiles per code object; the step functions of
    every transformed model share their source, so without their own code objects several models in one
    process would evict each other's graphs and exhaust the cap.
    """
    code = function.__code__.replace()
    return types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)


def transform(model: torch.nn.Module, config: PolicyConfig | None = None, *, mode: str | None = None,
              options: dict[str, Any] | None = None, decode_loop: str = "hae",
              fuse_projections: bool = True) -> torch.nn.Module:
    """Ready `model` to generate with a fixed-capacity evicting cache; returns the same model.

    Args:
        model: an HF generative model (`hae_fx.models.family_of` reads its decoder, geometry and layer kinds).
        config: the eviction policy's config (`hae_fx.HAEConfig(policy=...)`, or a config class of
            `hae_fx.policies`, e.g. `hae_fx.policies.snapkv.SnapKVConfig(...)`); `HAEConfig()` when None.
        mode: torch.compile mode for prefill and decode (e.g. `"reduce-overhead"` for CUDA graphs).
        options: Inductor config patches, plus `"hae.compiler": "eager"` to run the rewritten graphs without
            Inductor (the eager-reference path). The prompt and chunk graphs also take
            `ONCE_PER_REQUEST_INDUCTOR` where `options` does not set those keys.
        decode_loop: `"hae"` runs greedy and multinomial decoding in `hae_fx.decode_loop` (HF's tokens without a
            host-device synchronisation per step); `"hf"` keeps HF's own loop for every request.
        fuse_projections: pack each decoder layer's sibling projection weights (q/k/v, gate/up) into one storage
            and run each group as one matmul; False leaves the weights and the graphs' linears as they are.

    The model gains `hae_config` and `hae_graphs` (`{"prefill": [...], "decode": [...], "chunk": [...]}`, one
    `hae_fx.backend.GraphRecord` per graph compiled: what the passes found and the rewritten code).
    """
    config = HAEConfig() if config is None else config
    if decode_loop not in DECODE_LOOPS:
        raise HAEConfigError(f"decode_loop must be one of {DECODE_LOOPS}, got {decode_loop!r}")
    policy = policy_for(config)  # raises HAEConfigError for anything but a registered policy's config
    if getattr(model, "hae_config", None) is not None:
        raise HAEError("this model is already transformed by hae_fx; transform a fresh model instead")
    previous = installation_of(model)
    if previous is not None:  # transformed before, then hae_config cleared: transform the plain model again
        previous.remove()
    family = family_of(model)
    family.check_supported(model)
    family.layer_kinds(model)  # refuses layer types hae_fx does not know, before anything is compiled
    policy.check_model(family.num_layers(model))
    graphs: dict[str, list[GraphRecord]] = {"prefill": [], "decode": [], "chunk": []}
    language_model = family.language_model(model)
    if fuse_projections:
        layers = decoder_layers(language_model, family.num_layers(model))
        pack_projections([(f"layers.{index}", layer) for index, layer in enumerate(layers)], model)
    else:
        options = {**(options or {}), FUSE_OPTION: False}

    def backend_for(phase: str) -> Any:
        phase_options = options if phase == "decode" else {**ONCE_PER_REQUEST_INDUCTOR, **(options or {})}

        def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            log.info("hae: compiling the %s graph (%s, compiler %s)...", phase, _shapes_note(phase),
                     (options or {}).get("hae.compiler", "inductor"))
            start = time.perf_counter()
            compiled = hae_backend(gm, example_inputs, mode=mode, options=phase_options,
                                   on_rewrite=graphs[phase].append)
            log.info("hae: %s graph compiled in %.1f s", phase, time.perf_counter() - start)
            return compiled

        return compile_graph

    towers = family.towers_inside(language_model)

    eager_language_forward = language_model.forward
    eager_forward = model.forward
    eager_generate = model.generate

    def hae_prefill(*args: Any, **kwargs: Any) -> Any:
        return eager_language_forward(*args, **kwargs)

    def hae_decode_step(*args: Any, **kwargs: Any) -> Any:
        return eager_forward(*args, **kwargs)

    # dynamic=None: the dimensions `mark_prompt_dynamic` marks are symbolic, every other one static
    compiled_prefill = torch.compile(_own_code(hae_prefill), backend=backend_for("prefill"), fullgraph=True,
                                     dynamic=None)
    compiled_decode = torch.compile(_own_code(hae_decode_step), backend=backend_for("decode"), fullgraph=True,
                                    dynamic=False)

    def hae_chunk_step(*args: Any, **kwargs: Any) -> Any:
        return eager_forward(*args, **kwargs)

    # a follow-up turn's chunk (hae_fx.turns): its length is marked dynamic, one graph for every length
    compiled_chunk = torch.compile(_own_code(hae_chunk_step), backend=backend_for("chunk"), fullgraph=True,
                                   dynamic=None)

    @functools.wraps(eager_language_forward)
    def language_forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if isinstance(cache, HAECache) and not cache.prefilled:
            mark_prompt_dynamic(args, kwargs, cache)
            # automatic dynamic off: Dynamo keys what it learned about a frame by its file, line and name, which every
            # transformed model's prefill shares; only the dimensions marked here are dynamic
            with torch._dynamo.config.patch(recompile_limit=PREFILL_SHAPES_PER_MODEL, automatic_dynamic_shapes=False), \
                    _towers_refused(language_model, towers):
                return compiled_prefill(*args, **kwargs)
        return eager_language_forward(*args, **kwargs)

    @functools.wraps(eager_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, HAECache):
            return eager_forward(*args, **kwargs)
        if cache.prefilled:
            if _prompt_tensor(args, kwargs).shape[1] > 1:
                with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # as for the prefill
                    return run_turn(model, compiled_decode, compiled_chunk, cache, kwargs,
                                    family.image_token_id(model))
            cache.begin_decode_step()
            return compiled_decode(*args, **kwargs)
        token_pos, modality = prompt_metadata(family, model, args, kwargs)
        cache.begin_prefill(token_pos, modality)
        output = eager_forward(*args, **kwargs)
        cache.end_prefill()
        return output

    own_caches: dict[int, HAECache] = {}

    def reusable_cache(rows: int) -> HAECache:
        """The model's own cache for `rows` sequences (a batch bucket), reset: every generate call that passes none
        reuses it, as HF's static cache is reused, so its buffers keep their addresses. Under
        `mode="reduce-overhead"` a fresh cache per call was held alive after its call (docs/gpu.md: the fifth generate
        of a 7B-shaped model peaked four caches above the first), and its new addresses make CUDA graph trees
        record the decode step again."""
        if rows in own_caches:
            own_caches[rows].reset()
        else:
            own_caches[rows] = HAECache.for_model(model, config, rows)
        return own_caches[rows]

    @functools.wraps(eager_generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        request = check_generate_request(model, _prompt_tensor(args, kwargs), kwargs)
        batch = request.batch
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = reusable_cache(bucket(batch))
        elif not isinstance(cache, HAECache):
            raise HAEConfigError(
                f"a transformed model generates with an hae_fx.HAECache, got {type(cache).__name__}; omit "
                "past_key_values to get one"
            )
        elif cache.batch not in (batch, bucket(batch)):
            raise HAECapacityError(f"batch mismatch: the HAECache holds batch {cache.batch}, the prompt has {batch}")
        else:
            check_cache_fits_model(cache, model, family, policy)
        check_full_fits(cache, request)
        padded = cache.batch > batch
        if padded:  # a batch bucket: rows of padding, dropped from the outputs (hae_fx.batch_buckets)
            args, kwargs = pad_request(args, kwargs, batch, cache.batch, cache.tokens_seen if cache.prefilled else 0,
                                       family.image_token_id(model))
        if cache.prefilled:
            _check_follow_up_is_unpadded(cache, kwargs.get("attention_mask"))
        kwargs["past_key_values"] = cache
        kwargs.setdefault("disable_compile", True)  # HF must not wrap hae's compiled step in its own compile
        if decode_loop == "hae" and _samples_one_beam(model, kwargs):
            # HF hands a callable `custom_generate` neither the streamer nor synced_gpus: bind them
            kwargs["custom_generate"] = functools.partial(hae_sample, streamer=kwargs.get("streamer"))
        output = eager_generate(*args, **kwargs)
        return drop_padding(output, batch) if padded else output

    installation = Installation()
    if policy.pruned_after() is not None:
        install_hidden_pruning(list(decoder_layers(language_model, family.num_layers(model))), policy.pruned_after(),
                               installation.set)
    installation.set(language_model, "forward", language_forward)
    installation.set(model, "forward", forward)
    installation.set(model, "generate", generate)
    installation.set(model, "hae_config", config)
    installation.set(model, "hae_graphs", graphs)
    install_deepcopy(installation, model, lambda clone: transform(clone, config, mode=mode, options=options,
                                                                        decode_loop=decode_loop,
                                                                        fuse_projections=fuse_projections))
    return model


def _shapes_note(phase: str) -> str:
    if phase == "prefill":
        return "once for every prompt length"
    if phase == "chunk":
        return "once for every follow-up turn's length"
    return "once, replayed every step"


@contextlib.contextmanager
def _towers_refused(language_model: torch.nn.Module, towers: list[str]) -> Iterator[None]:
    """A prefill Dynamo cannot trace, in a text decoder that runs towers of its own, is refused by name (an `HAEError`
    found while tracing is raised by the compiled graph instead, `hae_fx.ops.refuse`)."""
    try:
        yield
    except torch._dynamo.exc.Unsupported as error:
        if towers:
            raise tower_not_traceable(language_model, towers, error) from error
        raise


def prompt_metadata(family: ModelFamily, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(token_pos, modality)` of a prompt forward: logical positions (tokens before, -1 for padding) and
    TEXT/VISUAL tags.

    Padding is read from the attention mask as HF passes it: 2-D `[B, T]`, 4-D `[B, 1, T, T]` (a token is real
    iff it may attend to itself), a dict of those per layer type (transformers 5.x, for configs with
    `layer_types`), or None (no padding).
    """
    prompt = _prompt_tensor(args, kwargs)
    batch, length = prompt.shape[:2]
    device = prompt.device
    valid = _token_validity(kwargs.get("attention_mask"), batch, length, device)
    # A token's logical position counts the real tokens before it, whatever the model's own position ids say:
    # PaliGemma's start at 1, Qwen2-VL's are 3-D mRoPE positions that the model continues at decode from the
    # cache's length and its own rope delta. Sinks, windows and rings count tokens.
    token_pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)

    modality = torch.full((batch, length), TEXT, dtype=torch.int8, device=device)
    image_token_id = family.image_token_id(model)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if image_token_id is not None and input_ids is not None:
        modality = torch.where(input_ids == image_token_id, VISUAL, modality).to(torch.int8)
    return token_pos, modality


def _token_validity(attention_mask: torch.Tensor | dict[str, torch.Tensor] | None, batch: int, length: int,
                    device: torch.device) -> torch.Tensor:
    if isinstance(attention_mask, dict):
        # every layer type's mask lets a real token attend to itself, so any of them tells padding apart
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].to(device=device, dtype=torch.bool)
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)[:, -length:]
    if diagonal.dtype == torch.bool:
        return diagonal.to(device)
    return (diagonal == 0).to(device)  # additive float mask: 0 where attention is allowed


def _prompt_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise HAEConfigError("hae_fx needs the prompt as input_ids (or inputs_embeds) to size the HAECache")


def _samples_one_beam(model: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether `generate(**kwargs)` decodes greedily or by sampling, one beam, no assistant, on one process: the
    requests `hae_fx.decode_loop` takes (HF hands its `custom_generate` every request, whatever its mode)."""
    generation_config = kwargs.get("generation_config") or model.generation_config

    def setting(name: str) -> Any:
        return kwargs.get(name, getattr(generation_config, name, None))

    other_loop = any(kwargs.get(name) for name in ("assistant_model", "prompt_lookup_num_tokens", "custom_generate",
                                                    "synced_gpus"))
    return setting("num_beams") in (None, 1) and not other_loop and setting("prompt_lookup_num_tokens") is None


def _check_follow_up_is_unpadded(cache: HAECache, attention_mask: torch.Tensor | None) -> None:
    """A follow-up turn's tokens (the columns after those the cache has consumed, where HF's generate slices) are
    fed as decode steps, which have no notion of padding: refuse a turn some row pads."""
    if attention_mask is None or attention_mask.dim() != 2:
        return
    if not bool(attention_mask[:, cache.tokens_seen:].bool().all()):
        raise HAECapacityError(
            "a follow-up turn on an HAECache must be real tokens in every row: attention_mask has padding after the "
            f"{cache.tokens_seen} tokens the cache has consumed; left-pad the whole history (rows of a batch differ "
            "only in their leading padding), or continue each conversation in its own cache"
        )


