"""`HAECache`: an HF `Cache` whose memory is fixed at construction, whatever the prompt or generation length.

Per layer it holds `keys`/`values` buffers `[B, Hkv, C, D]`; all layers share one set of slot metadata, which
`hae_fx.slots.SlotBuffers` owns (names, allocation, reset, the prefill plan's arguments). Every tensor is
allocated once, before any compile, and marked with `mark_static_address`, so compiled graphs read them as
fixed-address inputs that CUDA graphs can capture.

The cache's `update` decides where new keys go (through the policy) and writes them with `hae::slot_write_`; the
prefill's keep set comes from `hae::prefill_plan_`, the policy's decision as one graph node.
It returns the fresh keys during prefill (prefill attends over the whole prompt, as HF does) and the slot
buffers during decode, where the backend's passes rewrite the attention over them into `hae::slot_attention`.
Driving it without those passes would be silently wrong, so it refuses to decode outside `torch.compile`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hae_fx.config import PolicyConfig
from hae_fx.errors import HAECapacityError
from hae_fx.modality import TEXT, VISUAL
from hae_fx.policies import policy_for
from hae_fx.slots import CacheRole, SlotBuffers, role_of, static_buffer

__all__ = ["TEXT", "VISUAL", "CacheRole", "HAECache", "HAELayer", "binned_positions", "kept_positions", "role_of"]


class HAELayer(CacheLayerMixin):
    """One decoder layer's K/V slots; the slot metadata lives on the owning `HAECache`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: HAECache, layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("HAECache allocates its buffers up front; call HAECache.allocate(...) before use")

    def allocate(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = self.cache.capacity
        shape = (batch, kv_heads, capacity, head_dim)
        config = self.cache.config
        self.keys = static_buffer(torch.zeros(shape, dtype=dtype, device=device),
                                  CacheRole("keys", self.layer_idx, config))
        self.values = static_buffer(torch.zeros(shape, dtype=dtype, device=device),
                                    CacheRole("values", self.layer_idx, config))
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.cache.write_layer(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Prefill attends over the fresh prompt keys; decode's mask is rebuilt by hae::slot_attention from
        # slot_pos, so the size here only has to be well formed.
        return (query_length, 0) if not self.cache.prefilled else (self.cache.capacity, 0)

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cache.seen.amax()

    def get_max_length(self) -> int:
        return self.cache.capacity

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
    """

    def __init__(self, config: PolicyConfig, *, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        layers = [HAELayer(self, i) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.policy = policy_for(config)
        self.capacity = config.capacity
        self.batch = batch
        device = torch.device(device)
        for layer in layers:
            layer.allocate(batch, kv_heads, head_dim, dtype, device)
        self.slots = SlotBuffers(config, self.policy, batch, device)
        #: the layers whose prompt attention the policy's prefill plan reads, and the one that emits the plan
        self.plan_layers = self.policy.prefill_layers(num_layers)
        self.plan_emitted_at = max(self.plan_layers, default=0)
        self.pruned_after = self.policy.pruned_after()
        self.config_key = config.key()  # computed here: JSON encoding cannot be traced
        self._plan_keys: dict[int, torch.Tensor] = {}  # prompt keys of `plan_layers`, while prefill is traced
        # prompt metadata staged by `begin_prefill`, read by the compiled prefill graph
        self.prompt_pos: torch.Tensor | None = None
        self.prompt_modality: torch.Tensor | None = None
        self.prefill_kept_len = 0  # static number of prompt tokens the prefill writes (slots 0..K-1)
        #: per sequence, the logical positions of the prompt's visual tokens (for `hae_fx.viz`, `hae_fx.report`)
        self.prompt_visual_positions: list[list[int]] = [[] for _ in range(batch)]
        #: per sequence, the positions the prefill kept (filled when the prefill ends; `hae_fx.viz` draws them)
        self.prefill_kept: list[list[int]] = [[] for _ in range(batch)]
        self.prefilled = False
        self.tokens_seen = 0  # Python-side mirror of max(seen), for checks made before each step

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
        """A cache shaped for `model`'s text decoder, on its device and in its dtype."""
        from hae_fx.models import family_of

        family = family_of(model)
        kv_heads, head_dim = family.kv_geometry(model)
        return cls(config, num_layers=family.num_layers(model), batch=batch, kv_heads=kv_heads,
                   head_dim=head_dim, dtype=model.dtype, device=model.device)

    # -- memory ------------------------------------------------------------------------------------------------
    def buffers(self) -> list[torch.Tensor]:
        """Every tensor this cache allocated (K/V of every layer and the slot metadata)."""
        kv = [t for layer in self.layers for t in (layer.keys, layer.values)]
        return kv + self.slots.tensors()

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache allocated: fixed at construction."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    @property
    def kv_nbytes(self) -> int:
        """Bytes of the K/V buffers alone."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))

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
        self.policy.note_prompt(visual_tokens)

    def end_prefill(self) -> None:
        self.prefilled = True
        self.prompt_pos = self.prompt_modality = None
        self.tokens_seen = int(self.seen.amax())
        self.prefill_kept = kept_positions(self)

    def begin_decode_step(self) -> None:
        """Checks made before each decode step: the cache is prefilled, and `full` still has room."""
        if not self.prefilled:
            raise RuntimeError("HAECache: decode before prefill; the first forward must carry the whole prompt")
        if not self.policy.evicts and self.tokens_seen >= self.capacity:
            raise HAECapacityError(
                f"policy 'full' cannot hold token {self.tokens_seen + 1}: capacity is {self.capacity}; raise "
                "HAEConfig.capacity to cover prompt + max_new_tokens, or use an evicting policy"
            )
        self.tokens_seen += 1

    def reset(self) -> None:
        for layer in self.layers:
            layer.keys.zero_()
            layer.values.zero_()
        self.slots.reset()
        self.prompt_visual_positions = [[] for _ in range(self.batch)]
        self.prefill_kept = [[] for _ in range(self.batch)]
        self.prefilled = False
        self.tokens_seen = 0

    # -- traced into the compiled graphs ----------------------------------------------------------------------
    def write_layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.prefilled:
            return self._prefill_write(layer_idx, key_states, value_states)
        if key_states.shape[2] != 1:
            raise HAECapacityError(
                f"HAECache decodes one token per step, got {key_states.shape[2]}; multi-token steps (speculative or "
                "chunked decoding) are not supported"
            )
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                "HAECache decode must run through hae_fx.transform (or torch.compile(backend='hae')): the attention "
                "over its slots is rewritten by the hae passes"
            )
        return self._decode_write(layer_idx, key_states, value_states)

    def _prefill_write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.prompt_pos is None:
            raise RuntimeError("HAECache: prefill without begin_prefill(); use the model transformed by hae_fx")
        kept = self.prefill_kept_len
        layer = self.layers[layer_idx]
        if layer_idx in self.plan_layers:
            self._plan_keys[layer_idx] = key_states
        if layer_idx == self.plan_emitted_at:
            self._emit_prefill_plan()
        if self.pruned_after is not None and layer_idx > self.pruned_after:
            # hae_fx.pruning gathered this layer's inputs to the kept tokens, already in slot order
            if key_states.shape[2] != kept:
                raise RuntimeError(
                    f"HAECache: layer {layer_idx} sees {key_states.shape[2]} prompt tokens, expected the {kept} "
                    "kept at prefill; prune_hidden needs the model transformed by hae_fx.transform"
                )
            slots = torch.arange(kept, device=key_states.device).expand(self.batch, kept)
            torch.ops.hae.slot_write_(layer.keys, layer.values, key_states, value_states, slots)
            return key_states, value_states
        torch.ops.hae.prefill_write_(layer.keys, layer.values, key_states, value_states, self.prefill_keep, kept)
        return key_states, value_states

    def _emit_prefill_plan(self) -> None:
        """Emit `hae::prefill_plan_` with the keys of the layers the policy reads and no queries: the backend's
        plan pass wires in those layers' attention queries and scales and moves the node after the last of them."""
        keys = [self._plan_keys[layer] for layer in self.plan_layers]
        self._plan_keys = {}
        torch.ops.hae.prefill_plan_(queries=[None] * len(keys), keys=keys, scales=[0.0] * len(keys),
                                    token_pos=self.prompt_pos, token_modality=self.prompt_modality,
                                    **self.slots.plan_arguments(), kept_len=self.prefill_kept_len,
                                    config=self.config_key)

    def _decode_write(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if layer_idx == 0:
            self._plan_decode_step()
        layer = self.layers[layer_idx]
        torch.ops.hae.slot_write_(layer.keys, layer.values, key_states, value_states,
                                  self.slots.step_slot.view(-1, 1))
        return layer.keys, layer.values

    def _plan_decode_step(self) -> None:
        """Choose each sequence's slot for the new token (the policy's bookkeeping first) and record the token in
        the slot metadata."""
        slot = self.policy.decode_slot(self.slots.state())
        self.slots.step_slot.copy_(slot)
        self.slots.place(slot, TEXT)


def kept_positions(cache: HAECache) -> list[list[int]]:
    """Sorted logical positions each sequence holds now (a debugging and testing aid; syncs with the device)."""
    return _sorted_positions(cache.slot_pos)


def binned_positions(cache: HAECache) -> list[list[int]]:
    """Sorted logical positions each sequence holds evicted but not yet freed (a policy's recycle bin) now (syncs
    with the device)."""
    return _sorted_positions(torch.where(cache.policy.binned(cache.slots.state()), cache.slot_pos, -1))


def _sorted_positions(slot_pos: torch.Tensor) -> list[list[int]]:
    return [sorted(p for p in row if p >= 0) for row in slot_pos.cpu().tolist()]
