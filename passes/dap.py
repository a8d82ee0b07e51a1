"""Place `hae::dap_plan_`: wire layer `dap_layer`'s attention into the `hae` prefill decision, and defer the
cache writes that must wait for it.

`HAECache.update` emits the plan at layer `dap_layer` with the layer's keys but no query (a cache never sees
queries). This pass:

1. finds the attention (SDPA or HF's eager form) whose keys are the plan's keys and whose values are the ones
   that layer writes to the cache;
2. gives the plan that attention's query and softmax scale, and moves it right after the attention;
3. moves every cache write (`hae::prefill_write_`) of layers `<= dap_layer` after the plan: the decision comes
   from layer `dap_layer`'s attention, and all layers keep the one set it chooses (index broadcasting).

Nothing else may read the slot metadata the plan writes between the plan's old and new places; the pass checks
that rather than assume it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from hae_fx.cache import CacheRole
from hae_fx.errors import HAESiteError
from hae_fx.passes.sites import AttentionSite, calls_op, find_attention_sites, scale_of

_PLAN_WRITES = ("slot_pos", "score", "modality", "in_bin", "seen", "prefill_keep")


@dataclass(frozen=True)
class DAPPlacement:
    """What `place_dap_plan` did: the layer whose attention feeds the plan, its form, the deferred writes."""

    layer: int
    form: str
    deferred_layers: tuple[int, ...]

    def __str__(self) -> str:
        return (f"DAP plan after layer {self.layer}'s {self.form} attention; cache writes of layers "
                f"{list(self.deferred_layers)} deferred until the decision")


def place_dap_plan(gm: fx.GraphModule, roles: dict[fx.Node, CacheRole]) -> DAPPlacement | None:
    """Apply the pass to `gm` in place; None when the graph holds no `hae::dap_plan_` (not an `hae` prefill).

    Raises:
        HAESiteError: the plan's attention cannot be found, or something else reads the metadata it writes
            before its new place.
    """
    graph = gm.graph
    plans = [n for n in graph.nodes if calls_op(n, torch.ops.hae.dap_plan_)]
    if not plans:
        return None
    if len(plans) > 1:
        raise HAESiteError(f"{len(plans)} hae::dap_plan_ nodes in one graph; an HAECache plans its prefill once")
    plan = plans[0]
    writes = _prefill_writes(graph, roles)
    layer = _plan_layer(plan, writes)
    site = _plan_attention(graph, plan, writes[layer], layer)

    deferred = [node for write_layer, node in sorted(writes.items()) if write_layer <= layer]
    _check_no_early_readers(graph, plan, site, deferred, layer)
    plan.args = (site.query, *plan.args[1:10], scale_of(site), *plan.args[11:])
    site.output.append(plan)
    anchor = plan
    for node in deferred:
        anchor.append(node)
        anchor = node
    graph.lint()
    gm.recompile()
    deferred_layers = tuple(write_layer for write_layer in sorted(writes) if write_layer <= layer)
    return DAPPlacement(layer=layer, form=site.form, deferred_layers=deferred_layers)


def _prefill_writes(graph: fx.Graph, roles: dict[fx.Node, CacheRole]) -> dict[int, fx.Node]:
    writes: dict[int, fx.Node] = {}
    for node in graph.nodes:
        if calls_op(node, torch.ops.hae.prefill_write_):
            role = roles.get(node.args[0])
            if role is None or role.kind != "keys":
                raise HAESiteError(f"{node.format_node()} does not write an HAECache key buffer")
            writes[role.layer] = node
    return writes


def _plan_layer(plan: fx.Node, writes: dict[int, fx.Node]) -> int:
    key = plan.args[1]
    layers = [layer for layer, write in writes.items() if write.args[2] is key]
    if len(layers) != 1:
        raise HAESiteError(
            f"the keys of {plan.format_node()} are not the keys one layer writes to the cache; hae::dap_plan_ is "
            "emitted by HAECache.update and must see that layer's keys unchanged"
        )
    return layers[0]


def _plan_attention(graph: fx.Graph, plan: fx.Node, write: fx.Node, layer: int) -> AttentionSite:
    fresh = {plan.args[1]: CacheRole("keys", layer), write.args[3]: CacheRole("values", layer)}
    sites = [site for site in find_attention_sites(graph, fresh) if site.layer == layer]
    if len(sites) != 1:
        raise HAESiteError(
            f"Dual-Attention Pruning reads layer {layer}'s attention, but {len(sites)} attention(s) over that "
            "layer's prompt keys were found (expected one SDPA or eager matmul-softmax-matmul); load the model "
            "with attn_implementation='sdpa' or 'eager', or choose another HAEConfig.dap_layer"
        )
    return sites[0]


def _check_no_early_readers(graph: fx.Graph, plan: fx.Node, site: AttentionSite, deferred: list[fx.Node],
                            layer: int) -> None:
    """Nothing but the deferred writes may read the metadata the plan writes between the plan's place and the
    attention it moves after: such a reader would lose the plan's values by the move. (Readers before the plan,
    such as HF's `get_seq_length`, read the empty cache either way.)"""
    order = {node: index for index, node in enumerate(graph.nodes)}
    start, end = order[plan], order[site.output]
    for buffer, name in zip(plan.args[4:10], _PLAN_WRITES, strict=True):
        for user in buffer.users:
            if user not in deferred and start < order[user] <= end:
                raise HAESiteError(
                    f"{user.format_node()} reads the HAECache {name!r} between layer {layer}'s cache update and its "
                    "attention, where the DAP decision is not made yet; only the cache writes of layers up to "
                    "dap_layer may wait for it"
                )
