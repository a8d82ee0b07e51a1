"""`HAECache`: an HF `Cache` whose memory is fixed at construction, whatever the prompt or generation length.

Per layer it holds `keys`/`values` buffers `[B, Hkv, C, D]`; all layers share one set of slot metadata, which
`hae_fx.slots.SlotBuffers` owns (names, allocation, reset, the prefill plan's arguments), because policies
broadcast one index set to every layer. A policy with per-layer capacities (`Policy.layer_capacities`) gets each
global layer's buffers sized to its own capacity, with slot metadata of its own (a `SlotGroup` per layer). A policy
whose KV heads keep index sets of their own (`Policy.head_axis`) has slot metadata `[B, Hkv, C]`: each head of a
layer's `[B, Hkv, C, D]` buffers holds its own tokens.

Sliding-window and chunked layers (`hae_fx.layer_kinds`) never need more than their span of keys: each holds a
ring of `min(span, capacity)` slots instead (all `span` with `PolicyConfig.full_windows`), where the token at
position `p` lives in slot `p % ring`, with its own `ring_pos [B, ring]` (the position held, -1 when empty or
outside the query's chunk). Eviction policies act on the global layers; a ring of `span` slots only ever drops what
its layer can no longer see, a shorter one also the oldest tokens its layer could still see.

Every tensor is allocated once, before any compile, and marked with `mark_static_address`, so compiled graphs
read them as fixed-address inputs that CUDA graphs can capture. Each carries `_hae_role`, which the passes use
to recognise cache tensors among a graph's inputs.

The cache's `update` decides where new keys go (through the policy) and writes them with `hae::slot_write_`; the
prefill's keep set comes from `hae::prefill_plan_`, the policy's decision as one graph node.
It returns the fresh keys during prefill (prefill attends over the whole prompt, as HF does) and the slot
buffers during decode, where the backend's passes rewrite the attention over them into `hae::slot_attention`.
Driving it without those passes would be silently wrong, so it refuses to decode outside `torch.compile`.

With `PolicyConfig.kv_dtype` set, each layer's K/V slots are 8-bit with per-slot, per-head fp32 scales
(`key_scales`/`value_scales` `[B, Hkv, C, 1]`, `hae_fx.kv_quant`); the writes quantize, and decode returns the
slots through `hae::dequantize_slots`, which the rewrite replaces by attention over the quantized buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hae_fx.config import PolicyConfig
from hae_fx.errors import (
    HAECapacityError,
    HAEConfigError,
    HAEError,
    HAETensorParallelError,
    HAEUnsupportedModelError,
)
from hae_fx.kv_quant import is_quantized, storage_dtype
from hae_fx.layer_kinds import CHUNKED, FULL, SLIDING, LayerKind
from hae_fx.modality import TEXT, VISUAL
from hae_fx.ops.refuse import refuse
from hae_fx.policies import policy_for
from hae_fx.ring import ring_decode_slot, ring_prefill
from hae_fx.slots import CacheRole, SlotBuffers, role_of, static_buffer
from hae_fx.tensor_parallel import TensorParallel, check_same_config, local_kv_heads, tensor_parallel_of
from hae_fx.validation import check_device_holds

__all__ = ["TEXT", "VISUAL", "CacheRole", "HAECache", "HAELayer", "binned_positions", "kept_positions", "role_of"]


class HAELayer(CacheLayerMixin):
    """One decoder layer's K/V slots.

    A global layer's slots follow the cache's shared slot metadata (`HAECache.slot_pos`, the policy's choice); a
    windowed layer (sliding or chunked) is a ring of `min(span, capacity)` slots (`span` with
    `PolicyConfig.full_windows`) with its own `ring_pos`.
    """

    is_compileable = True

    def __init__(self, cache: HAECache, layer_idx: int, kind: LayerKind, capacity: int | None = None) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.kind = kind
        self.slots = kind.cache_slots(cache.capacity if capacity is None else capacity,
                                      full_windows=cache.config.full_windows)
        self.ring_pos: torch.Tensor | None = None
        #: per-slot scales of quantized K/V (`PolicyConfig.kv_dtype`), None for unquantized slots
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None

    @property
    def is_sliding(self) -> bool:
        """HF's mask builders pick their per-kind sizes from the first layer that says so."""
        return self.kind.windowed

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("HAECache allocates its buffers up front; call HAECache.allocate(...) before use")

    def allocate(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, self.slots, head_dim)
        config = self.cache.config
        stored = storage_dtype(config.kv_dtype, dtype)
        group = self.cache.layer_group[self.layer_idx]
        self.keys = static_buffer(torch.zeros(shape, dtype=stored, device=device),
                                  CacheRole("keys", self.layer_idx, config, group=group))
        self.values = static_buffer(torch.zeros(shape, dtype=stored, device=device),
                                    CacheRole("values", self.layer_idx, config, group=group))
        if is_quantized(stored):
            scale_shape = (batch, kv_heads, self.slots, 1)
            self.key_scales = static_buffer(torch.zeros(scale_shape, dtype=torch.float32, device=device),
                                            CacheRole("key_scales", self.layer_idx, config, group=group))
            self.value_scales = static_buffer(torch.zeros(scale_shape, dtype=torch.float32, device=device),
                                              CacheRole("value_scales", self.layer_idx, config, group=group))
        if self.kind.windowed:
            ring = torch.full((batch, self.slots), -1, dtype=torch.int64, device=device)
            self.ring_pos = static_buffer(ring, CacheRole("ring_pos", self.layer_idx, config))
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.write_layer(self.layer_idx, key_states, value_states)

    def kv_tensors(self) -> list[torch.Tensor]:
        """The K/V slot buffers, with their scales when quantized: what the layer's K/V memory is."""
        scales = [self.key_scales, self.value_scales] if self.key_scales is not None else []
        return [self.keys, self.values, *scales]

    def scale_arguments(self) -> dict[str, torch.Tensor | None]:
        """The scale buffers the hae write ops take for quantized slots (None for unquantized ones)."""
        return {"k_scale": self.key_scales, "v_scale": self.value_scales}

    def decode_view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What decode's `update` returns for the model's attention: the slot buffers, through
        `hae::dequantize_slots` when quantized (the rewrite replaces that attention and drops the dequantize)."""
        if self.key_scales is None:
            return self.keys, self.values
        return (torch.ops.hae.dequantize_slots(self.keys, self.key_scales, self.dtype),
                torch.ops.hae.dequantize_slots(self.values, self.value_scales, self.dtype))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Prefill attends over the fresh prompt keys under HF's own mask; decode's mask is rebuilt by
        # hae::slot_attention from slot_pos (or ring_pos), so there the size only has to match the slots. HF builds
        # one mask for every global layer, so where their slot counts differ (per-layer capacities), it is one
        # column wide and broadcasts over each layer's slots until the rewrite drops it.
        if not self.cache.prefilled:
            return query_length, 0
        return (1, 0) if len(self.cache.slots.groups) > 1 and not self.kind.windowed else (self.slots, 0)

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cache.seen.amax()

    def get_max_length(self) -> int:
        return self.slots

    def reset(self) -> None:
        self.cache.reset()


class HAECache(Cache):
    """Fixed-capacity, evicting KV cache driven by an eviction policy.

    Args:
        config: the policy's config (`hae_fx.HAEConfig` or a `hae_fx.policies` config).
        num_layers: decoder layers that read the cache.
        batch: sequences per generate call; fixed for the life of the cache.
        kv_heads, head_dim: attention geometry of the decoder.
        dtype, device: of the K/V buffers (the metadata uses its own dtypes).
        layer_kinds: each layer's attention span (`hae_fx.layer_kinds`); all global when None.
        tensor_parallel: the model's head split across ranks (`hae_fx.tensor_parallel`), None in one process;
            `kv_heads` is then this rank's share.
    """

    def __init__(self, config: PolicyConfig, *, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, layer_kinds: list[LayerKind] | None = None,
                 tensor_parallel: TensorParallel | None = None) -> None:
        if layer_kinds is None:
            layer_kinds = [LayerKind(FULL)] * num_layers
        if len(layer_kinds) != num_layers:
            raise ValueError(f"{len(layer_kinds)} layer kinds for {num_layers} layers")
        self.config = config
        self.capacity = config.capacity
        self.policy = policy_for(config)
        self.policy.check_model(num_layers)  # e.g. a dap_layer beyond the depth, before layers are grouped by it
        if tensor_parallel is not None and self.policy.reads_values:
            raise HAETensorParallelError(
                f"policy {config.policy!r} ranks tokens by their value vectors, which tensor parallelism splits across "
                "ranks by head; its choice would differ from rank to rank. Use it in one process, or another policy "
                "(e.g. 'hae', 'snapkv', 'h2o') under tensor parallelism"
            )
        self.tensor_parallel = tensor_parallel
        self.pruned_after = self.policy.pruned_after()
        global_layers = [index for index, kind in enumerate(layer_kinds) if not kind.windowed]
        capacities = self._group_layers(global_layers, num_layers)
        layers = [HAELayer(self, i, kind, None if kind.windowed else capacities[self.layer_group[i]])
                  for i, kind in enumerate(layer_kinds)]
        super().__init__(layers=layers)
        self.batch = batch
        device = torch.device(device)
        if self.policy.merges_evicted and is_quantized(storage_dtype(config.kv_dtype, dtype)):
            raise HAEConfigError(
                f"policy {config.policy!r} merges evicted prompt K/V into kept slots, which 8-bit slots "
                f"(kv_dtype={config.kv_dtype!r}) do not support yet; use kv_dtype=None with it"
            )
        if self.policy.head_axis and (self.policy.merges_evicted or self.pruned_after is not None):
            raise ValueError(f"policy {config.policy!r} keeps an index set per KV head, which prompt merging and "
                             "hidden-state pruning (one index set for every head) cannot follow")
        stored = storage_dtype(config.kv_dtype, dtype)
        slot_bytes = 2 * kv_heads * (head_dim * stored.itemsize + (4 if is_quantized(stored) else 0))
        planned = sum(batch * layer.slots * (slot_bytes + (torch.int64.itemsize if layer.kind.windowed else 0))
                      for layer in layers) + SlotBuffers.planned_nbytes(config, self.policy, batch, capacities,
                                                                        kv_heads)
        check_device_holds(planned, device, f"an HAECache of capacity={self.capacity}, batch={batch}, "
                                            f"{num_layers} layers of {kv_heads} KV heads x {head_dim} ({dtype})")
        for layer in layers:
            layer.allocate(batch, kv_heads, head_dim, dtype, device)
        self.slots = SlotBuffers(config, self.policy, batch, device, capacities, kv_heads, tensor_parallel)
        #: the layers whose prompt attention the policy's prefill plan reads; per slot group, those it plans from
        #: and the layer that emits its plan (a group without such layers plans at its first layer)
        self.plan_layers = self.policy.prefill_layers(global_layers)
        if self.pruned_after is not None and self.pruned_after < max(self.plan_layers, default=-1):
            raise HAEConfigError(
                f"policy {config.policy!r} prunes the hidden states after layer {self.pruned_after}, before its "
                f"prefill plan exists: it reads layer(s) {list(self.plan_layers)} ({self.pruned_after} is a "
                f"sliding-window layer of this model; hae's dap_global reads the next full-attention one). Set the "
                f"plan's layer to one of the full-attention layers {global_layers} (hae: dap_layer), or "
                "dap_global=False"
            )
        self.group_plan_layers = [tuple(layer for layer in self.plan_layers if self.layer_group[layer] == group)
                                  for group in range(len(capacities))]
        self._plan_emitters = {max(planned, default=members[0]): group for group, (planned, members) in
                               enumerate(zip(self.group_plan_layers, self.group_members, strict=True))}
        self.config_key = config.key()  # computed here: JSON encoding cannot be traced
        self._plan_keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prompt K/V of `plan_layers`, traced
        self.last_global_layer = max(global_layers, default=None)
        self._step_values: dict[int, torch.Tensor] = {}  # a decode step's new global-layer values, while traced
        # prompt metadata staged by `begin_prefill`, read by the compiled prefill graph
        self.prompt_pos: torch.Tensor | None = None
        self.prompt_modality: torch.Tensor | None = None
        self.prefill_kept_len = 0  # number of prompt tokens the prefill writes (slots 0..K-1)
        self.group_kept_len = [0] * len(capacities)  # the same per slot group
        #: per slot group, `[0, kept]`, empty: carries the kept length into the prefill graph as a dimension, so one
        #: graph serves every kept length (a Python int would be a constant, recompiled for each value)
        self.kept_len_carriers = [torch.empty(0, 0) for _ in capacities]
        #: per sequence, the logical positions of the prompt's visual tokens (for `hae_fx.viz`, `hae_fx.report`)
        self.prompt_visual_positions: list[list[int]] = [[] for _ in range(batch)]
        #: per sequence, the positions the prefill kept (filled when the prefill ends; `hae_fx.viz` draws them)
        self.prefill_kept: list[list[int]] = [[] for _ in range(batch)]
        self.prefilled = False
        self.tokens_seen = 0  # Python-side mirror of max(seen), for checks made before each step
        #: True while a follow-up turn's chunk runs (`hae_fx.turns`): several new tokens written and attended at once
        self.chunking = False
        self._chunk_slots: torch.Tensor | None = None  # the chunk's slots, while traced

    def _group_layers(self, global_layers: list[int], num_layers: int) -> list[int]:
        """Assign layers to slot groups (`layer_group`, `group_members`) and return each group's capacity: one group
        for every layer, or one per global layer for a policy with per-layer capacities (windowed layers keep their
        rings and count in group 0)."""
        capacities = self.policy.layer_capacities(global_layers)
        if capacities is None:
            self.layer_group = [0] * num_layers
            self.group_members = [list(range(num_layers))]
            return [self.capacity]
        if len(capacities) != len(global_layers):
            raise ValueError(f"{len(capacities)} layer capacities for {len(global_layers)} global layers")
        if self.pruned_after is not None:
            raise HAEConfigError(
                f"policy {self.config.policy!r} gives layers capacities of their own and prunes hidden states; "
                "hidden-state pruning needs one index set for every layer"
            )
        group_of = {layer: group for group, layer in enumerate(global_layers)}
        self.layer_group = [group_of.get(layer, 0) for layer in range(num_layers)]
        self.group_members = [[layer] for layer in global_layers]
        return list(capacities)

    @property
    def slot_pos(self) -> torch.Tensor:
        return self.slots.slot_pos

    @property
    def score(self) -> torch.Tensor:
        return self.slots.score

    @property
    def modality(self) -> torch.Tensor:
        return self.slots.modality

    @property
    def seen(self) -> torch.Tensor:
        return self.slots.seen

    @property
    def prefill_keep(self) -> torch.Tensor:
        return self.slots.prefill_keep

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: PolicyConfig, batch: int) -> HAECache:
        """A cache shaped for `model`'s text decoder, on its device and in its dtype; for a model HF sharded with a
        `tp_plan`, this rank's KV heads, after checking that every rank passed the same config (a collective then:
        every rank calls it, as every rank calls generate)."""
        from hae_fx.models import family_of

        family = family_of(model)
        kv_heads, head_dim = family.kv_geometry(model)
        tp = tensor_parallel_of(model, kv_heads)
        kv_heads = local_kv_heads(kv_heads, tp, type(model).__name__)
        check_same_config(tp, config.key())
        return cls(config, num_layers=family.num_layers(model), batch=batch, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=model.dtype, device=model.device, layer_kinds=family.layer_kinds(model),
                   tensor_parallel=tp)

    # -- memory ------------------------------------------------------------------------------------------------
    def buffers(self) -> list[torch.Tensor]:
        """Every tensor this cache allocated (K/V of every layer and the slot metadata)."""
        kv = [t for layer in self.layers for t in layer.kv_tensors()]
        rings = [layer.ring_pos for layer in self.layers if layer.ring_pos is not None]
        return kv + rings + self.slots.tensors()

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache allocated: fixed at construction."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the K/V buffers alone (with their scales when quantized)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.kv_tensors())

    @property
    def kv_bytes_per_token(self) -> int:
        """K/V bytes one token takes across every layer (scales included): what a full cache of this storage dtype
        pays per token of the sequence."""
        return sum(t.numel() * t.element_size() // layer.slots for layer in self.layers
                   for t in layer.kv_tensors())

    # -- lifecycle (called eagerly, outside compiled graphs) ---------------------------------------------------
    def begin_prefill(self, token_pos: torch.Tensor, modality: torch.Tensor | None = None) -> None:
        """Stage the prompt's metadata for the compiled prefill.

        Args:
            token_pos: `[B, T]` logical position of each prompt token, -1 for padding.
            modality: `[B, T]` `TEXT`/`VISUAL` per token; all text when None.
        """
        if self.prefilled:
            raise HAECapacityError(
                "this HAECache already holds a prompt; create a new cache (or call reset()) for a new prompt"
            )
        if token_pos.shape[0] != self.batch:
            raise HAECapacityError(
                f"batch mismatch: the HAECache was built for batch {self.batch} but the prompt has batch "
                f"{token_pos.shape[0]}; build the cache with the prompt's batch size"
            )
        self.prompt_pos = token_pos.to(self.slot_pos.device, torch.int64)
        if modality is None:
            modality = torch.zeros_like(self.prompt_pos, dtype=torch.int8)
        self.prompt_modality = modality.to(self.slot_pos.device, torch.int8)
        token_pos_host, modality_host = torch.stack([self.prompt_pos, self.prompt_modality.long()]).cpu()  # one sync
        real = token_pos_host >= 0
        visual = real & (modality_host == VISUAL)
        self.prompt_visual_positions = [row[mask].tolist() for row, mask in zip(token_pos_host, visual, strict=True)]
        real_tokens = real.sum(dim=-1).tolist()
        visual_tokens = [len(positions) for positions in self.prompt_visual_positions]
        self.prefill_kept_len = self.policy.prefill_kept_len(token_pos.shape[1], real_tokens, visual_tokens)
        if len(self.slots.groups) == 1:
            self.group_kept_len = [self.prefill_kept_len]
        else:  # per-layer capacities: each layer keeps what fits
            self.group_kept_len = [min(token_pos.shape[1], group.capacity) for group in self.slots.groups]
        self.kept_len_carriers = [torch.empty(0, kept, device=self.slot_pos.device) for kept in self.group_kept_len]
        self.policy.note_prompt(visual_tokens)

    @property
    def traced_kept_len(self) -> int:
        """`prefill_kept_len` as traced code must read it: a dimension of group 0's kept-length carrier (symbolic
        when `hae_fx.prompt_shapes` marks it dynamic)."""
        return self.traced_group_kept_len(0)

    def traced_group_kept_len(self, group: int) -> int:
        return self.kept_len_carriers[group].shape[1]

    def end_prefill(self) -> None:
        self.prefilled = True
        self.prompt_pos = self.prompt_modality = None
        self.tokens_seen = int(self.seen.amax())
        self.prefill_kept = kept_positions(self)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """0, for HF's mask builders only.

        They index position-keyed mask functions (Gemma 3's bidirectional image blocks, PaliGemma's prefix) by
        `query offset + i` over keys `0..kv_length-1`. Prefill starts at offset 0 anyway; at decode the masks over
        the slots are dropped by the rewrite (`hae::slot_attention` masks by slot position), and an offset of the
        true position would index past the slot range."""
        return 0

    def begin_decode_step(self, tokens: int = 1) -> None:
        """Checks made before each decode step (or a follow-up chunk of `tokens` tokens): the cache is prefilled, and
        `full` still has room."""
        if not self.prefilled:
            raise RuntimeError("HAECache: decode before prefill; the first forward must carry the whole prompt")
        if not self.policy.evicts and self.tokens_seen + tokens > self.capacity:
            raise HAECapacityError(
                f"policy 'full' cannot hold token {self.tokens_seen + tokens}: capacity is {self.capacity}; raise "
                "HAEConfig.capacity to cover prompt + max_new_tokens, or use an evicting policy"
            )
        self.tokens_seen += tokens

    def reset(self) -> None:
        for layer in self.layers:
            for tensor in layer.kv_tensors():
                tensor.zero_()
            if layer.ring_pos is not None:
                layer.ring_pos.fill_(-1)
        self.slots.reset()
        self.prompt_visual_positions = [[] for _ in range(self.batch)]
        self.prefill_kept = [[] for _ in range(self.batch)]
        self.prefilled = False
        self.tokens_seen = 0

    # -- traced into the compiled graphs ----------------------------------------------------------------------
    def write_layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        refusal = self._refusal(layer_idx, key_states)
        if refusal is not None:
            return self._refused(refusal, layer_idx, key_states, value_states)
        if not self.prefilled:
            return self._prefill_write(layer_idx, key_states, value_states)
        if self.chunking:
            return self._chunk_write(layer_idx, key_states, value_states)
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                "HAECache decode must run through hae_fx.transform (or torch.compile(backend='hae')): the attention "
                "over its slots is rewritten by the hae passes"
            )
        return self._decode_write(layer_idx, key_states, value_states)

    def _refusal(self, layer_idx: int, key_states: torch.Tensor) -> HAEError | None:
        """Why this cache cannot take `key_states` in `layer_idx`, or None."""
        allocated = self.layers[layer_idx].keys
        if key_states.dim() != 4 or key_states.shape[1] != allocated.shape[1] or \
                key_states.shape[3] != allocated.shape[3]:
            # the message names static sizes only: traced, it must be a constant (the prompt length can be symbolic)
            found = f"keys of {key_states.shape[1]} KV heads of dim {key_states.shape[3]}" if key_states.dim() == 4 \
                else f"{key_states.dim()}-D keys"
            return HAEUnsupportedModelError(
                f"decoder layer {layer_idx} caches {found} ([batch, kv_heads, tokens, head_dim]) but the HAECache was "
                f"sized for {allocated.shape[1]} KV heads of dim {allocated.shape[3]}; "
                "build the cache with HAECache(..., kv_heads=, head_dim=) matching those keys. If "
                "HAECache.for_model built it, the model's config names its attention geometry in a way hae_fx does "
                "not read (ModelFamily.kv_geometry): add a family entry in hae_fx.models"
            )
        if self.prefilled and key_states.shape[2] != 1 and not self.chunking:
            return HAECapacityError(
                f"HAECache decodes one token per step, got {key_states.shape[2]}; multi-token steps (speculative or "
                "chunked decoding) are not supported"
            )
        return None

    def _refused(self, error: HAEError, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Raise `error`; while traced, hand the layer's attention stand-in keys and values of the shape it expects
        (the prompt's, or one per slot at decode) through `hae::refuse`, so that the graph raises it
        (`hae_fx.ops.refuse`)."""
        def stand_in(states: torch.Tensor) -> torch.Tensor:
            if not self.prefilled or states.dim() != 4:
                return states
            return states[:, :, :1].expand(-1, -1, self.layers[layer_idx].slots, -1)

        return refuse(error, stand_in(key_states)), refuse(error, stand_in(value_states))

    def _prefill_write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.prompt_pos is None:
            raise RuntimeError("HAECache: prefill without begin_prefill(); use the model transformed by hae_fx")
        group = self.layer_group[layer_idx]
        kept = self.traced_group_kept_len(group)
        layer = self.layers[layer_idx]
        pruned = self.pruned_after is not None and layer_idx > self.pruned_after
        if layer_idx in self.plan_layers:
            self._plan_keys[layer_idx] = (key_states, value_states)
        if layer_idx in self._plan_emitters:
            self._emit_prefill_plan(self._plan_emitters[layer_idx])
        if layer.kind.windowed:
            # hae_fx.pruning gathered a pruned layer's inputs to the kept tokens, whose positions the plan wrote
            token_pos = self.slot_pos[:, :kept] if pruned else self.prompt_pos
            self._check_prompt_tokens(layer_idx, key_states, token_pos.shape[1])
            ring_keep = ring_prefill(layer.ring_pos, token_pos, self.prompt_pos)
            torch.ops.hae.prefill_write_(layer.keys, layer.values, key_states, value_states, ring_keep,
                                         ring_keep.new_empty(0, layer.slots), **layer.scale_arguments())
            return key_states, value_states
        if pruned:
            # hae_fx.pruning gathered this layer's inputs to the kept tokens, already in slot order
            self._check_prompt_tokens(layer_idx, key_states, kept)
            slots = torch.arange(kept, device=key_states.device).expand(self.batch, kept)
            torch.ops.hae.slot_write_(layer.keys, layer.values, key_states, value_states, slots,
                                      **layer.scale_arguments())
            return key_states, value_states
        prefill_keep = self.slots.groups[group].core["prefill_keep"]
        carrier = self.kept_len_carriers[group]
        if self.policy.merges_evicted:
            torch.ops.hae.prefill_merge_write_(layer.keys, layer.values, key_states, value_states, prefill_keep,
                                               carrier, self.prompt_pos)
        else:
            torch.ops.hae.prefill_write_(layer.keys, layer.values, key_states, value_states, prefill_keep, carrier,
                                         **layer.scale_arguments())
        return key_states, value_states

    def _check_prompt_tokens(self, layer_idx: int, key_states: torch.Tensor, expected: int) -> None:
        if key_states.shape[2] != expected:
            raise RuntimeError(
                f"HAECache: layer {layer_idx} sees {key_states.shape[2]} prompt tokens, expected {expected}; "
                "prune_hidden needs the model transformed by hae_fx.transform"
            )

    def _emit_prefill_plan(self, group: int) -> None:
        """Emit slot group `group`'s `hae::prefill_plan_` with the keys of the layers it plans from and no queries:
        the backend's plan pass wires in those layers' attention queries and scales and moves the node after the
        last of them."""
        planned = self.group_plan_layers[group]
        keys = [self._plan_keys[layer][0] for layer in planned]
        values = [self._plan_keys.pop(layer)[1] for layer in planned]
        kinds = [self.layers[layer].kind for layer in planned]
        torch.ops.hae.prefill_plan_(queries=[None] * len(keys), keys=keys, values=values, scales=[0.0] * len(keys),
                                    masks=[None] * len(keys),
                                    windows=[kind.span if kind.kind == SLIDING else 0 for kind in kinds],
                                    chunks=[kind.span if kind.kind == CHUNKED else 0 for kind in kinds],
                                    token_pos=self.prompt_pos, token_modality=self.prompt_modality,
                                    **self.slots.plan_arguments(group), kept=self.kept_len_carriers[group],
                                    config=self.config_key, group=group, groups=len(self.slots.groups),
                                    **self._plan_reduction())

    def _plan_reduction(self) -> dict[str, object]:
        """The prefill plan's arguments that average its head-averaged attention across tensor-parallel ranks; none
        in one process, or for a policy that decides per KV head (each head's rank decides alone)."""
        tp = self.tensor_parallel
        if tp is None or self.policy.head_axis:
            return {}
        return {"tp_group": tp.group_name, "tp_degree": tp.degree}

    def _chunk_write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """A follow-up turn's chunk (`hae_fx.turns`, for a policy that never evicts): at layer 0 its tokens take the
        lowest free slots, in order, as one decode step after another would; each layer writes its keys there and
        returns the slots, whose attention (`hae::slot_attention`) is causal by slot position."""
        if layer_idx == 0:
            free_first = torch.argsort((self.slot_pos >= 0).to(torch.int8), dim=-1, stable=True)
            self._chunk_slots = free_first[:, :key_states.shape[2]]
            self.slots.place_chunk(self._chunk_slots, TEXT)
        layer = self.layers[layer_idx]
        torch.ops.hae.slot_write_(layer.keys, layer.values, key_states, value_states, self._chunk_slots,
                                  **layer.scale_arguments())
        return layer.decode_view()

    def _decode_write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if layer_idx == 0:
            self._plan_decode_step()
        layer = self.layers[layer_idx]
        group = self.slots.groups[self.layer_group[layer_idx]]
        slot = ring_decode_slot(layer.ring_pos, self.seen, layer.kind) if layer.kind.windowed else \
            group.core["step_slot"]
        torch.ops.hae.slot_write_(layer.keys, layer.values, key_states, value_states, slot.unsqueeze(-1),
                                  **layer.scale_arguments())
        if not layer.kind.windowed:
            self._step_values[layer_idx] = value_states
        if layer_idx == self.last_global_layer:
            values, self._step_values = self._step_values, {}
            for index, members in enumerate(self.group_members):
                self.policy.after_decode_write(self.slots.state(index), self.slots.groups[index].core["step_slot"],
                                               [values[layer] for layer in members if layer in values])
        return layer.decode_view()

    def _plan_decode_step(self) -> None:
        """Choose each sequence's slot for the new token (the policy's bookkeeping first) and record the token in
        the slot metadata."""
        slots = []
        for index, group in enumerate(self.slots.groups):
            slot = self.policy.decode_slot(self.slots.state(index))
            group.core["step_slot"].copy_(slot)
            slots.append(slot)
        self.slots.place(slots, TEXT)


def kept_positions(cache: HAECache, layer: int = 0) -> list[list[int]]:
    """Sorted logical positions each sequence holds now in `layer`'s slots (every global layer's, unless the policy
    gives layers capacities of their own; any of its KV heads', for a policy with a head axis); a debugging and
    testing aid; syncs with the device."""
    return _sorted_positions(cache.slots.groups[cache.layer_group[layer]].core["slot_pos"])


def binned_positions(cache: HAECache) -> list[list[int]]:
    """Sorted logical positions each sequence holds evicted but not yet freed (a policy's recycle bin) now (syncs
    with the device)."""
    return _sorted_positions(torch.where(cache.policy.binned(cache.slots.state()), cache.slot_pos, -1))


def _sorted_positions(slot_pos: torch.Tensor) -> list[list[int]]:
    return [sorted({p for p in row if p >= 0}) for row in slot_pos.flatten(1).cpu().tolist()]
