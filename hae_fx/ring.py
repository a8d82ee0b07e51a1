"""Rings of slots for sliding-window and chunked layers: the token at position `p` lives in slot `p % ring`.

A sliding layer of window `W` attends, at position `p`, to positions `p - W + 1 .. p`; a chunked layer of chunk
`C` to `C * (p // C) .. p`. Either way the keys it can still use are among the last `span` positions, so a ring of
`span` slots holds everything it needs, and writing position `p` into slot `p % span` overwrites exactly the token
that has just left the window. `ring_pos [B, ring]` records the position each slot holds (-1: empty, or not in the
query's chunk), and `hae::slot_attention` masks by it as it masks the global layers by `slot_pos`.

A ring shorter than the span (when the cache's capacity is below it) keeps the most recent tokens.
All of it is static-shape tensor code, traced into the prefill and decode graphs.
"""

from __future__ import annotations

import torch

from hae_fx.layer_kinds import CHUNKED, LayerKind


def ring_prefill(ring_pos: torch.Tensor, token_pos: torch.Tensor, prompt_pos: torch.Tensor) -> torch.Tensor:
    """Fill `ring_pos` (in place) for a prompt and return, per ring slot, the index of the prompt token it takes.
    (A chunked layer's earlier chunks are emptied by `ring_decode_slot` before the first query reads the ring.)

    Args:
        ring_pos: `[B, R]` the layer's ring positions.
        token_pos: `[B, T]` positions of the tokens whose keys this layer computed, -1 for padding (the whole
            prompt, or the tokens a `prune_hidden` policy kept).
        prompt_pos: `[B, T0]` positions of the whole prompt; the next token's position is its max + 1.

    Returns:
        `[B, R]` int64 indices into `token_pos`'s token axis (0 for slots left empty), for `hae::prefill_write_`.
    """
    batch, ring = ring_pos.shape
    tokens = token_pos.shape[1]
    seen = (prompt_pos.amax(dim=-1, keepdim=True) + 1).clamp_min(0)  # [B, 1]
    slots = torch.arange(ring, device=ring_pos.device).expand(batch, ring)
    oldest = seen - ring
    wanted = oldest + (slots - oldest) % ring  # the position in the last `ring` ones that maps to each slot
    # the token index of each wanted position, through its offset from the oldest (padding and older tokens go to
    # a spare column; real positions are distinct)
    offset = token_pos - oldest
    column = torch.where((token_pos >= 0) & (offset >= 0) & (offset < ring), offset, ring)
    index_of = torch.zeros(batch, ring + 1, dtype=torch.int64, device=ring_pos.device)
    index_of.scatter_(1, column, torch.arange(tokens, device=ring_pos.device).expand(batch, tokens))
    index = index_of.gather(1, wanted - oldest)
    found = (wanted >= 0) & (token_pos.gather(1, index) == wanted)
    ring_pos.copy_(torch.where(found, wanted, -1))
    return torch.where(found, index, 0)


def ring_decode_slot(ring_pos: torch.Tensor, seen: torch.Tensor, kind: LayerKind) -> torch.Tensor:
    """The ring slot of the new token (position `seen - 1`: the cache has counted it), recorded in `ring_pos`;
    for a chunked layer, the slots of earlier chunks are emptied. Returns `[B]` int64 slots."""
    position = seen - 1
    ring = ring_pos.shape[1]
    slot = position % ring
    rows = torch.arange(ring_pos.shape[0], device=ring_pos.device)
    ring_pos.index_put_((rows, slot), position)
    if kind.kind == CHUNKED:
        chunk_start = (position // kind.span) * kind.span
        ring_pos.masked_fill_(ring_pos < chunk_start.unsqueeze(-1), -1)
    return slot
