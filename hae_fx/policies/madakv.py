"""`madakv`: MadaKV (Li et al. 2025, arXiv 2506.15724, ACL 2025): per-head modality budgets from proxy-token
attention (MPA) and layer-to-layer budget compensation (HCC). Rules as in research/algorithms.md §2.

Each KV head of each global layer keeps tokens of its own (`head_axis`: slot metadata `[B, Hkv, C]`, one slot group
per layer, `capacity` slots per head and layer). At prefill, layer `l` (0-based, of `L` global layers), head `h`:

- **Proxy attention.** `ψ(i)` = attention token `i` receives from the proxy tokens, the last `window` real prompt
  tokens, summed over them, averaged over the head's query heads. The proxy tokens and the first `sinks` tokens are
  kept (protected); the other real tokens are the candidates, visual `X_v` or text `X_t`.
- **MPA.** `w_v = Σ_{X_v} ψ`, `w_t = Σ_{X_t} ψ`; of the layer's per-head budget `n = ⌊φ^l⌋`, the head gives
  `⌊w_v/(w_v+w_t)·n⌋` to its visual candidates and the rest to its text ones, each keeping its highest `ψ` (ties:
  the lower position). A modality with fewer candidates than its share passes the surplus to the other (the paper
  is silent; this keeps the head's slots used).
- **HCC.** `k_v` = fewest visual candidates whose `ψ` sums to `θ·w_v` (`theta`), `k_t` likewise;
  `K^l = Σ_h (k_v + k_t − φ^l)` and `φ^{l+1} = φ^l − K^l / (Hkv · (L − 1 − l))` (φ is per head, so the sum over
  heads is divided by their number, one reading of the paper's ambiguous units), clamped to `[0, φ_max]`.
  `φ^0 = φ_max = capacity − sinks − window`, the most the slots hold beside the protected tokens. Buffers exist
  before any prompt, so no layer can take more than its slots: HCC lowers the budgets of the layers after one that
  needs more than its share, and an easier layer's savings raise later budgets only back up to `φ_max`. A layer
  below `φ_max` leaves slots free, which decode fills before it evicts. The running budget is a per-sequence cache
  buffer (`Policy.cache_buffers`), handed from each layer's prefill plan to the next.

Kept tokens start with score `ψ`. Decode (the paper compresses at prefill only; a fixed capacity must evict): every
step adds each head's attention to its slots' scores, and a head with no free slot replaces its unprotected token of
lowest score (ties: the lower position); the new token is text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig, require_bool, require_fraction, require_int, require_room_beyond_protected
from hae_fx.errors import HAEConfigError
from hae_fx.modality import VISUAL
from hae_fx.policies import register_policy
from hae_fx.policies.base import MUST_KEEP, NEVER_KEEP, Prompt, ScoredPolicy, layers_mean, prefill_protected


@dataclass(frozen=True)
class MadaKVConfig(PolicyConfig):
    """Attributes: `capacity` is the slots of every KV head in every global layer; `window` (>= 1) the proxy tokens
    `|𝒫|` (kept); `theta` in (0, 1] the share of a modality's proxy attention its sparsity `k` covers (HCC);
    `compensate` turns HCC on (the paper) or off (every layer at `φ_max`: the ablation, and the better choice
    where attention is diffuse, docs/policies.md)."""

    policy = "madakv"

    window: int = 32
    theta: float = 0.9
    compensate: bool = True

    def validate(self) -> None:
        require_int(self, "window", minimum=1)
        require_bool(self, "compensate")
        require_fraction(self, "theta")
        if self.theta == 0:
            raise HAEConfigError("MadaKVConfig.theta must lie in (0, 1] (a share of attention to cover), got 0")
        require_room_beyond_protected(self, self.capacity, "capacity")


@register_policy
class MadaKVPolicy(ScoredPolicy):
    config_class = MadaKVConfig
    head_axis = True
    decode_needs_own_prefill = True  # per-head scores only its prefill writes

    def layer_capacities(self, global_layers: Sequence[int]) -> list[int]:
        return [self.config.capacity] * len(global_layers)

    def cache_buffers(self) -> dict[str, torch.dtype]:
        return {"budget_cut": torch.float32}  # φ_max − φ^l of the next layer to plan

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        config, budget_cut = self.config, prompt.cache_buffers["budget_cut"]
        attention = layers_mean(attention)  # [B, Hkv, T, T]: a cache's slot group has one layer
        kv_heads = attention.shape[1]
        proxy = prompt.valid & (prompt.token_pos >= prompt.seen - config.window)  # [B, T]
        psi = (attention * proxy.view(proxy.shape[0], 1, -1, 1)).sum(dim=2)  # [B, Hkv, T]
        protected = prefill_protected(config, prompt).unsqueeze(1)  # [B, 1, T]
        candidates = (prompt.valid.unsqueeze(1) & ~protected).expand_as(psi)
        visual = candidates & (prompt.modality == VISUAL).unsqueeze(1)
        text = candidates & ~visual
        w_v, w_t = (torch.where(mask, psi, 0.0).sum(dim=-1) for mask in (visual, text))  # [B, Hkv]

        most = float(config.capacity - config.sinks - config.window)
        phi = most - budget_cut  # [B] this layer's per-head budget
        budget = phi.floor().unsqueeze(-1)  # [B, 1]
        total = w_v + w_t
        share = torch.where(total > 0, w_v / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        n_v, n_t = visual.sum(dim=-1), text.sum(dim=-1)
        phi_v = (share * budget).floor().clamp(min=budget - n_t, max=n_v)
        phi_t = (budget - phi_v).clamp(max=n_t)
        kept = visual & within_top(psi, visual, phi_v) | text & within_top(psi, text, phi_t)

        if config.compensate and prompt.group + 1 < prompt.groups:
            sparsity = coverage(psi, visual, config.theta) + coverage(psi, text, config.theta)  # [B, Hkv]
            deficit = (sparsity - phi.unsqueeze(-1)).sum(dim=-1)  # K^l
            later = kv_heads * (prompt.groups - 1 - prompt.group)
            next_phi = (phi - deficit / later).clamp(0.0, most)
            budget_cut.copy_(most - next_phi)

        priority = torch.where(protected, MUST_KEEP, torch.where(kept, psi, NEVER_KEEP))
        return torch.where(prompt.valid.unsqueeze(1), priority, NEVER_KEEP), psi


def within_top(key: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`[B, H, T]`: the `count[b, h]` candidates of highest `key` in each row (ties: the lower index)."""
    order = torch.where(candidates, key, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    rank = order.argsort(dim=-1)
    return candidates & (rank < count.unsqueeze(-1))


def coverage(key: torch.Tensor, candidates: torch.Tensor, theta: float) -> torch.Tensor:
    """`[B, H]`: the fewest candidates whose `key` (>= 0) sums to `theta` of all candidates' sum."""
    values = torch.where(candidates, key, 0.0).sort(dim=-1, descending=True).values
    running = values.cumsum(dim=-1)
    before = running - values  # what the larger candidates already cover
    return (candidates.any(dim=-1, keepdim=True) & (before < theta * running[..., -1:])).sum(dim=-1)
