"""`HAEConfig`: the one object that says how a model's KV cache is bounded and evicted.

It is frozen and validated at construction, so a bad value fails where it is written, with a message naming the
field and its allowed range, rather than deep inside a compiled graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hae_fx.errors import HAEConfigError

SCORE_SOURCES = ("layers_mean", "dap_layer")


@dataclass(frozen=True)
class HAEConfig:
    """How `hae_fx.transform` bounds and evicts a model's KV cache.

    Attributes:
        policy: name of the eviction policy (`hae_fx.policies.available()` lists them): `"hae"` (Dual-Attention
            Pruning at prefill, the DDES recycle bin at decode; docs/hae.md), `"full"` keeps every token and
            needs `capacity >= prompt + new tokens`, `"streaming"` keeps `sinks` first tokens plus the most recent
            ones (StreamingLLM).
        capacity: KV slots per sequence and layer. Fixed for the life of a cache: memory never depends on the
            prompt length or `max_new_tokens`. For `hae`, `capacity = budget + bin_size`.
        sinks: the first tokens of each sequence that are never evicted (attention sinks).
        window: the most recent tokens that are never evicted. Evicting policies need room for
            `sinks + window + 1` tokens (in `hae`'s budget), so that one token is always left to choose from.
        bin_size: `hae`: the recycle bin `d`. Evicted tokens wait there, still attended and able to come back,
            until `bin_size` of them are freed together. `1` frees every victim at once (greedy eviction).
        dap_layer: `hae`: the decoder layer (0-based) whose attention Dual-Attention Pruning reads.
        r: `hae`: DAP share threshold in [0, 1]; a visual token whose share of the text's attention to visual
            tokens is below `r` ...
        alpha: ... and whose largest attention from any text query is below `alpha` (in [0, 1]) is evicted.
        prune_hidden: `hae`: after `dap_layer`, also remove evicted tokens from the residual stream, so later
            layers compute on the kept tokens only (FastV-style). False keeps the computation and prunes the
            caches only.
        max_visual_keep: `hae`: optional cap on the visual tokens kept at prefill (the most attended win); it
            also bounds the static token count that `prune_hidden` computes on.
        score_source: `hae`: what decode adds to each token's score: attention averaged over every layer
            (`"layers_mean"`) or layer `dap_layer`'s only (`"dap_layer"`).
        visual_first: `hae`: strength of visual-first eviction (HTV): the lowest visual candidate is evicted
            first while it scores below `visual_first` times the mean text-candidate score; 0 turns it off.
        decay: `hae`: scores are multiplied by `1 - decay` before each decode step (the paper's exponential decay
            `λ`); 0 keeps plain cumulative attention.
    """

    policy: str = "hae"
    capacity: int = 256
    sinks: int = 4
    window: int = 16
    bin_size: int = 64
    dap_layer: int = 1
    r: float = 0.0015
    alpha: float = 0.0005
    prune_hidden: bool = False
    max_visual_keep: int | None = None
    score_source: str = "layers_mean"
    visual_first: float = 1.0
    decay: float = 0.0

    def __post_init__(self) -> None:
        from hae_fx.policies import get_policy  # the policy registry imports this module

        get_policy(self.policy)  # raises HAEConfigError naming the known policies
        _require_int("capacity", self.capacity, minimum=1)
        _require_int("sinks", self.sinks, minimum=0)
        _require_int("window", self.window, minimum=0)
        _require_int("bin_size", self.bin_size, minimum=1)
        _require_int("dap_layer", self.dap_layer, minimum=0)
        _require_fraction("r", self.r)
        _require_fraction("alpha", self.alpha)
        _require_fraction("decay", self.decay, below_one=True)
        if not isinstance(self.prune_hidden, bool):
            raise HAEConfigError(f"HAEConfig.prune_hidden must be True or False, got {self.prune_hidden!r}")
        if self.max_visual_keep is not None:
            _require_int("max_visual_keep", self.max_visual_keep, minimum=0)
        if self.score_source not in SCORE_SOURCES:
            raise HAEConfigError(f"HAEConfig.score_source must be one of {SCORE_SOURCES}, got {self.score_source!r}")
        if isinstance(self.visual_first, bool) or not isinstance(self.visual_first, (int, float)) \
                or self.visual_first < 0:
            raise HAEConfigError(f"HAEConfig.visual_first must be a number >= 0, got {self.visual_first!r}")
        get_policy(self.policy).validate(self)

    @property
    def budget(self) -> int:
        """Active tokens `hae` keeps per sequence: `capacity - bin_size`."""
        return self.capacity - self.bin_size

    def replace(self, **changes: object) -> HAEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise HAEConfigError(f"HAEConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise HAEConfigError(f"HAEConfig.{name} must be >= {minimum}, got {value}")


def _require_fraction(name: str, value: object, *, below_one: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HAEConfigError(f"HAEConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    upper_ok = value < 1 if below_one else value <= 1
    if not (value >= 0 and upper_ok):
        interval = "[0, 1)" if below_one else "[0, 1]"
        raise HAEConfigError(f"HAEConfig.{name} must lie in {interval}, got {value}")
