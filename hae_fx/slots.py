"""`SlotBuffers`: the one owner of an `HAECache`'s slot metadata (names, allocation, reset, op arguments).

All layers share one set of slot metadata (one `SlotGroup`), because policies broadcast one index set to every
layer; a policy with per-layer capacities (`Policy.layer_capacities`) gets one group per global layer instead,
each sized to its layer, and only `seen` stays shared. A group holds:

- `slot_pos [B, C]` int64: logical position of the token in each slot, -1 for a free slot;
- `score [B, C]` float32: per-slot attention as the rewritten attention adds it (`Policy.score_weights`);
- `modality [B, C]` int8: `TEXT` or `VISUAL`;
- `seen [B]` int64 (one per cache): tokens of each sequence seen so far (the next token's logical position);
- `step_slot [B]` int64: the slot the current decode step's token takes;
- `prefill_keep [B, C]` int64: the prompt index each slot takes at prefill;
- the policy's own `[B, C, ...]` buffers (`Policy.extra_buffers`), e.g. `hae`'s `in_bin`.

A policy whose KV heads keep index sets of their own (`Policy.head_axis`, MadaKV) has a head axis in every per-slot
buffer (`[B, Hkv, C]`) and in `step_slot` (`[B, Hkv]`). The policy's per-sequence buffers (`Policy.cache_buffers`,
`[B]`) exist once per cache, beside `seen`.

Every tensor is allocated once, before any compile, and marked with `mark_static_address`, so compiled graphs read
them as fixed-address inputs that CUDA graphs can capture. Each carries `_hae_role`, which the passes use to
recognise cache tensors among a graph's inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hae_fx.config import PolicyConfig
from hae_fx.policies.base import Policy, SlotState, slot_index
from hae_fx.tensor_parallel import TensorParallel

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
    config, which the passes read (e.g. which layers feed the scores); `group`, the `SlotGroup` whose slot metadata
    the tensor is or (keys and values) follows; `tensor_parallel`, the cache's head split across ranks (None: one
    process), which the rewrite reads to average the per-slot attention across ranks (`hae_fx.tensor_parallel`)."""

    kind: str
    layer: int | None = None
    config: PolicyConfig | None = field(default=None, compare=False)
    name: str | None = None
    group: int = 0
    tensor_parallel: TensorParallel | None = field(default=None, compare=False)


def role_of(tensor: object) -> CacheRole | None:
    """The `CacheRole` of a tensor allocated by an `HAECache`, or None for any other object."""
    return getattr(tensor, "_hae_role", None)


def static_buffer(tensor: torch.Tensor, role: CacheRole) -> torch.Tensor:
    """Mark `tensor` as a fixed-address graph input and tag it with its role."""
    torch._dynamo.mark_static_address(tensor)
    tensor._hae_role = role
    return tensor


class SlotGroup:
    """The slot metadata of the layers that keep one index set: `capacity` slots per sequence.

    A cache has one group, shared by every layer, unless its policy gives layers capacities of their own
    (`Policy.layer_capacities`); then each global layer has a group, and its K/V buffers are sized to it."""

    def __init__(self, config: PolicyConfig, policy: Policy, batch: int, capacity: int, device: torch.device,
                 index: int, kv_heads: int = 1, tensor_parallel: TensorParallel | None = None) -> None:
        self.index, self.capacity = index, capacity
        rows = (batch, kv_heads) if policy.head_axis else (batch,)
        self.core: dict[str, torch.Tensor] = {}
        for name, (dtype, fill) in CORE_BUFFERS.items():
            if name == "seen":
                continue  # one per cache: `SlotBuffers.seen`
            shape = rows if name in PER_SEQUENCE else (*rows, capacity)
            tensor = torch.full(shape, fill, dtype=dtype, device=device)
            self.core[name] = static_buffer(tensor, CacheRole(name, config=config, group=index,
                                                              tensor_parallel=tensor_parallel))
        self.extras: dict[str, torch.Tensor] = {}
        for name, spec in policy.extra_buffers().items():
            dtype, trailing = spec if isinstance(spec, tuple) else (spec, ())
            tensor = torch.zeros(*rows, capacity, *trailing, dtype=dtype, device=device)
            self.extras[name] = static_buffer(tensor, CacheRole("extra", config=config, name=name, group=index))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.core.values(), *self.extras.values()]

    def reset(self) -> None:
        for name, tensor in self.core.items():
            tensor.fill_(CORE_BUFFERS[name][1])
        for tensor in self.extras.values():
            tensor.zero_()

    def place(self, slot: torch.Tensor, modality: int, seen: torch.Tensor) -> None:
        """Record each sequence's new token (position `seen`, `[B]`) in slot `slot` (`[B]`, or `[B, Hkv]` with a head
        axis): score 0, `modality`, zeroed policy extras. Without a head axis, `[B, n]` slots and positions place a
        chunk of `n` tokens (`hae_fx.turns`)."""
        if self.core["slot_pos"].dim() == 3:  # a head axis: one slot per KV head
            index = slot_index(slot)
        else:
            index = (torch.arange(slot.shape[0], device=slot.device).view(-1, *([1] * (slot.dim() - 1))), slot)
        positions = seen if seen.shape == slot.shape else seen.view(-1, *[1] * (slot.dim() - 1)).expand_as(slot)
        self.core["slot_pos"].index_put_(index, positions)
        self.core["score"].index_put_(index, torch.zeros((), device=slot.device))
        self.core["modality"].index_put_(index, torch.full((), modality, dtype=torch.int8, device=slot.device))
        for tensor in self.extras.values():
            tensor.index_put_(index, torch.zeros((), dtype=tensor.dtype, device=slot.device))


class SlotBuffers:
    """The slot metadata of one cache, allocated for `batch` sequences: one `SlotGroup` per distinct index set
    (`capacities`, one per group; `[config.capacity]` for a policy that keeps one set), the shared `seen` and the
    policy's per-sequence buffers (`shared`). `kv_heads` sizes the head axis of a policy with one; `tensor_parallel`
    is the cache's head split across ranks, recorded in the groups' roles."""

    def __init__(self, config: PolicyConfig, policy: Policy, batch: int, device: torch.device,
                 capacities: list[int] | None = None, kv_heads: int = 1,
                 tensor_parallel: TensorParallel | None = None) -> None:
        capacities = capacities or [config.capacity]
        self.groups = [SlotGroup(config, policy, batch, capacity, device, index, kv_heads, tensor_parallel)
                       for index, capacity in enumerate(capacities)]
        seen_dtype, seen_fill = CORE_BUFFERS["seen"]
        self.seen = static_buffer(torch.full((batch,), seen_fill, dtype=seen_dtype, device=device),
                                  CacheRole("seen", config=config))
        self.shared = {name: static_buffer(torch.zeros(batch, dtype=dtype, device=device),
                                           CacheRole("extra", config=config, name=name))
                       for name, dtype in policy.cache_buffers().items()}

    @property
    def slot_pos(self) -> torch.Tensor:
        """Group 0's (the only group of a policy that keeps one index set)."""
        return self.groups[0].core["slot_pos"]

    @property
    def score(self) -> torch.Tensor:
        return self.groups[0].core["score"]

    @property
    def modality(self) -> torch.Tensor:
        return self.groups[0].core["modality"]

    @property
    def step_slot(self) -> torch.Tensor:
        return self.groups[0].core["step_slot"]

    @property
    def prefill_keep(self) -> torch.Tensor:
        return self.groups[0].core["prefill_keep"]

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        return self.groups[0].extras

    def tensors(self) -> list[torch.Tensor]:
        return [tensor for group in self.groups for tensor in group.tensors()] + [self.seen, *self.shared.values()]

    @staticmethod
    def planned_nbytes(config: PolicyConfig, policy: Policy, batch: int, capacities: list[int] | None = None,
                       kv_heads: int = 1) -> int:
        """Bytes the buffers of `SlotBuffers(config, policy, batch, ..., capacities, kv_heads)` take, known before
        allocating them."""
        per_slot = sum(dtype.itemsize for name, (dtype, _) in CORE_BUFFERS.items() if name not in PER_SEQUENCE)
        for spec in policy.extra_buffers().values():
            dtype, trailing = spec if isinstance(spec, tuple) else (spec, ())
            per_slot += dtype.itemsize * math.prod(trailing)
        per_group = sum(CORE_BUFFERS[name][0].itemsize for name in PER_SEQUENCE if name != "seen")
        heads = kv_heads if policy.head_axis else 1
        slots = sum(capacities or [config.capacity])
        groups = len(capacities or [config.capacity])
        shared = sum(dtype.itemsize for dtype in policy.cache_buffers().values())
        per_sequence = CORE_BUFFERS["seen"][0].itemsize + shared
        return batch * (heads * (slots * per_slot + groups * per_group) + per_sequence)

    def state(self, group: int = 0) -> SlotState:
        """A group's slot metadata, as the policies see it."""
        core = self.groups[group].core
        return SlotState(slot_pos=core["slot_pos"], score=core["score"], modality=core["modality"], seen=self.seen,
                         extras={**self.groups[group].extras, **self.shared})

    def plan_arguments(self, group: int = 0) -> dict[str, object]:
        """The buffers `hae::prefill_plan_` writes for one group, bound to its argument names."""
        core = self.groups[group].core
        return {**{name: self.seen if name == "seen" else core[name] for name in PLAN_WRITES},
                "extras": [*self.groups[group].extras.values(), *self.shared.values()]}

    def reset(self) -> None:
        for group in self.groups:
            group.reset()
        self.seen.fill_(CORE_BUFFERS["seen"][1])
        for tensor in self.shared.values():
            tensor.zero_()

    def place_chunk(self, slots: torch.Tensor, modality: int) -> None:
        """Record each sequence's `n` new tokens (positions `seen` to `seen + n - 1`) in slots `slots` (`[B, n]`) of
        the one group, then advance `seen` by `n`: a follow-up turn's chunk (`hae_fx.turns`)."""
        positions = self.seen.unsqueeze(1) + torch.arange(slots.shape[1], device=slots.device)
        self.groups[0].place(slots, modality, positions)
        self.seen.add_(slots.shape[1])

    def place(self, slots: list[torch.Tensor], modality: int) -> None:
        """Record each sequence's new token in each group's slot `slots[g]` (`[B]`), then advance `seen`."""
        for group, slot in zip(self.groups, slots, strict=True):
            group.place(slot, modality, self.seen)
        self.seen.add_(1)
