"""`hae_fx.export(model, example_inputs, path, config)`: one AOTInductor `.pt2` that generates with eviction
built in, runnable where hae_fx is not installed (`hae_fx.deploy_runner`, or C++ in examples/deploy_cpp).

How the package is built:

1. An `HAECache` is allocated for the example batch. Its tensors become **inputs** of two wrapper modules,
   `prefill` (prompt ids, mask, a kept-length carrier, the cache, and pixels for a VLM) and `decode` (one token
   per sequence, its position, the cache), each returning the last position's logits. Inputs rather than
   buffers because the two programs must read and write the *same* tensors: the runner allocates them once from
   the metadata and passes them to both; AOTInductor writes the cache updates back into them in place.
2. `torch.export` traces each wrapper through the HF model (vision tower included, for a VLM whose tower
   exports); the hae passes (`place_prefill_plan`, `rewrite_attention`) rewrite the exported graphs exactly as
   they rewrite Dynamo's.
3. `torch._inductor.aot_compile` lowers each program, the hae ops through their Inductor decompositions, so the
   package holds only generated kernels: nothing looks the ops up at load time. Weights are kept out of the
   shared libraries (`package_constants_in_so=False`); the archive writer stores each tensor both programs
   share once (`data/weights/`), and the runner hands the same tensors to both programs.

The prompt length is a dynamic dimension of the prefill program (`torch.export.Dim`, 2 to `max_prompt_len`),
the same choice as `hae_fx.transform`'s one prefill graph for every length (`hae_fx.prompt_shapes`): one
program, no padding to buckets (padding would change what a policy sees and keeps). The number of prompt tokens
the policy keeps is a second dimension, carried by an empty `[0, K]` input (`HAECache.kept_len_carriers`);
`K = min(prompt length, kept_len_max)`, which the runner computes from the metadata.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.exc import UserError, UserErrorType

from hae_fx import deploy_runner, export_guards
from hae_fx.backend import rewrite_graph
from hae_fx.cache import HAECache
from hae_fx.config import PolicyConfig
from hae_fx.errors import HAEConfigError, HAEError, HAESiteError, HAEUnsupportedModelError
from hae_fx.models import family_of
from hae_fx.policies import policy_for
from hae_fx.slots import CORE_BUFFERS
from hae_fx.transform import prompt_metadata

log = logging.getLogger("hae_fx")

#: the metadata again, one fact per line, for runners without a JSON parser (examples/deploy_cpp)
CPP_METADATA = "extra/hae_fx.txt"
#: the image inputs a VLM's prefill can take: pixels (the vision tower goes into the package) or the projected
#: features of every image placeholder token (the tower runs elsewhere)
IMAGE_INPUTS = ("pixel_values", "image_features")
#: the inputs a package's prefill takes
EXAMPLE_INPUTS = ("input_ids", "attention_mask", *IMAGE_INPUTS)
#: the shortest prompt a package takes (a one-token prompt would make the prompt dimension a constant)
MIN_PROMPT_LEN = 2


@dataclass(frozen=True)
class CacheTensor:
    """One tensor of an `HAECache`, as a program input: its name, and how to read and replace it on the cache."""

    name: str
    fill: float
    get: Callable[[], torch.Tensor]
    set: Callable[[torch.Tensor], None]


def cache_tensors(cache: HAECache) -> list[CacheTensor]:
    """Every tensor of `cache`, in the order the programs take them (the metadata's `cache` list)."""
    found: list[CacheTensor] = []

    def attribute(name: str, owner: object, attr: str, fill: float) -> None:
        if getattr(owner, attr) is not None:
            found.append(CacheTensor(name, fill, lambda: getattr(owner, attr),
                                     lambda tensor: setattr(owner, attr, tensor)))

    def entry(name: str, table: dict[str, torch.Tensor], key: str, fill: float) -> None:
        found.append(CacheTensor(name, fill, lambda: table[key], lambda tensor: table.__setitem__(key, tensor)))

    for index, layer in enumerate(cache.layers):
        for attr in ("keys", "values", "key_scales", "value_scales"):
            attribute(f"layer{index}.{attr}", layer, attr, 0)
        attribute(f"layer{index}.ring_pos", layer, "ring_pos", -1)
    for index, group in enumerate(cache.slots.groups):
        for name in group.core:
            entry(f"group{index}.{name}", group.core, name, CORE_BUFFERS[name][1])
        for name in group.extras:
            entry(f"group{index}.extra.{name}", group.extras, name, 0)
    attribute("seen", cache.slots, "seen", CORE_BUFFERS["seen"][1])
    return found


@contextlib.contextmanager
def _bound(cache: HAECache, tensors: list[CacheTensor], values: list[torch.Tensor]) -> Iterator[None]:
    """Point the cache at `values` (the traced program inputs) while a program is traced."""
    originals = [tensor.get() for tensor in tensors]
    for tensor, value in zip(tensors, values, strict=True):
        tensor.set(value)
    try:
        yield
    finally:
        for tensor, original in zip(tensors, originals, strict=True):
            tensor.set(original)


class _Prefill(torch.nn.Module):
    """The prompt forward: positions and visual mask from the ids, the policy's prefill plan, the cache writes.

    `image_input` names the image input (`IMAGE_INPUTS`) or is None. Image features `[N, hidden]` (one row per
    image placeholder token of the batch, in order) replace the placeholders' embeddings, as HF's VLMs do with
    their towers' output, and the model runs on those embeddings."""

    def __init__(self, model: torch.nn.Module, cache: HAECache, image_input: str | None) -> None:
        super().__init__()
        self.model, self.cache, self.image_input = model, cache, image_input
        self.tensors = cache_tensors(cache)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kept: torch.Tensor,
                cache: list[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        state = self.cache
        family = family_of(self.model)
        with _bound(state, self.tensors, cache):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            state.prompt_pos, state.prompt_modality = prompt_metadata(family, self.model, (), kwargs)
            state.kept_len_carriers = [kept]
            state.prefilled = False
            if self.image_input == "image_features":
                embeds = self.model.get_input_embeddings()(input_ids)
                placeholders = (input_ids == family.image_token_id(self.model)).unsqueeze(-1).expand_as(embeds)
                kwargs = {"inputs_embeds": embeds.masked_scatter(placeholders, image.to(embeds.dtype)),
                          "attention_mask": attention_mask}
            elif self.image_input == "pixel_values":
                kwargs["pixel_values"] = image
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            out = self.model(**kwargs, position_ids=position_ids, past_key_values=state, use_cache=True,
                             logits_to_keep=1)
            return out.logits[:, -1]


class _Decode(torch.nn.Module):
    """One decode step: the policy's slot choice, the writes, attention over the slots, the score update."""

    def __init__(self, model: torch.nn.Module, cache: HAECache) -> None:
        super().__init__()
        self.model, self.cache = model, cache
        self.tensors = cache_tensors(cache)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        state = self.cache
        with _bound(state, self.tensors, cache):
            state.prefilled = True
            out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=state, use_cache=True,
                             logits_to_keep=1)
            return out.logits[:, -1]


def kept_len_max(config: PolicyConfig, batch: int, max_prompt_len: int) -> int:
    """The most prompt tokens the policy keeps: a package's prefill keeps `min(prompt length, this)`.

    Raises:
        HAEConfigError: the policy's kept length depends on more than the prompt length (e.g. `hae`'s
            `max_visual_keep`, which counts visual tokens), which a runner without hae_fx cannot compute.
    """
    policy = policy_for(config)
    cap = policy.prefill_kept_len(max_prompt_len, [max_prompt_len] * batch, [0] * batch)
    for length in range(1, max_prompt_len + 1):
        for visual in (0, length):
            if policy.prefill_kept_len(length, [length] * batch, [visual] * batch) != min(length, cap):
                raise HAEConfigError(
                    f"policy {config.policy!r} with this config keeps a number of prompt tokens that depends on the "
                    "prompt's content (e.g. max_visual_keep), which an exported package cannot compute without "
                    "hae_fx; export with a config whose kept length depends on the prompt length only"
                )
    return cap


def _check_exportable(model: torch.nn.Module, config: PolicyConfig, cache: HAECache) -> None:
    policy = policy_for(config)
    if len(cache.slots.groups) != 1:
        raise HAEConfigError(f"policy {config.policy!r} gives layers capacities of their own; exported packages "
                             "support policies with one slot group (every layer keeps one index set)")
    if policy.pruned_after() is not None:
        raise HAEConfigError(f"policy {config.policy!r} prunes hidden states (prune_hidden), which exported "
                             "packages do not support yet; export with prune_hidden=False")
    if getattr(model, "hae_config", None) is not None:
        raise HAEConfigError("export takes the plain HF model, not one hae_fx.transform has readied; build or load "
                             "a fresh model")


def _role_inputs(program: torch.export.ExportedProgram, flat_inputs: list[Any]) -> list[Any]:
    """The exported graph's placeholders' example values for `cache_roles_from_example_inputs`: the user inputs
    where they are, None for lifted parameters and buffers."""
    user = iter(flat_inputs)
    kinds = [spec.kind for spec in program.graph_signature.input_specs]
    return [next(user) if kind == torch.export.graph_signature.InputKind.USER_INPUT else None for kind in kinds]


def _export_program(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple, name: str,
                    admissible: Sequence[Mapping[str, int]] = ()) -> torch.export.ExportedProgram:
    """`torch.export` one wrapper, then the hae passes on its graph (the cache tensors are recognised by the
    roles their example values carry). `admissible`: every assignment of the named dynamic dims the runner can
    pass; the guards torch.export defers to runtime must hold at each (`hae_fx.export_guards`).

    Raises:
        HAEUnsupportedModelError: the model's forward does not trace with a dynamic prompt length (a shape guard
            on it fails at some prompt length the package would take, e.g. a branch on the length), or
            torch.export itself failed on it (on torch 2.11, LLaVA-7B's prefill with pixels fails in the tracer).
        HAESiteError: the decode graph's attention over the cache slots was not rewritten (it would attend over
            every slot under the model's own mask).
    """
    def unsupported(guard: str) -> HAEUnsupportedModelError:
        return HAEUnsupportedModelError(
            f"{module.model.config.model_type}'s {name} program does not trace with a dynamic prompt length: "
            f"torch.export specializes it ({guard}); export supports models whose forward keeps the sequence "
            "length symbolic (TORCH_LOGS=+dynamic shows the model's line that adds the guard)"
        )

    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                      prefer_deferred_runtime_asserts_over_guards=True)
    except UserError as error:
        if error.error_type != UserErrorType.CONSTRAINT_VIOLATION:
            raise
        raise unsupported(next((line.strip(" -.") for line in str(error).splitlines() if "guard" in line),
                               str(error))) from error
    except HAEError:
        raise
    except Exception as error:  # torch.export's own failure, whose message names no model and no remedy
        first_line = next(iter(str(error).splitlines()), "")
        raise HAEUnsupportedModelError(
            f"torch {torch.__version__}'s torch.export failed on {module.model.config.model_type}'s {name} program "
            f"({type(error).__name__}: {first_line[:300]}); hae_fx's export is tested on torch 2.13, where "
            "docs/deploy.md lists the families that export (the traceback above this error is torch's)"
        ) from error
    violation = export_guards.first_violation(export_guards.runtime_assertions(program),
                                              export_guards.dim_symbols(program, dynamic_shapes), admissible)
    if violation is not None:
        assertion, values = violation
        at = ", ".join(f"{dim}={value}" for dim, value in sorted(values.items()))
        raise unsupported(f"the guard {assertion} fails at {at}")
    record = rewrite_graph(program.graph_module, _role_inputs(program, torch.utils._pytree.tree_leaves(args)))
    if name == "decode" and (record.report is None or not record.report.layers):
        raise HAESiteError("the exported decode graph has no attention over the HAECache slots to rewrite; "
                           "export supports models whose attention the hae passes find (SDPA or HF's eager form)")
    log.debug("hae: %s program: %s", name, record.report)
    return program


def _aot_compile(program: torch.export.ExportedProgram, args: tuple, name: str, options: dict[str, Any]) -> list:
    start = time.perf_counter()
    log.info("hae: compiling the %s program with AOTInductor...", name)
    files = torch._inductor.aot_compile(program.module(), args, options={
        **options, "aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "pickle_weights"})
    log.info("hae: %s program compiled in %.1f s", name, time.perf_counter() - start)
    return [_plain_weights(file) for file in files]


def _plain_weights(file: Any) -> Any:
    """A weights table with plain tensors in place of `nn.Parameter`s (same storage): the archive writer pickles
    each, and C++'s unpickler (`torch::pickle_load`) reads tensors but not parameters."""
    from torch.export.pt2_archive._package_weights import Weights

    if not isinstance(file, Weights):
        return file
    return Weights({fqn: (tensor.detach(), props) for fqn, (tensor, props) in file.items()})


def export(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor], path: str | Path,
           config: PolicyConfig, *, max_prompt_len: int = 512, options: dict[str, Any] | None = None) -> Path:
    """Build one `.pt2` package holding `model`'s prefill and decode programs with `config`'s eviction.

    Args:
        model: a plain HF generative model (`hae_fx.models.family_of` reads it), in eval mode, on the device the
            package is for (CPU or CUDA).
        example_inputs: `input_ids` `[B, T]`, optionally `attention_mask` and, for a VLM, `pixel_values` (the
            vision tower goes into the package) or `image_features` `[N, hidden]`, the projected features of the
            batch's `N` image placeholder tokens in order (for a tower that does not export: it runs elsewhere).
            `B` is the package's batch (fixed: the cache is allocated for it); `T` only has to lie in the prompt
            range; `N` is fixed too (the same images per prompt).
        path: where to write the package (`.pt2`).
        config: the eviction policy's config.
        max_prompt_len: the longest prompt the package takes.
        options: Inductor config patches for both programs.

    Returns:
        `path`. `hae_fx.load(path)` (or `hae_fx.deploy_runner.Runner` without hae_fx) runs it.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise HAEConfigError(f"the package path must end in .pt2, got {path}")
    unknown = set(example_inputs) - set(EXAMPLE_INPUTS)
    if unknown:
        raise HAEUnsupportedModelError(
            f"example inputs {sorted(unknown)}: an exported package's prefill takes {list(EXAMPLE_INPUTS)} only, "
            f"and this model's prompts need more (e.g. image grids, token types); export supports models whose "
            "prompts are ids, a mask and pixels"
        )
    input_ids = example_inputs["input_ids"].contiguous()
    batch, length = input_ids.shape
    if not MIN_PROMPT_LEN <= length <= max_prompt_len:
        raise HAEConfigError(f"example input_ids have {length} tokens; they must lie in [{MIN_PROMPT_LEN}, "
                             f"max_prompt_len={max_prompt_len}]")
    family = family_of(model)
    family.check_supported(model)
    cache = HAECache.for_model(model, config, batch)
    _check_exportable(model, config, cache)
    kept_max = kept_len_max(config, batch, max_prompt_len)
    attention_mask = example_inputs.get("attention_mask", torch.ones_like(input_ids)).contiguous()
    images = [name for name in IMAGE_INPUTS if example_inputs.get(name) is not None]
    if len(images) > 1:
        raise HAEConfigError(f"example inputs hold both {IMAGE_INPUTS}: pass pixels or image features, not both")
    image_input = images[0] if images else None
    image = example_inputs[image_input].contiguous() if image_input else None
    tensors = cache_tensors(cache)
    cache_values = [tensor.get() for tensor in tensors]

    prompt = torch.export.Dim("prompt_len", min=MIN_PROMPT_LEN, max=max_prompt_len)
    kept_dim = torch.export.Dim("kept_len", min=1, max=kept_max)
    kept = torch.empty(0, min(length, kept_max), device=input_ids.device)
    prefill_args: tuple = (input_ids, attention_mask, kept, cache_values, *([image] if image_input else []))
    prefill_shapes: tuple = ({1: prompt}, {1: prompt}, {1: kept_dim}, [None] * len(cache_values),
                             *([None] if image_input else []))
    with torch.no_grad():
        lengths = [{"prompt_len": length, "kept_len": min(length, kept_max)}
                   for length in range(MIN_PROMPT_LEN, max_prompt_len + 1)]
        prefill = _export_program(_Prefill(model, cache, image_input), prefill_args, prefill_shapes, "prefill",
                                  lengths)
        # contiguous examples: AOTInductor compiles for the example inputs' strides
        decode_args = (input_ids[:, -1:].contiguous(), attention_mask.sum(-1, keepdim=True), cache_values)
        decode = _export_program(_Decode(model, cache), decode_args, (None, None, [None] * len(cache_values)),
                                 "decode")
        files = {"prefill": _aot_compile(prefill, prefill_args, "prefill", options or {}),
                 "decode": _aot_compile(decode, decode_args, "decode", options or {})}
    metadata = _metadata(model, config, family.name if family.model_types else model.config.model_type, batch,
                         max_prompt_len, kept_max, tensors, image_input, image, input_ids.device, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    from torch.export.pt2_archive._package import package_pt2

    extra = {deploy_runner.METADATA.removeprefix("extra/"): json.dumps(metadata, indent=1),
             CPP_METADATA.removeprefix("extra/"): cpp_metadata(metadata)}
    package_pt2(str(path), aoti_files=files, extra_files=extra)
    _check_weights_records(path, metadata["weights"])
    log.info("hae: wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path


def _metadata(model: torch.nn.Module, config: PolicyConfig, family: str, batch: int, max_prompt_len: int,
              kept_max: int, tensors: list[CacheTensor], image_input: str | None, image: torch.Tensor | None,
              device: torch.device, files: dict[str, list]) -> dict[str, Any]:
    generation = model.generation_config
    eos = generation.eos_token_id
    vocab = model.config.get_text_config(decoder=True).vocab_size
    return {
        "format": deploy_runner.FORMAT_VERSION,
        "hae_fx_version": importlib.metadata.version("hae_fx"),
        "torch_version": torch.__version__,
        "device": device.type,
        "family": family,
        "config": config.key(),
        "policy": config.policy,
        "batch": batch,
        "min_prompt_len": MIN_PROMPT_LEN,
        "max_prompt_len": max_prompt_len,
        "kept_len_max": kept_max,
        "max_total_tokens": None if policy_for(config).evicts else config.capacity,
        "vocab_size": vocab,
        "eos_token_id": None if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "pad_token_id": generation.pad_token_id,
        "image_input": image_input,
        "image_shape": list(image.shape) if image_input else None,
        "image_dtype": str(image.dtype).removeprefix("torch.") if image_input else None,
        "prefill_inputs": ["input_ids", "attention_mask", "kept", "cache", *([image_input] if image_input else [])],
        "decode_inputs": ["input_ids", "position_ids", "cache"],
        "cache": [{"name": tensor.name, "shape": list(tensor.get().shape),
                   "dtype": str(tensor.get().dtype).removeprefix("torch."), "fill": tensor.fill} for tensor in tensors],
        "weights": weights_tables(files),
    }


def weights_tables(files: dict[str, list]) -> dict[str, dict[str, list]]:
    """Per program, per constant: the archive record holding its storage, its shape, stride and storage offset.

    The records are named as `package_pt2` names them: it groups the programs' weights by shared storage with
    `group_weights` and writes group `i` as `weights/weight_i`; this calls the same function on the same tables
    (and `export` checks the result against the `weights_config.json` the writer stores)."""
    from torch.export.pt2_archive._package_weights import Weights, group_weights

    weights = {name: next((file for file in program if isinstance(file, Weights)), None)
               for name, program in files.items()}
    if any(table is None for table in weights.values()):
        raise HAEUnsupportedModelError("AOTInductor returned no weights table; this torch packages weights "
                                       "differently from the one hae_fx.export was written for")
    tables: dict[str, dict[str, list]] = {name: {} for name in files}
    for index, group in enumerate(group_weights(weights)):
        for name, fqn in group:
            props = weights[name].get_weight_properties(fqn)
            tables[name][fqn] = [f"weight_{index}", list(props.shape), list(props.stride), props.offset]
    return tables


def _check_weights_records(path: Path, tables: dict[str, dict[str, list]]) -> None:
    """The archive writer's own record of where each weight went must be the metadata's."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/")[0]
        for name, table in tables.items():
            written = json.loads(archive.read(f"{root}/data/aotinductor/{name}/weights_config.json"))
            if {fqn: entry[0] for fqn, entry in written.items()} != {fqn: entry[0] for fqn, entry in table.items()}:
                raise HAEUnsupportedModelError(
                    f"the {name} program's weights were stored under other records than hae_fx.export expected; "
                    "this torch packages weights differently from the one hae_fx.export was written for"
                )


def cpp_metadata(metadata: dict[str, Any]) -> str:
    """`metadata` as lines of space-separated words, which a C++ runner reads with `std::istringstream`:

        batch 2 / min_prompt_len 2 / max_prompt_len 64 / kept_len_max 23 / image_input 0 / pad_token_id 0
        eos_token_id ID...                                   (no ids: no end-of-sequence token)
        image NAME DTYPE NDIM SHAPE...                       (a package taking pixel_values or image_features)
        cache NAME DTYPE FILL NDIM SHAPE...                  (one per cache tensor, in input order)
        weight PROGRAM FQN RECORD OFFSET NDIM SHAPE... STRIDE...
    """
    lines = [f"{key} {int(metadata[key])}" for key in ("format", "batch", "min_prompt_len", "max_prompt_len",
                                                       "kept_len_max")]
    lines.append(f"image_input {int(metadata['image_input'] is not None)}")
    lines.append(f"pad_token_id {metadata['pad_token_id'] or 0}")
    lines.append(" ".join(["eos_token_id", *map(str, metadata["eos_token_id"] or [])]))
    if metadata["image_input"] is not None:
        shape = metadata["image_shape"]
        lines.append(" ".join(map(str, ["image", metadata["image_input"], metadata["image_dtype"], len(shape),
                                        *shape])))
    for spec in metadata["cache"]:
        lines.append(" ".join(map(str, ["cache", spec["name"], spec["dtype"], spec["fill"], len(spec["shape"]),
                                        *spec["shape"]])))
    for program, table in metadata["weights"].items():
        for fqn, (record, shape, stride, offset) in table.items():
            lines.append(" ".join(map(str, ["weight", program, fqn, record, offset, len(shape), *shape, *stride])))
    return "\n".join(lines) + "\n"
