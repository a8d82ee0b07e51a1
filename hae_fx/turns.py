"""Follow-up turns: continue a conversation on the cache a previous `generate` returned, already evicted.

`model.generate(input_ids=history + new_turn, past_key_values=returned_cache)` is how a chat UI asks its next
question. HF's `generate` slices off the tokens the cache has already seen (`HAECache.get_seq_length`, the tokens
each sequence has consumed) and calls the model once with the rest: the last answer token, which was sampled but
never fed back, and the new turn. `run_turn` runs that chunk one of two ways.

- **One chunk** (`chunk_applies`: a policy that never evicts, `full`, on a cache of global layers only): one compiled
  graph (`chunk_step`, its chunk length symbolic) takes the whole chunk, as HF's own forward does. Its tokens take
  the lowest free slots in order, as one decode step after another would place them; every layer writes them, then
  attends over the slots causally by slot position (`hae::slot_attention`: query `i` sees the live slots and the
  chunk's tokens up to its own).
- **Token by token** (`feed_turn`, every other case): each token goes through the compiled decode step, so each
  attends to the live slots and, causally, to the turn's tokens before it (each was written when it was fed), and
  is written into a slot by the policy's decode rule, which evicts as needed (DDES for `hae`, the lowest score for
  `h2o` and `snapkv`, the oldest for `streaming`), adding its attention to the scores as any decode step does.

Why evicting policies keep the token-by-token path: their victim for token `t + 1` depends on what token `t` did
(its attention's scores, or for `streaming` at least the slots `t` evicted), so a chunk written at once and attended
at once would let early tokens see keys that later tokens evict and would choose victims from other scores. Only a
cache that never evicts writes a chunk exactly as it would write its tokens one by one. Sliding-window rings are
overwritten by later tokens of a chunk that early tokens still see, so caches with windowed layers keep that path too.

Either way the cache's memory never changes. Policies that read prompt attention at prefill (`hae`'s Dual-Attention
Pruning, `snapkv`'s observation window) do not re-run that rule on a follow-up: a turn's tokens are text, and DAP
prunes images; their decode rules decide which slots the turn's tokens take.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import create_masks_for_generate

from hae_fx.cache import HAECache
from hae_fx.errors import HAECapacityError
from hae_fx.prompt_shapes import mark_length_dynamic

#: forward arguments a decode step takes per token (sliced along their last dimension)
_PER_TOKEN = ("position_ids", "token_type_ids", "mm_token_type_ids")
#: forward arguments passed to every decode step unchanged
_PASSED = ("use_cache", "return_dict", "logits_to_keep", "output_hidden_states")


def run_turn(model: torch.nn.Module, decode_step: Callable[..., Any], chunk_step: Callable[..., Any],
             cache: HAECache, kwargs: dict[str, Any], image_token_id: int | None) -> Any:
    """Run a follow-up chunk (`kwargs` of the model's forward, `[B, n]` new tokens, `n > 1`): in one `chunk_step`
    call where `chunk_applies`, else token by token through `decode_step`."""
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
    if not chunk_applies(cache):
        return feed_turn(model, decode_step, cache, kwargs)
    batch, length = input_ids.shape
    cache.begin_decode_step(length)  # `full` must have room for every token of the chunk
    chunk_kwargs = {name: value for name, value in kwargs.items() if name != "attention_mask"}
    chunk_kwargs["attention_mask"] = _step_mask(model, cache, batch, length, kwargs)
    mark_length_dynamic(list(chunk_kwargs.values()), length)
    cache.chunking = True
    try:
        return chunk_step(**chunk_kwargs)
    finally:
        cache.chunking = False


def chunk_applies(cache: HAECache) -> bool:
    """Whether a chunk written at once is written exactly as its tokens one by one (the module docstring says why
    only a cache that never evicts, of global layers only, is)."""
    return not cache.policy.evicts and len(cache.slots.groups) == 1 and \
        not any(layer.kind.windowed for layer in cache.layers)


def feed_turn(model: torch.nn.Module, step: Callable[..., Any], cache: HAECache, kwargs: dict[str, Any]) -> Any:
    """Feed a follow-up chunk through `step`, the compiled decode step, one token at a time; return the output of
    the last step with the logits of the whole chunk (kept as `logits_to_keep` says, as a forward over the chunk
    would)."""
    input_ids = kwargs["input_ids"]
    batch, length = input_ids.shape
    logits = []
    output = None
    for index in range(length):
        position_kwargs = {name: _token_slice(kwargs[name], index) for name in _PER_TOKEN
                           if kwargs.get(name) is not None}
        token_kwargs = {name: kwargs[name] for name in _PASSED if name in kwargs}
        token_ids = _token_slice(input_ids, index)
        mask = _step_mask(model, cache, batch, 1, position_kwargs)
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


def _step_mask(model: torch.nn.Module, cache: HAECache, batch: int, length: int, kwargs: dict[str, Any]) -> Any:
    """The mask HF's generate builds for a step of `length` new tokens over the cache's slots (the rewrite masks by
    slot position and drops its values; building it the same way keeps the step graph's inputs, so no recompile)."""
    device = cache.slot_pos.device
    return getattr(model, "create_masks_for_generate", create_masks_for_generate)(
        config=model.config, inputs_embeds=torch.empty((batch, length, 0), dtype=model.dtype, device=device),
        attention_mask=None, past_key_values=cache, position_ids=kwargs.get("position_ids"),
        token_type_ids=kwargs.get("token_type_ids"), mm_token_type_ids=kwargs.get("mm_token_type_ids"),
        is_first_iteration=False)


def _token_slice(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """Token `index` along the last dimension, as a fresh contiguous tensor: a strided slice would fail the decode
    graph's stride guards (a recompile)."""
    return tensor[..., index:index + 1].clone(memory_format=torch.contiguous_format)
