"""Pack sibling projection weights into one storage, so that the projection-fusion pass can run them as one matmul.

A decoder layer's q/k/v projections read one input, as do its MLP's gate and up projections; decode runs each as its
own matmul over its own weight. `pack_projections` copies each group of sibling `nn.Linear` weights into one
contiguous tensor, `[W_a; W_b; ...]`, and makes every module's `weight` (and `bias`) a `Parameter` viewing its rows.
The modules keep working eagerly with their own weights, the model's code is unchanged, and the weight bytes are
unchanged (the old tensors are freed once nothing else holds them). `hae_fx.passes.projections` then finds linears in
a compiled graph that read one input through adjacent rows of one storage and runs them as one matmul.

Siblings are the `nn.Linear` children of one module with the same input width, dtype, device and bias presence, in
registration order (e.g. `q_proj, k_proj, v_proj, o_proj` when the heads span the hidden size). Which of them read the
same input only the graph knows; the pass fuses just those, so packing one that reads another input (`o_proj`) costs
nothing. Left alone, with a log line: tensor subclasses (torchao's quantized weights), weights on the meta device,
non-contiguous weights, weights tied to another parameter, and weights that already share a storage with something
other than their group (a group already packed is left as it is).

Packing is undone by anything that copies parameters one by one: `model.to(other_device_or_dtype)` gives each weight
its own storage again. Move the model before `hae_fx.transform`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger("hae_fx")


@dataclass(frozen=True)
class PackedGroup:
    """One group of sibling projections whose weights (and biases) are rows of one storage, in this order."""

    parent: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.parent}.{{{', '.join(self.names)}}}"


def pack_projections(layers: Iterable[tuple[str, nn.Module]], root: nn.Module) -> list[PackedGroup]:
    """Pack every group of sibling projections of `layers` (name, module pairs) into one storage each, in place.

    Args:
        layers: the decoder layers, with their names (used in log lines and the result).
        root: the whole model: a weight that appears in it more than once (tied) is left alone.

    Returns:
        The groups whose weights are packed now (including those found already packed).
    """
    uses = Counter(id(p) for _, p in root.named_parameters(remove_duplicate=False))
    packed = []
    skipped: dict[str, list[PackedGroup]] = {}
    for layer_name, layer in layers:
        for name, module in layer.named_modules(prefix=layer_name):
            for group in _sibling_groups(module):
                found = PackedGroup(parent=name, names=tuple(child for child, _ in group))
                reason = _why_not_packable(group, uses)
                if reason is None:
                    _pack(group)
                    packed.append(found)
                else:
                    skipped.setdefault(reason, []).append(found)
    for reason, groups in skipped.items():
        log.info("hae: %d projection group(s) keep separate weights, no projection fusion (e.g. %s): %s",
                 len(groups), groups[0], reason)
    return packed


def _sibling_groups(module: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """The module's `nn.Linear` children with equal input width, dtype, device and bias presence (two or more)."""
    groups: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and isinstance(child.weight, torch.Tensor):
            key = (child.weight.shape[1:], child.weight.dtype, child.weight.device, child.bias is None)
            groups.setdefault(key, []).append((name, child))
    return [group for group in groups.values() if len(group) > 1]


def _why_not_packable(group: list[tuple[str, nn.Linear]], uses: Counter) -> str | None:
    """Why the group's weights cannot be packed, or None when they can (or already are)."""
    tensors = [tensor for _, linear in group for tensor in (linear.weight, linear.bias) if tensor is not None]
    subclasses = [type(t).__name__ for t in tensors if type(t) not in (torch.Tensor, nn.Parameter)]
    if subclasses:
        return f"a weight is a {subclasses[0]} (a tensor subclass, e.g. torchao-quantized)"
    if any(t.device.type == "meta" for t in tensors):
        return "its weights are on the meta device"
    if any(not t.is_contiguous() for t in tensors):
        return "a weight is not contiguous"
    if any(uses[id(t)] > 1 for t in tensors):
        return "a weight is tied to another parameter"
    if not _already_packed(group) and any(t.untyped_storage().nbytes() != t.nbytes for t in tensors):
        return "a weight shares its storage with another tensor"
    return None


def _already_packed(group: list[tuple[str, nn.Linear]]) -> bool:
    """Whether the group's weights (and biases) already tile one storage in order (a model packed before)."""
    if not rows_follow([linear.weight for _, linear in group]):
        return False
    return group[0][1].bias is None or rows_follow([linear.bias for _, linear in group])


def rows_follow(tensors: list[torch.Tensor]) -> bool:
    """Whether contiguous `tensors` lie back to back in one storage, in this order: together, one tensor of their
    concatenated rows, read without a copy."""
    first = tensors[0]
    offset = first.storage_offset()
    for tensor in tensors:
        if (not tensor.is_contiguous() or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or tensor.storage_offset() != offset):
            return False
        offset += tensor.numel()
    return True


@torch.no_grad()
def _pack(group: list[tuple[str, nn.Linear]]) -> None:
    if _already_packed(group):
        return
    for attribute in ("weight", "bias"):
        tensors = [getattr(linear, attribute) for _, linear in group]
        if tensors[0] is None:
            continue
        packed = torch.cat([t.detach() for t in tensors])
        start = 0
        for (_, linear), tensor in zip(group, tensors, strict=True):
            rows = packed[start:start + tensor.shape[0]]
            setattr(linear, attribute, nn.Parameter(rows, requires_grad=tensor.requires_grad))
            start += tensor.shape[0]
