"""Follow-up turns: continue a conversation on the cache a previous `generate` returned, already evicted.

`model.generate(input_ids=history + new_turn, past_key_values=returned_cache)` is how a chat UI asks its next
question. HF's `generate` slices off the tokens the cache has already seen (`HAECache.get_seq_length`, the tokens
each sequence has consumed) and calls the model once with the rest: the last answer token, which was sampled but
never fed back, and the new turn. `feed_turn` runs that chunk through the compiled decode step one token at a time.
So each token of the turn

- attends to the live slots and, causally, to the turn's tokens before it (each was written when it was fed);
- is written into a slot by the policy's decode rule, which evicts as needed (DDES for `hae`, the lowest score for
  `h2o` and `snapkv`, the oldest for `streaming`), adding its attention to the scores as any decode step does;

and the cache's memory never changes. Policies that read prompt attention at prefill (`hae`'s Dual-Attention
Pruning, `snapkv`'s observation window) do not re-run that rule on a follow-up: a turn's tokens are text, and
DAP prunes images; their decode rules decide which slots the turn's tokens take.

Feeding token by token reuses the one decode graph, so a turn of any length costs no compile; the price is one
decode step per token of the turn rather than one batched chunk (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import create_masks_for_generate

from hae_fx.cache import HAECache
from hae_fx.errors import HAECapacityError

#: forward arguments a decode step takes per token (sliced along their last dimension)
_PER_TOKEN = ("position_ids", "token_type_ids", "mm_token_type_ids")
#: forward arguments passed to every decode step unchanged
_PASSED = ("use_cache", "return_dict", "logits_to_keep", "output_hidden_states")


def feed_turn(model: torch.nn.Module, step: Callable[..., Any], cache: HAECache, kwargs: dict[str, Any],
              image_token_id: int | None) -> Any:
    """Feed a follow-up chunk (`kwargs` of the model's forward, `[B, n]` new tokens) through `step`, the compiled
    decode step, one token at a time; return the output of the last step with the logits of the whole chunk (kept
    as `logits_to_keep` says, as a forward over the chunk would)."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        raise HAECapacityError(
            "a follow-up turn on an HAECache needs input_ids (history + new turn); inputs_embeds are only accepted for "
            "the first prompt"
        )
    if image_token_id is not None and bool((input_ids == image_token_id).any()):
        raise HAECapacityError(
            "a follow-up turn on an HAECache can only add text: this turn holds image tokens, and the cache's decode "
            "step never runs the vision tower; start a new conversation (a fresh cache) with the new image"
        )
    batch, length = input_ids.shape
    logits = []
    output = None
    for index in range(length):
        position_kwargs = {name: _token_slice(kwargs[name], index) for name in _PER_TOKEN
                           if kwargs.get(name) is not None}
        token_kwargs = {name: kwargs[name] for name in _PASSED if name in kwargs}
        token_ids = _token_slice(input_ids, index)
        # the mask HF's generate builds for a decode step (the rewrite masks by slot position and drops its values;
        # building it the same way keeps the decode graph's inputs, so no recompile)
        mask = getattr(model, "create_masks_for_generate", create_masks_for_generate)(
            config=model.config, inputs_embeds=torch.empty((batch, 1, 0), dtype=model.dtype, device=input_ids.device),
            attention_mask=None, past_key_values=cache, position_ids=position_kwargs.get("position_ids"),
            token_type_ids=position_kwargs.get("token_type_ids"),
            mm_token_type_ids=position_kwargs.get("mm_token_type_ids"), is_first_iteration=False)
        cache.begin_decode_step()
        output = step(input_ids=token_ids, past_key_values=cache, attention_mask=mask, **position_kwargs,
                      **token_kwargs)
        logits.append(output.logits.clone())  # a replayed CUDA graph reuses its output buffers
    chunk_logits = torch.cat(logits, dim=1)
    keep = kwargs.get("logits_to_keep", 0)
    if isinstance(keep, int) and keep > 0:
        chunk_logits = chunk_logits[:, -keep:]
    output["logits"] = chunk_logits
    return output


def _token_slice(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """Token `index` along the last dimension, as a fresh contiguous tensor: a strided slice would fail the decode
    graph's stride guards (a recompile)."""
    return tensor[..., index:index + 1].clone(memory_format=torch.contiguous_format)
