"""`hae::dap_plan_`: the `hae` policy's prefill decision (Dual-Attention Pruning), as one graph node.

`HAECache` emits it at layer `dap_layer` without a query: the cache's `update` sees keys, never queries. The
backend's DAP pass (`hae_fx.passes.dap`) finds that layer's attention, wires its query and scale in, and moves
the node after it, together with the cache writes of the layers up to `dap_layer`, which must wait for the keep
set. One node makes that move a single, checkable graph edit.
"""

from __future__ import annotations

import torch

from hae_fx.errors import HAESiteError
from hae_fx.policies.base import SlotState
from hae_fx.policies.hae import plan_prefill

#: `max_visual_keep` value meaning "no cap" (custom ops take no Optional[int] defaults through Inductor)
NO_VISUAL_CAP = -1


@torch.library.custom_op("hae::dap_plan_",
                         mutates_args=("slot_pos", "score", "modality", "in_bin", "seen", "prefill_keep"))
def dap_plan_(query: torch.Tensor | None, key: torch.Tensor, token_pos: torch.Tensor, token_modality: torch.Tensor,
              slot_pos: torch.Tensor, score: torch.Tensor, modality: torch.Tensor, in_bin: torch.Tensor,
              seen: torch.Tensor, prefill_keep: torch.Tensor, scale: float, kept_len: int, sinks: int, window: int,
              budget: int, r: float, alpha: float, max_visual_keep: int) -> None:
    """Decide the prompt's keep set from `query`/`key` (`[B, Hq, T, D]`/`[B, Hkv, T, D]`, after RoPE) and write
    it to the slot metadata and `prefill_keep` (see `hae_fx.policies.hae.plan_prefill`)."""
    run_dap_plan(query, key, token_pos, token_modality, slot_pos, score, modality, in_bin, seen, prefill_keep, scale,
                 kept_len, sinks, window, budget, r, alpha, max_visual_keep)


def run_dap_plan(query, key, token_pos, token_modality, slot_pos, score, modality, in_bin, seen, prefill_keep, scale,
                 kept_len, sinks, window, budget, r, alpha, max_visual_keep) -> None:
    """The op's reference implementation, shared with its Inductor decomposition."""
    if query is None:
        raise HAESiteError(
            "hae::dap_plan_ has no query: the hae backend's DAP pass supplies layer dap_layer's attention query. "
            "Run the model through hae_fx.transform (or torch.compile(backend='hae')), not eagerly"
        )
    state = SlotState(slot_pos=slot_pos, score=score, modality=modality, in_bin=in_bin, seen=seen)
    plan_prefill(query, key, token_pos, token_modality, state, prefill_keep, scale=scale, kept_len=kept_len,
                 sinks=sinks, window=window, budget=budget, r=r, alpha=alpha,
                 max_visual_keep=None if max_visual_keep == NO_VISUAL_CAP else max_visual_keep)


@dap_plan_.register_fake
def _(query, key, token_pos, token_modality, slot_pos, score, modality, in_bin, seen, prefill_keep, scale, kept_len,
      sinks, window, budget, r, alpha, max_visual_keep) -> None:
    return None
