"""`SlotBuffers`: the one owner of an `HAECache`'s slot metadata (names, allocation, reset, op arguments).

All layers share one set of slot metadata, because policies broadcast one index set to every layer:

- `slot_pos [B, C]` int64: logical position of the token in each slot, -1 for a free slot;
- `score [B, C]` float32: per-slot attention as the rewritten attention adds it (`Policy.score_weights`);
- `modality [B, C]` int8: `TEXT` or `VISUAL`;
- `seen [B]` int64: tokens of each sequence seen so far (the next token's logical position);
- `step_slot [B]` int64: the slot the current decode step's token takes;
- `prefill_keep [B, C]` int64: the prompt index each slot takes at prefill;
- the policy's own `[B, C, ...]` buffers (`Policy.extra_buffers`), e.g. `hae`'s `in_bin`.

Every tensor is allocated once, before any compile, and marked with `mark_static_address`, so compiled graphs read
them as fixed-address inputs that CUDA graphs can capture. Each carries `_hae_role`, which the passes use to
recognise cache tensors among a graph's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies.base import Policy, SlotState

#: the buffers every cache has, with their dtypes and the value `reset` fills them with
CORE_BUFFERS: dict[str, tuple[torch.dtype, int]] = {
    "slot_pos": (torch.int64, -1), "score": (torch.float32, 0), "modality": (torch.int8, 0),
    "seen": (torch.int64, 0), "step_slot": (torch.int64, 0), "prefill_keep": (torch.int64, 0),
}
#: core buffers with one entry per sequence rather than per slot
PER_SEQUENCE = ("seen", "step_slot")
#: the slot metadata the prefill plan writes (besides the policy's extras)
PLAN_WRITES = ("slot_pos", "score", "modality", "seen", "prefill_keep")


@dataclass(frozen=True)
class CacheRole:
    """What a tensor is inside an `HAECache`: `kind` is `keys`, `values`, a core buffer name (`CORE_BUFFERS`) or
    `extra` (a policy's own buffer, named by `name`); `layer` for keys and values; `config`, the cache's policy
    config, which the passes read (e.g. which layers feed the scores)."""

    kind: str
    layer: int | None = None
    config: PolicyConfig | None = field(default=None, compare=False)
    name: str | None = None


def role_of(tensor: object) -> CacheRole | None:
    """The `CacheRole` of a tensor allocated by an `HAECache`, or None for any other object."""
    return getattr(tensor, "_hae_role", None)


def static_buffer(tensor: torch.Tensor, role: CacheRole) -> torch.Tensor:
    """Mark `tensor` as a fixed-address graph input and tag it with its role."""
    torch._dynamo.mark_static_address(tensor)
    tensor._hae_role = role
    return tensor


class SlotBuffers:
    """The slot metadata of one cache, allocated for `batch` sequences of `capacity` slots."""

    def __init__(self, config: PolicyConfig, policy: Policy, batch: int, device: torch.device) -> None:
        capacity = config.capacity
        self.core: dict[str, torch.Tensor] = {}
        for name, (dtype, fill) in CORE_BUFFERS.items():
            shape = (batch,) if name in PER_SEQUENCE else (batch, capacity)
            tensor = torch.full(shape, fill, dtype=dtype, device=device)
            self.core[name] = static_buffer(tensor, CacheRole(name, config=config))
        self.extras: dict[str, torch.Tensor] = {}
        for name, spec in policy.extra_buffers().items():
            dtype, trailing = spec if isinstance(spec, tuple) else (spec, ())
            tensor = torch.zeros(batch, capacity, *trailing, dtype=dtype, device=device)
            self.extras[name] = static_buffer(tensor, CacheRole("extra", config=config, name=name))

    @property
    def slot_pos(self) -> torch.Tensor:
        return self.core["slot_pos"]

    @property
    def score(self) -> torch.Tensor:
        return self.core["score"]

    @property
    def modality(self) -> torch.Tensor:
        return self.core["modality"]

    @property
    def seen(self) -> torch.Tensor:
        return self.core["seen"]

    @property
    def step_slot(self) -> torch.Tensor:
        return self.core["step_slot"]

    @property
    def prefill_keep(self) -> torch.Tensor:
        return self.core["prefill_keep"]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.core.values(), *self.extras.values()]

    def state(self) -> SlotState:
        """The slot metadata, as the policies see it."""
        return SlotState(slot_pos=self.slot_pos, score=self.score, modality=self.modality, seen=self.seen,
                         extras=dict(self.extras))

    def plan_arguments(self) -> dict[str, object]:
        """The buffers `hae::prefill_plan_` writes, bound to its argument names."""
        return {**{name: self.core[name] for name in PLAN_WRITES}, "extras": list(self.extras.values())}

    def reset(self) -> None:
        for name, (_, fill) in CORE_BUFFERS.items():
            self.core[name].fill_(fill)
        for tensor in self.extras.values():
            tensor.zero_()

    def place(self, slot: torch.Tensor, modality: int) -> None:
        """Record each sequence's new token (position `seen`) in slot `slot` (`[B]`): score 0, `modality`, zeroed
        policy extras; then advance `seen`."""
        rows = torch.arange(slot.shape[0], device=slot.device)
        self.slot_pos.index_put_((rows, slot), self.seen)
        self.score.index_put_((rows, slot), torch.zeros((), device=slot.device))
        self.modality.index_put_((rows, slot), torch.full((), modality, dtype=torch.int8, device=slot.device))
        for tensor in self.extras.values():
            tensor.index_put_((rows, slot), torch.zeros((), dtype=tensor.dtype, device=slot.device))
        self.seen.add_(1)
