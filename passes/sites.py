"""Find the attention computations that read an `HAECache`'s key/value slots.

Two forms are recognised in Dynamo (torch-level) and export (aten-level) graphs:

- **SDPA**: one `scaled_dot_product_attention` node whose key and value come from cache buffers, possibly
  through HF's `repeat_kv` (index, expand, reshape) or layout ops.
- **Eager**: HF's `eager_attention_forward`: `matmul(q, k^T) * scale (+ mask) -> softmax -> (to, dropout)
  -> matmul(p, v)`.

"Come from" means: walking back from the attention operand through view/layout/dtype ops reaches the
placeholder of the cache buffer (for a quantized cache, `hae::dequantize_slots` of it: the rewritten attention
reads the quantized buffer and its scales instead). A site records what the rewrite needs and the nodes it may
delete.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from hae_fx.cache import CacheRole
from hae_fx.errors import HAESiteError

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# ops that only reshape, re-layout, select or re-type a tensor: walking through them keeps its identity
_PASS_THROUGH_METHODS = {"view", "reshape", "expand", "transpose", "permute", "contiguous", "to", "unsqueeze",
                         "float", "half", "bfloat16", "type_as", "clone", "__getitem__"}
_PASS_THROUGH_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze,
                           torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten.expand.default,
                           torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
                           torch.ops.aten.unsqueeze.default, torch.ops.aten.clone.default,
                           torch.ops.aten.contiguous.default, torch.ops.aten._to_copy.default,
                           torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default}
_MATMULS = {torch.matmul, operator.matmul, torch.ops.aten.matmul.default}
_SOFTMAXES = {torch.nn.functional.softmax, torch.softmax, torch.ops.aten.softmax.int,
              torch.ops.aten._softmax.default}
_SCALES = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar}
_DIVIDES = {operator.truediv, torch.div, torch.ops.aten.div.Tensor, torch.ops.aten.div.Scalar}
_ADDS = {operator.add, torch.add, torch.ops.aten.add.Tensor}
_AFTER_SOFTMAX = {torch.nn.functional.dropout, torch.ops.aten.dropout.default}
_TANHS = {torch.tanh, torch.ops.aten.tanh.default}


@dataclass
class AttentionSite:
    """One attention over cache slots, as found in a graph.

    Attributes:
        layer: decoder layer index (from the cache buffer's role).
        form: `"sdpa"` or `"eager"`.
        output: the node whose value the rewrite replaces (`[B, Hq, T, D]`).
        query: the query node (`[B, Hq, T, D]`).
        keys, values: the cache buffer placeholders (`[B, Hkv, C, D]`).
        scale: softmax scale; None means `1/sqrt(head_dim)`.
        mask: the mask the attention applies (SDPA's `attn_mask`, boolean or additive; the eager form's added
            mask), None when it has none (causal through `is_causal`, or no mask at all).
        owned: nodes only this site needs; the rewrite deletes those left without users.
    """

    layer: int
    form: str
    output: fx.Node
    query: fx.Node
    keys: fx.Node
    values: fx.Node
    scale: float | None
    owned: list[fx.Node] = field(default_factory=list)
    mask: fx.Node | None = None


def calls_op(node: fx.Node, packet: torch._ops.OpOverloadPacket) -> bool:
    """Whether `node` calls the op `packet`: Dynamo graphs record the packet, export graphs an overload of it."""
    if node.op != "call_function":
        return False
    target = node.target
    return target is packet or getattr(target, "overloadpacket", None) is packet


def is_pass_through(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _PASS_THROUGH_METHODS
    return node.op == "call_function" and (node.target in _PASS_THROUGH_FUNCTIONS or is_dequantize(node))


def is_dequantize(node: fx.Node) -> bool:
    """Whether `node` is `hae::dequantize_slots`: a quantized cache's slots as the model's attention reads them."""
    return calls_op(node, torch.ops.hae.dequantize_slots)


def trace_to_cache(node: object, roles: dict[fx.Node, CacheRole], kind: str,
                   path: list[fx.Node] | None = None) -> fx.Node | None:
    """The cache placeholder of `kind` that `node` is a view/layout/dtype change of, or None.

    Appends the intermediate nodes walked through to `path` when given.
    """
    while isinstance(node, fx.Node):
        role = roles.get(node)
        if role is not None:
            return node if role.kind == kind else None
        if not is_pass_through(node) or not node.args:
            return None
        if path is not None:
            path.append(node)
        node = node.args[0]
    return None


def find_attention_sites(graph: fx.Graph, roles: dict[fx.Node, CacheRole]) -> list[AttentionSite]:
    """Every SDPA or eager attention in `graph` whose keys and values are `HAECache` slots, in graph order."""
    sites = []
    for node in graph.nodes:
        site = None
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            site = _sdpa_site(node, roles)
        elif _is_call(node, _SOFTMAXES, "softmax"):
            site = _eager_site(node, roles)
        if site is not None:
            sites.append(site)
    return sites


def _is_call(node: fx.Node, functions: set, method: str | None = None) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return method is not None and node.op == "call_method" and node.target == method


def _sdpa_site(node: fx.Node, roles: dict[fx.Node, CacheRole]) -> AttentionSite | None:
    args = dict(zip(SDPA_ARG_NAMES, node.args, strict=False))
    args.update(node.kwargs)
    owned: list[fx.Node] = []
    keys = trace_to_cache(args["key"], roles, "keys", owned)
    values = trace_to_cache(args["value"], roles, "values", owned)
    if keys is None or values is None:
        return None
    return AttentionSite(layer=roles[keys].layer, form="sdpa", output=node, query=args["query"], keys=keys,
                         values=values, scale=args.get("scale"), owned=[node, *owned],
                         mask=args.get("attn_mask") if isinstance(args.get("attn_mask"), fx.Node) else None)


def _eager_site(softmax: fx.Node, roles: dict[fx.Node, CacheRole]) -> AttentionSite | None:
    """Match `matmul(q, k^T) [* s | / s] [+ mask] -> softmax -> [to] [dropout] -> matmul(p, v)`.

    Raises:
        HAESiteError: the logits over cache keys pass through `tanh` (attention logit softcapping, Gemma 2's
            `attn_logit_softcapping`), which `hae::slot_attention` does not compute.
    """
    owned = [softmax]
    scale = 1.0
    softcapped = False
    mask = None
    node = softmax.args[0]
    while isinstance(node, fx.Node) and not _is_call(node, _MATMULS, "matmul"):
        if _is_call(node, _TANHS, "tanh"):
            softcapped = True
            node = node.args[0]
        elif _is_call(node, _ADDS, "add"):
            owned.append(node)
            if isinstance(node.args[1], fx.Node):
                mask = node.args[1]
            node = node.args[0]
        elif _is_call(node, _SCALES, "mul") and isinstance(node.args[1], (int, float)):
            scale *= float(node.args[1])
            owned.append(node)
            node = node.args[0]
        elif _is_call(node, _DIVIDES, "div") and isinstance(node.args[1], (int, float)):
            scale /= float(node.args[1])
            owned.append(node)
            node = node.args[0]
        elif is_pass_through(node):
            owned.append(node)
            node = node.args[0]
        else:
            return None
    if not isinstance(node, fx.Node):
        return None
    scores_matmul = node
    query, key_t = scores_matmul.args[0], scores_matmul.args[1]
    owned.append(scores_matmul)
    keys = trace_to_cache(key_t, roles, "keys", owned)
    if keys is None:
        return None
    if softcapped:
        raise HAESiteError(
            f"layer {roles[keys].layer}: the attention logits over cache keys are soft-capped (tanh between QK^T and "
            "softmax, e.g. Gemma 2's attn_logit_softcapping); hae::slot_attention computes plain softmax attention, "
            "so hae_fx cannot run this model exactly. Models without logit softcapping (Gemma 3 and later) are "
            "supported"
        )

    node = softmax
    while True:
        users = list(node.users)
        matmul_users = [u for u in users if _is_call(u, _MATMULS, "matmul") and u.args[0] is node]
        if matmul_users:
            output = matmul_users[0]
            break
        followers = [u for u in users if is_pass_through(u) or _is_call(u, _AFTER_SOFTMAX)]
        if len(followers) != 1:
            return None
        node = followers[0]
        owned.append(node)
    values = trace_to_cache(output.args[1], roles, "values", owned)
    if values is None:
        return None
    return AttentionSite(layer=roles[keys].layer, form="eager", output=output, query=query, keys=keys,
                         values=values, scale=scale, owned=[output, *owned], mask=mask)


def scale_of(site: AttentionSite) -> float:
    """The site's softmax scale (`1/sqrt(head_dim)` when the model leaves it to the kernel)."""
    if site.scale is not None:
        return float(site.scale)
    return example_value(site.query).shape[-1] ** -0.5


def example_value(node: fx.Node) -> torch.Tensor:
    """The example tensor Dynamo (`example_value`) or export (`val`) recorded for `node`."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise HAESiteError(f"node {node.name} carries no shape metadata; run the passes on a Dynamo or export graph")
    return value
