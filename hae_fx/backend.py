"""The `hae` torch.compile backend: rewrite attention over `HAECache` slots, then hand the graph to Inductor.

Registered through the `torch_dynamo_backends` entry point, so `torch.compile(model, backend="hae")` works
after a plain `import torch`. This module must not register the name itself (the entry point does; a second
registration fails with "duplicate name").

Options (besides Inductor's own config keys):
    `"hae.compiler"`: `"inductor"` (default) or `"eager"`, which runs the rewritten graph with the ops'
    reference implementations: the eager-reference path that tests compare Inductor's output against.
    `"hae.fuse_projections"`: `True` (default) runs linears that read one input through one packed weight storage
    as one matmul (`hae_fx.passes.projections`; `hae_fx.transform` packs q/k/v and gate/up); `False` leaves them.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from hae_fx import ops  # noqa: F401  (registers the ops and their decompositions before any compile)
from hae_fx.cache import CacheRole
from hae_fx.errors import HAEError
from hae_fx.ops.refuse import graph_refusal
from hae_fx.passes import (
    PlanPlacement,
    RewriteReport,
    cache_roles_from_example_inputs,
    place_prefill_plan,
    rewrite_attention,
)
from hae_fx.passes.projections import FusedProjections, LayoutCheck, fuse_projections
from hae_fx.passes.sites import calls_op, example_value

#: the ops that write prompt or new-token keys into a layer's cache
CACHE_WRITES = (torch.ops.hae.slot_write_, torch.ops.hae.prefill_write_)

log = logging.getLogger("hae_fx")

COMPILER_OPTION = "hae.compiler"
COMPILERS = ("inductor", "eager")
FUSE_OPTION = "hae.fuse_projections"


@dataclass(frozen=True)
class GraphRecord:
    """What the hae backend saw and did to one graph: for `hae-fx inspect`, tests and debugging.

    Attributes:
        report: the sites rewritten (None when the graph read no HAECache).
        dap: where the prefill plan of a policy that reads attention (e.g. `hae`'s Dual-Attention Pruning) was
            placed (None for graphs without one).
        tokens_per_layer: decoder layer -> tokens whose keys the layer computes and writes to the cache (with
            hidden-state pruning, layers after the plan's layer compute on the kept tokens only).
        op_counts: call targets of the rewritten graph, by name, with their number of calls.
        code: the rewritten graph's Python code.
        fused_projections: the linears that now run as one matmul over packed weights.
    """

    report: RewriteReport | None
    op_counts: Counter
    code: str
    dap: PlanPlacement | None = None
    tokens_per_layer: dict[int, int] = field(default_factory=dict)
    fused_projections: tuple[FusedProjections, ...] = ()


def rewrite_graph(gm: fx.GraphModule, example_inputs: list[Any], fuse: bool = True) -> GraphRecord:
    """Apply the hae passes to `gm` in place and describe the result (`fuse`: also fuse packed projections)."""
    roles = cache_roles_from_example_inputs(gm.graph, example_inputs)
    report = dap = None
    fused: list[FusedProjections] = []
    if roles:
        dap = place_prefill_plan(gm, roles)
        report = rewrite_attention(gm, roles)
        if fuse:
            fused = fuse_projections(gm, example_inputs)
        log.debug("hae: %s%s; %d projection group(s) fused", report, f"; {dap}" if dap else "", len(fused))
    else:
        log.info("hae: this graph reads no HAECache, compiling it unchanged; use "
                 "hae_fx.transform(model, hae_fx.HAEConfig(...)) to generate with an evicting cache")
    op_counts = Counter(_target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    return GraphRecord(report=report, op_counts=op_counts, code=gm.code, dap=dap,
                       tokens_per_layer=_tokens_per_layer(gm.graph, roles), fused_projections=tuple(fused))


def _tokens_per_layer(graph: fx.Graph, roles: dict[fx.Node, CacheRole]) -> dict[int, int]:
    """Read off each cache write: its keys argument is `[B, Hkv, tokens, D]`."""
    tokens = {}
    for node in graph.nodes:
        if any(calls_op(node, op) for op in CACHE_WRITES):
            tokens[roles[node.args[0]].layer] = example_value(node.args[2]).shape[2]
    return dict(sorted(tokens.items()))


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


def hae_backend(gm: fx.GraphModule, example_inputs: list[Any], mode: str | None = None,
                options: dict[str, Any] | None = None,
                on_rewrite: Callable[[GraphRecord], None] | None = None) -> Callable[..., Any]:
    """Compile `gm`: rewrite its attention over HAECache slots into hae ops, then run Inductor.

    Args:
        gm: the Dynamo graph.
        example_inputs: its inputs (real tensors; cache tensors are recognised by identity tags).
        mode: torch.compile mode, mapped to Inductor options here since custom backends receive it raw.
        options: Inductor config patches, plus `"hae.compiler"` and `"hae.fuse_projections"` (see the module
            docstring).
        on_rewrite: called with the `GraphRecord` of the rewritten graph, before Inductor runs.
    """
    inductor_options = dict(options or {})
    compiler = inductor_options.pop(COMPILER_OPTION, "inductor")
    if compiler not in COMPILERS:
        raise ValueError(f"options[{COMPILER_OPTION!r}] must be one of {COMPILERS}, got {compiler!r}")
    fuse = inductor_options.pop(FUSE_OPTION, True)
    if not isinstance(fuse, bool):
        raise ValueError(f"options[{FUSE_OPTION!r}] must be True or False, got {fuse!r}")

    refusal = graph_refusal(gm.graph)  # an HAEError found while Dynamo traced (hae_fx.ops.refuse)
    if refusal is not None:
        return _raises(refusal)
    try:
        record = rewrite_graph(gm, example_inputs, fuse=fuse)
        if on_rewrite is not None:
            on_rewrite(record)
        if compiler == "eager":
            return _layout_checked(gm.forward, record.fused_projections, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(mode)) if mode and mode != "default" else {}
        patches.setdefault("post_grad_custom_pre_pass", _SourceKey())
        patches.update(inductor_options)
        return _layout_checked(compile_fx(gm, example_inputs, config_patches=patches), record.fused_projections,
                               example_inputs)
    except HAEError as error:  # the passes', or one raised while Inductor lowers an hae op
        return _raises(error)


def _layout_checked(compiled: Callable[..., Any], fused: tuple[FusedProjections, ...],
                    example_inputs: list[Any]) -> Callable[..., Any]:
    """`compiled`, checking on each call that the parameters its fused projections read are still packed (Dynamo
    does not guard on storage; see `hae_fx.passes.projections`)."""
    if not fused:
        return compiled
    layout = LayoutCheck(list(fused), example_inputs)

    def checked(*args: Any) -> Any:
        layout.check(args)
        return compiled(*args)

    return checked


def _raises(error: HAEError) -> Callable[..., Any]:
    """A compiled function that raises `error` when run.

    Dynamo wraps anything a backend raises in `BackendCompilerFailed`, and reports what traced code raises as
    `Unsupported`, whoever compiled (`hae_fx.transform` or the caller's own `torch.compile(backend="hae")`); raised
    from the compiled function instead, before the graph runs, the `HAEError` (a pass's, or a `hae::refuse` node's)
    reaches the caller as itself."""

    def refuse(*args: Any) -> Any:
        raise error

    return refuse


class _SourceKey(CustomGraphPass):
    """A no-op graph pass whose cache key is a hash of hae_fx's op and policy sources.

    Why: the hae ops reach Inductor as single calls and are decomposed during lowering, so Inductor's on-disk
    graph cache keys them by name only. Without this, code compiled by an older hae_fx (another eviction rule
    in `plan_prefill`, say) would be reused after an upgrade.
    """

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return _source_hash()


@functools.cache
def _source_hash() -> bytes:
    package = Path(__file__).parent
    return get_hash_for_files(tuple(str(p) for p in sorted(package.rglob("*.py"))))

