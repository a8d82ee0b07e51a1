"""hae's custom ops: `torch.ops.hae.slot_write_`, `prefill_write_` (and `prefill_merge_write_`), `slot_attention`,
`slot_attention_no_weight`, `prefill_plan_`, `dequantize_slots` (quantized caches) and `refuse` (an `HAEError`
found while tracing, `hae_fx.ops.refuse`), plus `slot_attention_fused`, the Triton kernel the two attention ops
run on CUDA (registered only where the `triton` package is installed; without it they keep the reference).

Each op but `refuse` (which raises wherever it runs) has a reference implementation (what runs eagerly and in the
eager-reference path; on CUDA the two attention ops run the kernel instead), a fake implementation whose strides
match the reference (so Inductor's generated code asserts the right layout), and an Inductor decomposition
registered at import. The decomposition lets Inductor fuse the op with its neighbours and lets AOTInductor packages
run without these Python definitions.

Importing this package registers everything; it must happen before the first compile in a process, because
Inductor caches its decomposition table (`hae_fx` imports it at import time).
"""

from torch.utils._triton import has_triton_package

from hae_fx.ops.decompositions import register_inductor_decompositions
from hae_fx.ops.dequantize_slots import dequantize_slots
from hae_fx.ops.merge_write import prefill_merge_write_
from hae_fx.ops.prefill_plan import prefill_plan_
from hae_fx.ops.refuse import refuse_op
from hae_fx.ops.slot_attention import slot_attention, slot_attention_no_weight
from hae_fx.ops.slot_write import prefill_write_, slot_write_

if has_triton_package():
    from hae_fx.ops import slot_attention_kernel  # noqa: F401  (registers hae::slot_attention_fused)

register_inductor_decompositions()

__all__ = ["dequantize_slots", "prefill_merge_write_", "prefill_plan_", "prefill_write_", "refuse_op", "slot_attention",
           "slot_attention_no_weight",
           "slot_write_"]
