"""`composed`: one policy's prefill rule with another's decode rule (e.g. SnapKV's pooled votes to choose the
prompt tokens, then HAE's DDES recycle bin to evict while decoding).

The prefill half decides which layers' prompt attention is read, how many prompt tokens are kept, their priority
and initial score (and any hidden-state pruning or per-layer capacities); the decode half owns the per-slot state
from there on: its extra buffers, initialised by its `after_prefill` from the prefill half's ranking, the decode
score weights and the victim of every step. A decode half whose decode reads state only its own prefill computes
(`Policy.decode_needs_own_prefill`, e.g. AhaKV's row history and value prior) is refused, as is a half that is
itself composed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hae_fx.config import PolicyConfig
from hae_fx.errors import HAEConfigError
from hae_fx.policies import config_class, policy_for, register_policy, sweep_config
from hae_fx.policies.base import Policy, Prompt, SlotState


@dataclass(frozen=True)
class ComposedConfig(PolicyConfig):
    """Attributes:
        prefill, decode: each a policy config, or a policy name, built with this config's `capacity`, `sinks`,
            `window` and (where the policy has one) `bin_size`, its other fields at their defaults. Both halves must
            have this config's `capacity`.
        bin_size: the recycle bin of a half named by a policy that has one (default: the `hae` default).
    """

    policy = "composed"

    prefill: PolicyConfig | str = "snapkv"
    decode: PolicyConfig | str = "hae"
    bin_size: int = 64

    def __post_init__(self) -> None:
        for half in ("prefill", "decode"):
            value = getattr(self, half)
            if isinstance(value, str):
                value = sweep_config(value, capacity=self.capacity, sinks=self.sinks, window=self.window,
                                     bin_size=self.bin_size)
            elif isinstance(value, dict):  # read back from `key`
                fields = dict(value)
                value = config_class(fields.pop("policy"))(**fields)
            object.__setattr__(self, half, value)
        super().__post_init__()

    def validate(self) -> None:
        for half in ("prefill", "decode"):
            value = getattr(self, half)
            if not isinstance(value, PolicyConfig):
                raise HAEConfigError(f"ComposedConfig.{half} must be a policy config or a policy name, got {value!r}")
            if isinstance(value, ComposedConfig):
                raise HAEConfigError(f"ComposedConfig.{half} is itself composed; name one policy per half")
            if value.capacity != self.capacity:
                raise HAEConfigError(
                    f"ComposedConfig.{half} has capacity {value.capacity} but the composed config {self.capacity}; "
                    "both halves fill the same slots: give them the same capacity"
                )
        for half in ("prefill", "decode"):
            if policy_for(getattr(self, half)).head_axis:
                raise HAEConfigError(
                    f"ComposedConfig.{half}={getattr(self, half).policy!r} keeps an index set per KV head, which the "
                    "other half's one set for all heads cannot share; use it whole"
                )
        if policy_for(self.decode).decode_needs_own_prefill:
            raise HAEConfigError(
                f"ComposedConfig.decode={self.decode.policy!r} decodes from state its own prefill computes; use it "
                "whole (or as the prefill half)"
            )

    def key(self) -> str:
        halves = {half: json.loads(getattr(self, half).key()) for half in ("prefill", "decode")}
        common = {"capacity": self.capacity, "sinks": self.sinks, "window": self.window, "bin_size": self.bin_size}
        return json.dumps({"policy": self.policy, **common, **halves}, sort_keys=True)


@register_policy
class ComposedPolicy(Policy):
    config_class = ComposedConfig

    def __init__(self, config: ComposedConfig) -> None:
        super().__init__(config)
        self.prefill_half = policy_for(config.prefill)
        self.decode_half = policy_for(config.decode)
        self.evicts = self.prefill_half.evicts or self.decode_half.evicts
        self.merges_evicted = self.prefill_half.merges_evicted
        self.reads_values = self.prefill_half.reads_values or self.decode_half.reads_values

    # -- model and buffers: the decode half's state, the prefill half's layer layout -----------------------------
    def check_model(self, num_layers: int) -> None:
        self.prefill_half.check_model(num_layers)
        self.decode_half.check_model(num_layers)

    def layer_capacities(self, global_layers: Sequence[int]) -> list[int] | None:
        return self.prefill_half.layer_capacities(global_layers)

    def extra_buffers(self) -> dict[str, torch.dtype | tuple[torch.dtype, tuple[int, ...]]]:
        return self.decode_half.extra_buffers()

    @property
    def bin_size(self) -> int:
        return self.decode_half.bin_size

    def binned(self, state: SlotState) -> torch.Tensor:
        return self.decode_half.binned(state)

    # -- prefill: the prefill half ------------------------------------------------------------------------------
    def prefill_layers(self, global_layers: Sequence[int]) -> tuple[int, ...]:
        return self.prefill_half.prefill_layers(global_layers)

    def pruned_after(self) -> int | None:
        return self.prefill_half.pruned_after()

    def note_prompt(self, visual_tokens: list[int]) -> None:
        self.prefill_half.note_prompt(visual_tokens)

    def prefill_kept_len(self, prompt_len: int, real_tokens: list[int], visual_tokens: list[int]) -> int:
        return self.prefill_half.prefill_kept_len(prompt_len, real_tokens, visual_tokens)

    def prefill_score_scale(self, prompt: Prompt, head_dim: int) -> torch.Tensor | None:
        return self.prefill_half.prefill_score_scale(prompt, head_dim)

    def prefill_priority(self, prompt: Prompt, attention: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        priority, score, *_ = self.prefill_half.prefill_priority(prompt, attention)  # its own extras are not kept
        return priority, score

    def after_prefill(self, state: SlotState, rank: torch.Tensor, kept: torch.Tensor) -> None:
        self.decode_half.after_prefill(state, rank, kept)

    # -- decode: the decode half ----------------------------------------------------------------------------------
    def score_weights(self, layers: Sequence[int]) -> dict[int, float]:
        return self.decode_half.score_weights(layers)

    def decode_slot(self, state: SlotState) -> torch.Tensor:
        return self.decode_half.decode_slot(state)

    def decode_victim(self, state: SlotState) -> torch.Tensor:
        return self.decode_half.decode_victim(state)

    def after_decode_write(self, state: SlotState, slot: torch.Tensor, values: Sequence[torch.Tensor]) -> None:
        self.decode_half.after_decode_write(state, slot, values)
