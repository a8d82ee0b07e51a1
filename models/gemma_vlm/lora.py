"""Low-rank updates (LoRA) of a frozen model's linear layers: trained as wrappers, shipped as small matrices,
merged into the weights at load time.

Why our own 40 lines rather than a LoRA library: the shipped model must be a plain HF module after loading (hae_fx's
graph passes match HF's attention and projections, and a wrapper would hide them), so the only thing LoRA needs to
do outside training is `W += scale * up @ down`, which `merge` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

#: the decoder's projections that get updates: attention in and out, and the MLP
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """`base(x) + scale * up(down(x))`: `base` frozen, `up` starting at zero so training starts from `base`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def _targets(root: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module, str]]:
    """`(path, parent, attribute)` of every linear under `root` whose attribute name is in `targets`."""
    targets = set(targets)
    return [(f"{parent_path}.{name}" if parent_path else name, parent, name)
            for parent_path, parent in root.named_modules() for name, child in parent.named_children()
            if name in targets and isinstance(child, nn.Linear)]


def add(root: nn.Module, rank: int, alpha: float, targets: Iterable[str] = TARGETS) -> list[nn.Parameter]:
    """Wrap every target linear under `root` in a `LoRALinear`; returns the new (trainable) parameters."""
    parameters = []
    for _, parent, name in _targets(root, targets):
        wrapped = LoRALinear(getattr(parent, name), rank, alpha)
        setattr(parent, name, wrapped)
        parameters += [wrapped.down.weight, wrapped.up.weight]
    return parameters


def state(root: nn.Module) -> dict[str, torch.Tensor]:
    """`{path.down, path.up}` of every `LoRALinear` under `root` (paths relative to `root`)."""
    return {f"{path}.{part}": getattr(module, part).weight.detach().clone()
            for path, module in root.named_modules() if isinstance(module, LoRALinear) for part in ("down", "up")}


def load_into(root: nn.Module, updates: dict[str, torch.Tensor]) -> None:
    """Copy saved `state` into the `LoRALinear` wrappers under `root` (to continue training)."""
    for key, value in updates.items():
        root.get_submodule(key).weight.data.copy_(value)


@torch.no_grad()
def merge(root: nn.Module, updates: dict[str, torch.Tensor], alpha: float) -> None:
    """`W += (alpha / rank) * up @ down` for every saved update, into the plain linears under `root`."""
    paths = {key.rsplit(".", 1)[0] for key in updates}
    for path in sorted(paths):
        linear = root.get_submodule(path)
        down, up = updates[f"{path}.down"], updates[f"{path}.up"]
        delta = (alpha / down.shape[0]) * (up.double() @ down.double())
        linear.weight.copy_((linear.weight.double() + delta.to(linear.weight.device)).to(linear.weight.dtype))
