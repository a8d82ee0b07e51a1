"""Hidden-state pruning: after a policy's plan layer, the decoder computes on the kept tokens, FastV-style.

For a policy whose `pruned_after()` names a layer (`hae` with `prune_hidden`), `transform` wraps the forward of
every decoder layer after it. During an `HAECache` prefill the wrapper gathers the layer's per-token inputs through
the cache's `prefill_keep` (written by `hae::prefill_plan_`, which the plan pass places after that layer's
attention, so before these layers run):

- the residual stream (first pruned layer only; later ones receive it already gathered);
- RoPE's `(cos, sin)` and `position_ids`, so kept tokens keep their logical positions;
- the attention mask, restricted to the kept tokens (rows and columns of the model's own mask, so windows and
  bidirectional image blocks survive; causal by position when the model passes none).

Because the gather is ordinary traced code, Dynamo derives every later shape at the kept length: the graph of
each later layer really is smaller. Outside a prefill (decode, or a model called without an `HAECache`) the
wrapper passes its arguments through untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from hae_fx.cache import HAECache
from hae_fx.layer_kinds import CHUNKED, SLIDING, LayerKind


def install_hidden_pruning(layers: list[torch.nn.Module], after: int,
                           set_attribute: Callable[[object, str, object], None] = setattr) -> None:
    """Wrap the forward of `layers[after + 1:]` (the decoder layers, in order) on their instances, through
    `set_attribute` (`transform` records what it installs)."""
    for index in range(after + 1, len(layers)):
        layer = layers[index]
        set_attribute(layer, "forward", _pruning_forward(layer.forward, index, first=index == after + 1))


def _pruning_forward(forward: Callable[..., Any], layer_index: int, *, first: bool) -> Callable[..., Any]:
    @functools.wraps(forward)
    def pruned(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, HAECache) or cache.prefilled:
            return forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("hae_fx hidden-state pruning expects decoder layers to receive everything but the hidden "
                            "states as keyword arguments, as HF's decoders pass them")
        keep = cache.prefill_keep[:, : cache.traced_kept_len]
        if first:
            hidden_states = gather_tokens(hidden_states, keep)
        kept_pos = cache.slot_pos[:, : keep.shape[1]]
        return forward(hidden_states, **gather_layer_inputs(kwargs, keep, kept_pos, cache.layers[layer_index].kind))

    return pruned


def gather_tokens(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`tensor[b, keep[b, i]]` along dim 1 for a `[B or 1, T, ...]` tensor, broadcasting a batch of 1."""
    batch, kept = keep.shape
    tensor = tensor.expand(batch, *tensor.shape[1:])
    index = keep.view(batch, kept, *([1] * (tensor.dim() - 2))).expand(batch, kept, *tensor.shape[2:])
    return tensor.gather(1, index)


def gather_layer_inputs(kwargs: dict[str, Any], keep: torch.Tensor, kept_pos: torch.Tensor,
                        kind: LayerKind) -> dict[str, Any]:
    """The decoder-layer keyword arguments restricted to the kept tokens (`kept_pos`: their positions, -1 for
    padding) of a layer of attention kind `kind`."""
    kwargs = dict(kwargs)
    embeddings = kwargs.get("position_embeddings")
    if embeddings is not None:
        kwargs["position_embeddings"] = tuple(gather_tokens(part, keep) for part in embeddings)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = gather_tokens(kwargs["position_ids"], keep)
    kwargs["attention_mask"] = kept_token_mask(keep, kept_pos, kwargs.get("attention_mask"), kind)
    return kwargs


def kept_token_mask(keep: torch.Tensor, kept_pos: torch.Tensor, like: torch.Tensor | None,
                    kind: LayerKind) -> torch.Tensor:
    """`[B, 1, K, K]` mask over the kept tokens (`keep`: their prompt indices; `kept_pos`: their positions, -1 for
    padding).

    With the model's own prompt mask `like` (`[B or 1, 1, T, T]`), its rows and columns at the kept tokens: every
    pattern in it survives (padding, the layer's window or chunk, Gemma 3's bidirectional image blocks). Without
    one (SDPA's causal fast path), query `i` sees key `j` iff `j` is real, not after `i` and, for a windowed layer,
    inside `i`'s window or chunk. Either way a padding query sees itself, so no softmax row is empty.
    """
    batch, kept = keep.shape
    padding_self = (kept_pos < 0).view(batch, 1, kept, 1) & torch.eye(kept, dtype=torch.bool, device=keep.device)
    if like is not None:
        rows = like.expand(batch, like.shape[1], *like.shape[2:])
        heads, keys = rows.shape[1], rows.shape[3]
        rows = rows.gather(2, keep.view(batch, 1, kept, 1).expand(batch, heads, kept, keys))
        mask = rows.gather(3, keep.view(batch, 1, 1, kept).expand(batch, heads, kept, kept))
        if mask.dtype == torch.bool:
            return mask | padding_self
        return mask.masked_fill(padding_self, 0)
    real = kept_pos >= 0
    query_pos, key_pos = kept_pos.unsqueeze(2), kept_pos.unsqueeze(1)
    allowed = real.unsqueeze(1) & (key_pos <= query_pos)
    if kind.kind == SLIDING:
        allowed = allowed & (key_pos > query_pos - kind.span)
    elif kind.kind == CHUNKED:
        allowed = allowed & (key_pos // kind.span == query_pos // kind.span)
    return allowed.unsqueeze(1) | padding_self
