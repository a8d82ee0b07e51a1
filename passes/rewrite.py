"""Rewrite attention over `HAECache` slots into `hae::slot_attention`, and feed its per-slot attention into the
cache's running scores.

After the rewrite the only readers of a cache K/V buffer are hae ops (`slot_write_`, `slot_attention`). Any
other reader means an attention the passes did not recognise, which would attend over slots with the wrong
mask: that is an error, never a silent fallback. For a quantized cache the attention read the slots through
`hae::dequantize_slots`; the rewritten attention reads the 8-bit buffers and their per-slot scales (the layer's
`key_scales`/`value_scales` inputs), and a dequantize left with readers is the same error.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from hae_fx.cache import CacheRole
from hae_fx.config import PolicyConfig
from hae_fx.errors import HAESiteError
from hae_fx.passes.sites import AttentionSite, find_attention_sites, is_dequantize, scale_of
from hae_fx.policies import policy_for
from hae_fx.tensor_parallel import mean_over_ranks


def is_hae_op(target: object) -> bool:
    """Whether an FX call target is one of the `torch.ops.hae` ops (packet or overload)."""
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "hae"
    return isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("hae::")


@dataclass(frozen=True)
class RewriteReport:
    """What `rewrite_attention` did: sites rewritten per layer, in graph order, and their forms."""

    layers: tuple[int, ...]
    forms: tuple[str, ...]

    def __str__(self) -> str:
        if not self.layers:
            return "no attention over cache slots (prefill graph: cache writes only)"
        return f"{len(self.layers)} attention site(s) rewritten, layers {list(self.layers)}, forms {set(self.forms)}"


def rewrite_attention(gm: fx.GraphModule, roles: dict[fx.Node, CacheRole]) -> RewriteReport:
    """Replace every attention over cache slots in `gm` with `hae::slot_attention` (in place).

    Each site is masked by its layer's slot positions: its slot group's `slot_pos` for global layers (one group
    for every layer unless the policy gives layers capacities of their own), the layer's own `ring_pos` for
    sliding-window and chunked layers (`hae_fx.ring`).

    Scores: each global layer's site adds its per-slot attention, times the weight the cache's policy gives its
    layer (`Policy.score_weights`; by default one over the number of such sites in its slot group), to its group's
    `score` buffer, so `score` accumulates attention averaged over the group's global layers and heads, summed over
    steps. Windowed layers add
    nothing: their rings are not the slots the policy evicts from.

    Raises:
        HAESiteError: a cache K/V buffer is read by something that is neither a hae op nor a recognised
            attention, or a needed cache input (`slot_pos`, `score`) is missing from the graph.
    """
    graph = gm.graph
    sites = find_attention_sites(graph, roles)
    if sites:
        rings = {role.layer: node for node, role in roles.items() if role.kind == "ring_pos"}
        group_of = {role.layer: role.group for role in roles.values() if role.kind == "keys"}
        global_sites = [site for site in sites if site.layer not in rings]
        weights: dict[int, float] = {}
        for group in sorted({group_of.get(site.layer, 0) for site in global_sites}):
            members = [site for site in global_sites if group_of.get(site.layer, 0) == group]
            score = _placeholder(roles, "score", group)
            weights.update(_score_weights(members, roles[score].config))
        for site in sites:
            group = group_of.get(site.layer, 0)
            valid_pos = rings.get(site.layer) or _placeholder(roles, "slot_pos", group)
            score = _placeholder(roles, "score", group)
            _rewrite_site(graph, site, valid_pos, score, roles[score], weights.get(site.layer),
                          _slot_scales(roles, site.layer))
    _check_only_hae_ops_read_slots(graph, roles)
    graph.lint()
    gm.recompile()
    return RewriteReport(layers=tuple(s.layer for s in sites), forms=tuple(s.form for s in sites))


def _placeholder(roles: dict[fx.Node, CacheRole], kind: str, group: int = 0) -> fx.Node:
    for node, role in roles.items():
        if role.kind == kind and role.group == group:
            return node
    raise HAESiteError(
        f"the graph reads HAECache key/value slots but not its {kind!r} tensor; the cache's update() must run "
        "inside the compiled region (compile the whole language model, not only its attention)"
    )


def _slot_scales(roles: dict[fx.Node, CacheRole], layer: int) -> dict[str, fx.Node]:
    """The attention op's scale arguments for `layer`'s quantized slots (none for unquantized ones)."""
    found = {role.kind: node for node, role in roles.items()
             if role.layer == layer and role.kind in ("key_scales", "value_scales")}
    if not found:
        return {}
    if len(found) != 2:
        raise HAESiteError(f"layer {layer}: the graph reads only its {set(found)} of a quantized HAECache's slots")
    return {"k_scale": found["key_scales"], "v_scale": found["value_scales"]}


def _score_weights(sites: list[AttentionSite], config: PolicyConfig | None) -> dict[int, float]:
    """Weight of each layer's per-slot attention in the score update (layers left out add nothing)."""
    layers = [site.layer for site in sites]
    if config is None:
        return {layer: 1.0 / len(layers) for layer in layers}
    return policy_for(config).score_weights(layers)


def _rewrite_site(graph: fx.Graph, site: AttentionSite, valid_pos: fx.Node, score: fx.Node, score_role: CacheRole,
                  score_weight: float | None, slot_scales: dict[str, fx.Node]) -> None:
    args = (site.query, site.keys, site.values, valid_pos, scale_of(site))
    with graph.inserting_before(site.output):
        if score_weight is None:  # nothing reads this site's per-slot attention: the op that skips computing it
            out = graph.call_function(torch.ops.hae.slot_attention_no_weight.default, args, slot_scales)
        else:
            attention = graph.call_function(torch.ops.hae.slot_attention.default, args, slot_scales)
            out = graph.call_function(operator.getitem, (attention, 0))
            slot_weight = graph.call_function(operator.getitem, (attention, 1))
            slot_weight = _averaged_across_ranks(graph, slot_weight, score_role)
            graph.call_function(torch.ops.aten.add_.Tensor, (score, slot_weight), {"alpha": score_weight})
    out.meta.update(site.output.meta)
    site.output.replace_all_uses_with(out)
    leftover = _erase_unused(graph, site.owned)
    if leftover:
        raise HAESiteError(
            f"layer {site.layer}: {leftover[0].name}, part of the attention over cache slots, is still used after "
            "the rewrite (e.g. attention probabilities returned by output_attentions=True); hae_fx cannot return "
            "per-token attention over evicting slots: generate without output_attentions"
        )


def _averaged_across_ranks(graph: fx.Graph, slot_weight: fx.Node, score_role: CacheRole) -> fx.Node:
    """`slot_weight` (this rank's heads' mean per-slot attention) averaged across tensor-parallel ranks, so every
    rank adds the single-process score and evicts the same slot; unchanged in one process, or where the score is
    per KV head (`[B, Hkv, C]`: each head's rank decides alone)."""
    tp = score_role.tensor_parallel
    if tp is None or score_role.config is None or policy_for(score_role.config).head_axis:
        return slot_weight
    return graph.call_function(mean_over_ranks, (slot_weight, tp.group_name, tp.degree))


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> list[fx.Node]:
    """Erase the nodes of `nodes` left without users, repeatedly, since erasing one can free another.
    Returns the nodes still in use."""
    remaining = list(nodes)
    while True:
        unused = [node for node in remaining if not node.users]
        if not unused:
            return remaining
        for node in unused:
            graph.erase_node(node)
            remaining.remove(node)


def _check_only_hae_ops_read_slots(graph: fx.Graph, roles: dict[fx.Node, CacheRole]) -> None:
    for node, role in roles.items():
        if role.kind not in ("keys", "values"):
            continue
        readers = list(node.users)
        while readers:
            user = readers.pop()
            if user.op == "call_function" and is_dequantize(user):
                readers.extend(user.users)  # what reads the dequantized slots reads the slots
                continue
            if user.op == "call_function" and is_hae_op(user.target):
                continue
            raise HAESiteError(
                f"cache {role.kind} of layer {role.layer} are read by {user.format_node()}, which is not an "
                "attention hae_fx recognises. hae_fx rewrites scaled_dot_product_attention and HF's eager "
                "matmul-softmax-matmul attention over HAECache slots; load the model with "
                "attn_implementation='sdpa' (or 'eager')"
            )
