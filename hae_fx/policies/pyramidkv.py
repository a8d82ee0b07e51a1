"""`pyramidkv`: PyramidKV (Cai et al. 2024, arXiv 2406.02069): SnapKV's pooled observation-window votes, with
per-layer budgets that shrink linearly from the first layer to the last (attention funnels as depth grows).

Budgets (KVCache-Factory's `PyramidKVCluster`): with `capacity` the average budget `C`, `window` the observation
window `w` and `beta` `β`, `min = (C - w) // β`, `max = 2(C - w) - min`, `step = (max - min) // (L - 1)` over the
`L` global layers, and layer `l` keeps `max - l·step + w` slots (at least `sinks + w + 1`, so every layer has a
token to choose). The total is SnapKV's at `C`. KVCache-Factory clips `max` to the prompt length; here buffers are
allocated before any prompt, so the pyramid depends on `capacity` alone.

Each layer's K/V buffers are sized to its own budget and it keeps an index set of its own: at prefill, the top of
its own layer's pooled votes (averaged over query heads: one set per layer, where the paper keeps one per head);
at decode, with a full cache, it drops its unprotected token with the lowest vote plus the attention its layer has
given it since (SnapKV does not evict after prefill; a fixed capacity must).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hae_fx.config import require_int
from hae_fx.policies import register_policy
from hae_fx.policies.snapkv import SnapKVConfig, SnapKVPolicy


@dataclass(frozen=True)
class PyramidKVConfig(SnapKVConfig):
    """SnapKV's fields, `capacity` being the average budget per layer; `beta` (>= 1) sets how steep the pyramid is:
    the last layer keeps about `(capacity - window) / beta` beyond the window."""

    policy = "pyramidkv"

    beta: int = 20

    def validate(self) -> None:
        super().validate()
        require_int(self, "beta", minimum=1)


@register_policy
class PyramidKVPolicy(SnapKVPolicy):
    config_class = PyramidKVConfig

    def layer_capacities(self, global_layers: Sequence[int]) -> list[int]:
        return pyramid(self.config, len(global_layers))


def pyramid(config: PyramidKVConfig, layers: int) -> list[int]:
    """Each of `layers` layers' slots, first to last."""
    beyond_window = config.capacity - config.window
    smallest = beyond_window // config.beta
    largest = 2 * beyond_window - smallest
    step = (largest - smallest) // (layers - 1) if layers > 1 else 0
    floor = config.sinks + config.window + 1
    top = beyond_window if layers == 1 else largest
    return [max(top - layer * step + config.window, floor) for layer in range(layers)]
