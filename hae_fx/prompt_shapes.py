"""One prefill graph for every prompt length: the prompt's length is a symbolic dimension of the prefill graph.

Before each compiled prefill call, `mark_prompt_dynamic` marks as dynamic every dimension of the language model's
inputs that is the prompt's length (token ids or embeddings, position ids, masks, token types, the cache's staged
positions and modality) and the kept length the policy chose (`HAECache.kept_len_carriers`). Dynamo then traces the
prefill once with those sizes as symbols and Inductor generates code for any value, so a new prompt length (or a
new number of kept tokens) reuses the graph instead of compiling another. docs/design.md has the measurements that
chose this over padding prompts to length buckets.

`maybe_mark_dynamic` rather than `mark_dynamic`: a dimension the graph must specialise (a length-1 prompt, or a
tensor dimension that merely equals the prompt length by coincidence, such as a hidden size) gets its own graph
instead of an error.
"""

from __future__ import annotations

from typing import Any

import torch

from hae_fx.cache import HAECache


def mark_prompt_dynamic(args: tuple, kwargs: dict[str, Any], cache: HAECache) -> None:
    """Mark the prompt-length dimensions of a prefill call's inputs (and the cache's staged prompt) dynamic."""
    if cache.prompt_pos is None:
        return
    mark_length_dynamic([*args, *kwargs.values()], cache.prompt_pos.shape[1])
    torch._dynamo.maybe_mark_dynamic(cache.prompt_pos, 1)
    torch._dynamo.maybe_mark_dynamic(cache.prompt_modality, 1)
    for carrier in cache.kept_len_carriers:
        torch._dynamo.maybe_mark_dynamic(carrier, 1)


def mark_length_dynamic(values: list[Any], length: int) -> None:
    """Mark dynamic every dimension but the first of the tensors among `values` (inside dicts, lists and tuples) that
    is `length` long: a prompt's, or a follow-up chunk's (`hae_fx.turns`)."""
    for tensor in _tensors(values):
        for dim in range(1, tensor.dim()):  # dim 0 is the batch (or mRoPE's position components)
            if tensor.shape[dim] == length:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def _tensors(values: list[Any]) -> list[torch.Tensor]:
    """The tensors among `values`, looking inside dicts, lists and tuples (HF's per-layer-type mask dicts)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found += _tensors(list(value.values()))
        elif isinstance(value, (list, tuple)):
            found += _tensors(list(value))
    return found
