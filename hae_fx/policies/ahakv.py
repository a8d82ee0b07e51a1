"""`ahakv`: AhaKV (Gu et al. 2025, arXiv 2506.03762): scores free of the positional bias of accumulated attention.

Accumulated attention favours early tokens (each token's sum has as many terms as queries after it). AhaKV's three
parts, as here:

- **Recent accumulation.** A token's attention score sums only the last `window` query rows (AhaKV's recent budget
  `r`, 32 in the paper), so every token's score has the same number of terms. The last `window` tokens are kept,
  as the paper keeps its `r` recent ones. At decode, a per-slot history of the last `window` rows (`history`,
  `[B, C, window]`, row of query `q` in column `q % window`) keeps the sum exact as rows age out.
- **Step-gain softmax.** Scores use softmax with the temperature `λ = √(2·log(i/k)/d)` in place of `1/√d`
  (`i`: keys the query row attends over, `k`: `capacity`, `d`: head dim), which sets each row's expected entropy to
  that of a uniform distribution over `k` slots; rows with `i <= k` keep `1/√d`. Only scores use it; the model
  attends as it always does. A decode step attends over at most `capacity` slots, so its rows are plain softmax.
- **Value prior.** Each score is multiplied by `γ_j`: the squared value norm `‖V_j‖²` (averaged over KV heads and
  global layers), average-pooled along prompt positions (`prior_kernel`, zero padding; the paper gives no kernel).
  A decode token's prior is its own norm (its later neighbours do not exist yet). The paper's division by
  `max γ` scales every score of a step alike, so it cannot change a ranking and is left out.

Prefill keeps the protected tokens and the highest `γ·S` up to `capacity`; each decode step with a full cache drops
the unprotected token with the lowest `γ·S`. The paper scores per head; one index set serves every head and layer
here (scores averaged over them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig, require_int, require_room_beyond_protected
from hae_fx.errors import HAEConfigError
from hae_fx.policies import register_policy
from hae_fx.policies.base import (
    Prompt,
    ScoredPolicy,
    SlotState,
    evictable_slots,
    last_query_row,
    layers_mean,
    lowest,
    protected_priority,
)


@dataclass(frozen=True)
class AhaKVConfig(PolicyConfig):
    """Attributes: `window` (>= 1) is AhaKV's recent budget `r`: the query rows a score sums and the recent tokens
    kept; `prior_kernel` (odd, >= 1) pools the value prior along positions."""

    policy = "ahakv"

    window: int = 32
    prior_kernel: int = 5

    def validate(self) -> None:
        require_int(self, "window", minimum=1)
        require_int(self, "prior_kernel", minimum=1)
        if self.prior_kernel % 2 == 0:
            raise HAEConfigError(f"AhaKVConfig.prior_kernel must be odd (a token's prior is centred on it), got "
                                 f"{self.prior_kernel}")
        require_room_beyond_protected(self, self.capacity, "capacity")


@register_policy
class AhaKVPolicy(ScoredPolicy):
    config_class = AhaKVConfig
    decode_needs_own_prefill = True  # the row history and value prior its prefill writes
    reads_values = True  # the value prior, from value norms averaged over KV heads

    def extra_buffers(self) -> dict[str, torch.dtype | tuple[torch.dtype, tuple[int, ...]]]:
        return {"history": (torch.float32, (self.config.window,)), "prior": torch.float32}

    def prefill_score_scale(self, prompt: Prompt, head_dim: int) -> torch.Tensor:
        keys = (prompt.token_pos + 1).clamp_min(1).to(torch.float32)  # a causal row attends over its position + 1
        gain = torch.sqrt(2 * torch.log(keys / self.config.capacity).clamp_min(0) / head_dim)
        return torch.where(keys > self.config.capacity, gain, 1 / math.sqrt(head_dim))

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        window, valid, token_pos = self.config.window, prompt.valid, prompt.token_pos
        attention = layers_mean(attention)  # [B, query, key]
        last = prompt.seen - 1  # [B, 1]
        # rows of the window but the last go to the history (column q % window); the last row is the score, which
        # the first decode step moves there like every later row
        older = valid & (token_pos >= last - window + 1) & (token_pos < last)
        columns = torch.arange(window, device=token_pos.device)
        row_to_column = (older.unsqueeze(-1) & (token_pos.remainder(window).unsqueeze(-1) == columns)).float()
        history = torch.einsum("bqk,bqc->bkc", attention, row_to_column)
        score = last_query_row(prompt, attention)
        prior = pooled_prior(value_norms(prompt.values, valid), self.config.prior_kernel)
        ranked = prior * (history.sum(dim=-1) + score)
        return protected_priority(self.config, prompt, ranked), score, {"history": history, "prior": prior}

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        history = state.extras["history"]
        column = (state.seen - 1).remainder(self.config.window)  # the previous step's query row
        latest = column.view(-1, 1, 1) == torch.arange(self.config.window, device=history.device)
        history.copy_(torch.where(latest, state.score.unsqueeze(-1), history))
        state.score.zero_()
        return super().decode_slot(state)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        ranked = state.extras["prior"] * state.extras["history"].sum(dim=-1)
        return lowest(evictable_slots(self.config, state), ranked, state.slot_pos)

    def after_decode_write(self, state: SlotState, slot: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        norms = value_norms(values, torch.ones(slot.shape[0], 1, dtype=torch.bool, device=slot.device))
        rows = torch.arange(slot.shape[0], device=slot.device)
        state.extras["prior"].index_put_((rows, slot), norms.squeeze(-1))


def value_norms(values: Sequence[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """`[B, T]` squared value norms averaged over KV heads and layers (`values`: `[B, Hkv, T, D]` per layer); 0 where
    not `valid`."""
    norms = torch.stack([v.to(torch.float32).pow(2).sum(dim=-1).mean(dim=1) for v in values]).mean(dim=0)
    return torch.where(valid, norms, 0.0)


def pooled_prior(norms: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """`[B, T]` norms average-pooled along positions (stride 1, zero padding `kernel_size // 2`, as AvgPool1d)."""
    padded = torch.nn.functional.pad(norms, (kernel_size // 2, kernel_size // 2))
    return padded.unfold(-1, kernel_size, 1).mean(dim=-1)
