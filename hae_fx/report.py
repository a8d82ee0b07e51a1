"""`hae_fx.report(cache)`: what an `HAECache` holds now, per sequence, and what it saves against a full cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_fx.cache import VISUAL, HAECache


@dataclass(frozen=True)
class SequenceReport:
    """One sequence of the batch.

    Attributes:
        tokens_seen: prompt plus generated tokens so far (what a full cache would hold).
        kept_visual, kept_text: tokens in the cache by modality, bin included (for a policy whose KV heads keep
            tokens of their own: the heads' mean of all kept and of visual ones, rounded down; text the rest).
        binned: tokens waiting in the recycle bin (evicted, still attended).
        prompt_visual: visual tokens the prompt had; `kept_visual / prompt_visual` is what survived.
    """

    tokens_seen: int
    kept_visual: int
    kept_text: int
    binned: int
    prompt_visual: int

    @property
    def kept(self) -> int:
        return self.kept_visual + self.kept_text


@dataclass(frozen=True)
class CacheReport:
    """Per-sequence occupancy and the KV memory of the cache against a full cache of the same length.

    Attributes:
        policy, capacity: from the cache's config; bin_size: the policy's recycle bin (0 for none).
        sequences: one `SequenceReport` per sequence.
        kv_bytes: bytes of the cache's K/V buffers (fixed at construction; 8-bit values and their scales when
            `kv_dtype` quantizes them).
        full_kv_bytes: bytes a full cache in the same storage would need for the longest sequence seen so far.
        kv_dtype: the config's `kv_dtype` (None: the model's dtype).
    """

    policy: str
    capacity: int
    bin_size: int
    sequences: tuple[SequenceReport, ...]
    kv_bytes: int
    full_kv_bytes: int
    kv_dtype: str | None = None

    @property
    def kv_saving(self) -> float:
        """Fraction of a full cache's KV bytes this cache does not need (negative when it is larger)."""
        return 1.0 - self.kv_bytes / self.full_kv_bytes if self.full_kv_bytes else 0.0

    def __str__(self) -> str:
        bin_note = f", bin {self.bin_size}" if self.bin_size else ""
        lines = [f"HAECache policy={self.policy!r}, capacity {self.capacity} slots{bin_note}",
                 "  seq  seen  kept  visual (of prompt)  text  in bin"]
        for index, seq in enumerate(self.sequences):
            lines.append(f"  {index:>3}  {seq.tokens_seen:>4}  {seq.kept:>4}  {seq.kept_visual:>6} "
                         f"({seq.prompt_visual:>6})  {seq.kept_text:>4}  {seq.binned:>6}")
        storage = f" ({self.kv_dtype} values + scales)" if self.kv_dtype else ""
        lines.append(f"  KV bytes {self.kv_bytes:,} vs full cache {self.full_kv_bytes:,} "
                     f"({self.kv_saving:.1%} saved){storage}")
        return "\n".join(lines)


def report(cache: HAECache) -> CacheReport:
    """Describe `cache` now (reads its metadata back from the device once)."""
    occupied = cache.slot_pos >= 0
    visual = occupied & (cache.modality == VISUAL)
    binned = occupied & cache.policy.binned(cache.slots.state())
    heads = occupied[0].numel() // occupied.shape[-1]  # KV heads with index sets of their own (1: one shared set)
    kept, kept_visual, kept_binned = (mask.flatten(1).sum(-1) // heads for mask in (occupied, visual, binned))
    counts = torch.stack([kept_visual, kept - kept_visual, kept_binned, cache.seen], dim=-1).cpu().tolist()
    sequences = tuple(
        SequenceReport(tokens_seen=seen, kept_visual=kept_visual, kept_text=kept_text, binned=binned,
                       prompt_visual=len(prompt_visual))
        for (kept_visual, kept_text, binned, seen), prompt_visual in zip(counts, cache.prompt_visual_positions,
                                                                          strict=True)
    )
    longest = max(seq.tokens_seen for seq in sequences)
    return CacheReport(policy=cache.config.policy, capacity=cache.capacity, bin_size=cache.policy.bin_size,
                       sequences=sequences, kv_bytes=cache.kv_nbytes,
                       full_kv_bytes=cache.kv_bytes_per_token * longest, kv_dtype=cache.config.kv_dtype)
