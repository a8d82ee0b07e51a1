"""FX passes that turn attention over an `HAECache` into hae ops.

`cache_inputs` tells which graph inputs are cache tensors, `sites` finds the attention that reads them (SDPA,
or HF's eager matmul-softmax-matmul), `rewrite` replaces each site with `hae::slot_attention` and wires the
per-slot attention into the cache's scores, `plan` places a policy's prefill decision after the attention it
reads and defers the cache writes that wait for it, `projections` runs linears over packed weights (q/k/v,
gate/up) as one matmul. Each pass is a plain function over a `torch.fx.Graph`.
"""

from hae_fx.passes.cache_inputs import cache_roles_from_example_inputs, cache_roles_from_export
from hae_fx.passes.plan import PlanPlacement, place_prefill_plan
from hae_fx.passes.projections import FusedProjections, fuse_projections
from hae_fx.passes.rewrite import RewriteReport, rewrite_attention
from hae_fx.passes.sites import AttentionSite, find_attention_sites

__all__ = [
    "AttentionSite",
    "RewriteReport",
    "cache_roles_from_example_inputs",
    "cache_roles_from_export",
    "PlanPlacement",
    "find_attention_sites",
    "FusedProjections",
    "fuse_projections",
    "place_prefill_plan",
    "rewrite_attention",
]
