"""Batch buckets: a transformed model compiles one prefill and one decode graph per power-of-two batch size.

A cache's buffers are static-address graph inputs of one batch size, so every batch size would allocate its own
cache and compile its own prefill and decode graphs (50-84 s each on CPU). The transformed `generate` pads the batch
to the next power of two instead (`bucket`): 3 rows run as 4, 5 to 8 as 8. The rows of padding

- hold one real token (the last column, left-padded like any short row), so each of their attention rows has a key
  and nothing in them becomes NaN; on a follow-up turn, the turn's columns are real too, as the turn requires;
- carry no image token, so the model's image features still match its image tokens (a LLaVA-style model scatters
  the features of the real rows' images into the real rows);
- count as finished from the first step (`PaddingRowsDone`), so they never keep generation going;
- are dropped from every output but the cache, which holds the bucket's rows and is the next turn's.

docs/design.md has the measurements that chose buckets over a dynamic batch dimension.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

#: per-token forward arguments `[B, T, ...]` padded with zero rows (besides input_ids, inputs_embeds and the mask)
PER_TOKEN = ("token_type_ids", "mm_token_type_ids", "position_ids")


def bucket(batch: int) -> int:
    """The batch size `batch` rows run as: the next power of two."""
    return 1 << (batch - 1).bit_length()


class PaddingRowsDone(StoppingCriteria):
    """Rows `batch` and after (padding) are finished from the first step; the real rows stop as they would alone."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.arange(input_ids.shape[0], device=input_ids.device) >= self.batch


def pad_request(args: tuple, kwargs: dict[str, Any], batch: int, rows: int, tokens_seen: int,
                image_token_id: int | None) -> tuple[tuple, dict[str, Any]]:
    """`generate(*args, **kwargs)` of `batch` rows as `rows` rows; `tokens_seen` columns the cache has consumed (0
    for a first prompt)."""
    args, kwargs = list(args), dict(kwargs)
    in_args = bool(args) and isinstance(args[0], torch.Tensor)
    prompt = args[0] if in_args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    length = prompt.shape[1]
    extra = rows - batch
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=prompt.device)
    padding_mask = torch.zeros(extra, length, dtype=mask.dtype, device=mask.device)
    padding_mask[:, tokens_seen if tokens_seen else length - 1:] = 1
    kwargs["attention_mask"] = torch.cat([mask, padding_mask])
    if "inputs_embeds" in kwargs and not in_args and kwargs.get("input_ids") is None:
        kwargs["inputs_embeds"] = _pad_rows(kwargs["inputs_embeds"], extra, 0)
    else:
        filler = int(prompt[0, -1])
        if filler == image_token_id:
            filler = 0
        padded = _pad_rows(prompt, extra, filler)
        if in_args:
            args[0] = padded
        else:
            kwargs["input_ids"] = padded
    for name in PER_TOKEN:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, length):
            kwargs[name] = _pad_rows(value, extra, 0)
    criteria = list(kwargs.get("stopping_criteria") or [])
    kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, PaddingRowsDone(batch)])
    return tuple(args), kwargs


def _pad_rows(tensor: torch.Tensor, extra: int, fill: float) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_full((extra, *tensor.shape[1:]), fill)])


def drop_padding(output: Any, batch: int) -> Any:
    """`generate`'s output (token ids, or a `ModelOutput` of sequences and per-step tuples) without the padding rows;
    a cache stays whole."""
    if isinstance(output, torch.Tensor):
        return output[:batch]
    if isinstance(output, (tuple, list)):
        return type(output)(drop_padding(item, batch) for item in output)
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        for name in list(output.keys()):
            if name != "past_key_values":
                output[name] = drop_padding(output[name], batch)
        return output
    return output
