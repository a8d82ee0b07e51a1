"""Place `hae::prefill_plan_`: wire the attention of the layers a policy reads into its prefill decision, and
defer the cache writes that must wait for it.

`HAECache.update` emits the plan at the last layer the policy reads (`Policy.prefill_layers`), with those layers'
keys but no queries (a cache never sees queries). This pass:

1. finds, for each of those layers, the attention (SDPA or HF's eager form) whose keys are the plan's keys for
   that layer and whose values are the ones that layer writes to the cache;
2. gives the plan those attentions' queries and softmax scales, and moves it right after the last of them;
3. moves every cache write (`hae::prefill_write_`) of layers up to that one after the plan: the decision comes
   from their attention, and all layers keep the one set it chooses (index broadcasting).

Nothing else may read the slot metadata the plan writes between the plan's old and new places; the pass checks
that rather than assume it. The plan's arguments are bound by name through the op's schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from hae_fx.errors import HAESiteError
from hae_fx.passes.sites import AttentionSite, calls_op, find_attention_sites, scale_of
from hae_fx.slots import PLAN_WRITES, CacheRole


@dataclass(frozen=True)
class PlanPlacement:
    """What `place_prefill_plan` did: the layers whose attention feeds the plan (`layer`, the last, is where it
    now runs), that attention's form, and the deferred cache writes."""

    layers: tuple[int, ...]
    form: str
    deferred_layers: tuple[int, ...]

    @property
    def layer(self) -> int:
        return self.layers[-1]

    def __str__(self) -> str:
        return (f"prefill plan after layer {self.layer}'s {self.form} attention (reading layers {list(self.layers)}); "
                f"cache writes of layers {list(self.deferred_layers)} deferred until the decision")


def bound_arguments(node: fx.Node) -> dict[str, object]:
    """`node`'s arguments by parameter name (Dynamo graphs keep keywords, export graphs positions)."""
    schema = torch.ops.hae.prefill_plan_.default._schema
    names = [argument.name for argument in schema.arguments]
    return {**dict(zip(names, node.args, strict=False)), **node.kwargs}


def place_prefill_plan(gm: fx.GraphModule, roles: dict[fx.Node, CacheRole]) -> PlanPlacement | None:
    """Apply the pass to `gm` in place; None when the graph holds no plan that reads attention.

    Raises:
        HAESiteError: an attention the plan reads cannot be found, or something else reads the metadata it writes
            before its new place.
    """
    graph = gm.graph
    plans = [n for n in graph.nodes if calls_op(n, torch.ops.hae.prefill_plan_)]
    groups = [roles[bound_arguments(plan)["slot_pos"]].group for plan in plans]
    if len(set(groups)) != len(groups):
        raise HAESiteError(f"{len(plans)} hae::prefill_plan_ nodes for slot groups {groups} in one graph; an "
                           "HAECache plans each slot group's prefill once")
    placements = [placement for plan, group in zip(plans, groups, strict=True)
                  if (placement := _place_one_plan(gm.graph, plan, group, roles)) is not None]
    if not placements:
        return None
    graph.lint()
    gm.recompile()
    return PlanPlacement(layers=tuple(sorted({layer for p in placements for layer in p.layers})),
                         form=placements[-1].form,
                         deferred_layers=tuple(sorted({layer for p in placements for layer in p.deferred_layers})))


def _place_one_plan(graph: fx.Graph, plan: fx.Node, group: int, roles: dict[fx.Node, CacheRole]
                    ) -> PlanPlacement | None:
    """Place the plan of one slot group; the cache writes it defers are those of the group's layers (every layer's,
    for a cache with one group) up to the last layer it reads."""
    arguments = bound_arguments(plan)
    keys = list(arguments["keys"])
    if not keys:
        return None
    writes = _prefill_writes(graph, roles)
    layers = [_key_layer(plan, key, writes) for key in keys]
    sites = [_plan_attention(graph, key, writes[layer], layer) for key, layer in zip(keys, layers, strict=True)]
    last = sites[-1]

    deferred_layers = tuple(write_layer for write_layer in sorted(writes) if write_layer <= last.layer
                            and roles[writes[write_layer].args[0]].group == group)
    deferred = [writes[write_layer] for write_layer in deferred_layers]
    _check_no_early_readers(graph, plan, arguments, last, deferred)
    arguments.update(queries=[site.query for site in sites], scales=[scale_of(site) for site in sites],
                     masks=[site.mask for site in sites])
    plan.args, plan.kwargs = (), arguments
    last.output.append(plan)
    anchor = plan
    for node in deferred:
        anchor.append(node)
        anchor = node
    return PlanPlacement(layers=tuple(layers), form=last.form, deferred_layers=deferred_layers)


def _prefill_writes(graph: fx.Graph, roles: dict[fx.Node, CacheRole]) -> dict[int, fx.Node]:
    writes: dict[int, fx.Node] = {}
    for node in graph.nodes:
        if calls_op(node, torch.ops.hae.prefill_write_) or calls_op(node, torch.ops.hae.prefill_merge_write_):
            role = roles.get(node.args[0])
            if role is None or role.kind != "keys":
                raise HAESiteError(f"{node.format_node()} does not write an HAECache key buffer")
            writes[role.layer] = node
    return writes


def _key_layer(plan: fx.Node, key: fx.Node, writes: dict[int, fx.Node]) -> int:
    layers = [layer for layer, write in writes.items() if write.args[2] is key]
    if len(layers) != 1:
        raise HAESiteError(
            f"a key of {plan.format_node()} is not the keys one layer writes to the cache; hae::prefill_plan_ is "
            "emitted by HAECache.update and must see those layers' keys unchanged"
        )
    return layers[0]


def _plan_attention(graph: fx.Graph, key: fx.Node, write: fx.Node, layer: int) -> AttentionSite:
    fresh = {key: CacheRole("keys", layer), write.args[3]: CacheRole("values", layer)}
    sites = [site for site in find_attention_sites(graph, fresh) if site.layer == layer]
    if len(sites) != 1:
        raise HAESiteError(
            f"the prefill plan reads layer {layer}'s attention, but {len(sites)} attention(s) over that layer's "
            "prompt keys were found (expected one SDPA or eager matmul-softmax-matmul); load the model with "
            "attn_implementation='sdpa' or 'eager', or configure the policy to read another layer"
        )
    return sites[0]


def _check_no_early_readers(graph: fx.Graph, plan: fx.Node, arguments: dict[str, object], site: AttentionSite,
                            deferred: list[fx.Node]) -> None:
    """Nothing but the deferred writes may read the metadata the plan writes between the plan's place and the
    attention it moves after: such a reader would lose the plan's values by the move. (Readers before the plan,
    such as HF's `get_seq_length`, read the empty cache either way.)"""
    order = {node: index for index, node in enumerate(graph.nodes)}
    start, end = order[plan], order[site.output]
    written = [(name, arguments[name]) for name in PLAN_WRITES]
    written += [("extras", buffer) for buffer in arguments["extras"]]
    for name, buffer in written:
        for user in buffer.users:
            if user not in deferred and start < order[user] <= end:
                raise HAESiteError(
                    f"{user.format_node()} reads the HAECache {name!r} between layer {site.layer}'s cache update and "
                    "its attention, where the prefill decision is not made yet; only the cache writes of layers up "
                    "to the plan's layer may wait for it"
                )
