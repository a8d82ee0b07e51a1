"""Tensor parallelism: one `HAECache` per rank of a model sharded by HF's `tp_plan`, every rank keeping the same slots.

Under HF's plan (`from_pretrained(..., tp_plan="auto")` under `torchrun`) each rank's attention computes its own
share of the query and KV heads, so each rank's cache holds only those KV heads and K/V memory divides by the
degree. The slot choice must not: a policy that ranks tokens by attention averaged over heads would see a
different average on each rank and keep different tokens, and the ranks' partial attention outputs, summed by the
plan's row-wise projection, would then mix keys of different tokens. So the per-slot weights that feed those
decisions (the prefill plan's head-averaged attention, decode's per-slot attention) are averaged across the ranks
before any policy reads them: every rank then sees the single-process value and makes the single-process choice.
A policy with a head axis (`Policy.head_axis`) decides per KV head, and each head lives on one rank: its weights
stay local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from hae_fx.errors import HAETensorParallelError


@dataclass(frozen=True)
class TensorParallel:
    """How a model's attention heads are split across ranks.

    Attributes:
        degree: ranks the KV heads are split across.
        rank: this rank's index among them.
        group_name: the process group's name, which a graph and a custom op's arguments can carry (a process group
            object cannot be either).
    """

    degree: int
    rank: int
    group_name: str


def tensor_parallel_of(model: torch.nn.Module, kv_heads: int) -> TensorParallel | None:
    """The head split of a model HF loaded with a `tp_plan`, or None when every rank holds all `kv_heads` (no plan,
    degree 1, or a plan that leaves the key projection whole)."""
    from transformers.distributed.tensor_parallel import get_kv_heads_per_rank

    degree = getattr(model, "_tp_size", None) or 1
    mesh = getattr(model, "_device_mesh", None)
    if degree <= 1 or mesh is None or get_kv_heads_per_rank(model.tp_plan, kv_heads, degree) == kv_heads:
        return None
    tp_mesh = mesh["tp"]
    return TensorParallel(degree=degree, rank=tp_mesh.get_local_rank(), group_name=tp_mesh.get_group().group_name)


def local_kv_heads(kv_heads: int, tp: TensorParallel | None, model_name: str) -> int:
    """The KV heads one rank's attention computes: `kv_heads / degree`.

    Raises:
        HAETensorParallelError: the degree does not divide the KV heads (HF's plan would split a head's dims across
            ranks, and a slot would hold part of a head on each).
    """
    if tp is None:
        return kv_heads
    if kv_heads % tp.degree:
        raise HAETensorParallelError(
            f"{model_name} has {kv_heads} KV heads, which a tensor-parallel degree of {tp.degree} does not divide: "
            f"each rank's cache holds whole KV heads; launch with a number of processes that divides {kv_heads}"
        )
    return kv_heads // tp.degree


def check_same_config(tp: TensorParallel | None, config_key: str) -> None:
    """Refuse ranks transformed with different policy configs: their slot choices, and so their attention outputs,
    would differ while the plan sums them. A collective: every rank of the group must call it.

    Raises:
        HAETensorParallelError: naming each rank's config.
    """
    if tp is None:
        return
    group = dist.distributed_c10d._resolve_process_group(tp.group_name)
    keys: list[str | None] = [None] * tp.degree
    dist.all_gather_object(keys, config_key, group=group)
    if len(set(keys)) > 1:
        listed = "; ".join(f"rank {rank}: {key}" for rank, key in enumerate(keys))
        raise HAETensorParallelError(
            f"the tensor-parallel ranks were transformed with different policy configs ({listed}); every rank "
            "must keep the same slots, so pass the same config to hae_fx.transform on every rank"
        )


def mean_over_ranks(tensor: torch.Tensor, group_name: str, degree: int) -> torch.Tensor:
    """`tensor` averaged across the ranks of `group_name`: a rank's mean over its own heads becomes the mean over
    every head (each rank holds the same number). Functional collectives, so Dynamo graphs and Inductor trace it."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group_name)) / degree
