"""Independent eager oracles of the eviction policies, written from their specifications.

They share no code with hae_fx: plain Python lists decide which logical positions each sequence keeps, and
HF's own eager model with a `DynamicCache` computes the logits, attending only to the kept positions through
an explicit 4-D mask. Keys are cached after RoPE at their true positions, so "attend over the kept positions
of a full cache" is exactly what an evicting cache must compute.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache


def streaming_keep(seen: list[int], capacity: int, sinks: int) -> list[int]:
    """StreamingLLM with a fixed capacity: the first `sinks` positions and the most recent others."""
    if len(seen) <= capacity:
        return list(seen)
    return sorted(seen[:sinks] + seen[len(seen) - (capacity - sinks):])


def full_keep(seen: list[int], capacity: int, sinks: int) -> list[int]:
    return list(seen)


KEEP_RULES = {"streaming": streaming_keep, "full": full_keep}


def decode_masks(model, kept: list[int], position: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive mask(s) of the decode query at `position`: global layers see the `kept` positions whatever their
    kind; windowed layers, whatever the policy evicted, see the last `sliding_window` positions (on the layers the
    config's `layer_types` mark sliding, or on all layers when it has none) or the positions of the query's chunk of
    `attention_chunk_size` (layers marked chunked)."""
    def allowing(positions) -> torch.Tensor:
        mask = torch.full((1, 1, 1, position + 1), float("-inf"))
        mask[..., list(positions)] = 0.0
        return mask

    text = model.config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        return allowing(kept if window is None else range(max(position - window + 1, 0), position + 1))
    masks = {"full_attention": allowing(kept)}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = allowing(range(max(position - window + 1, 0), position + 1))
    if "chunked_attention" in layer_types:
        chunk = text.attention_chunk_size
        masks["chunked_attention"] = allowing(range(position // chunk * chunk, position + 1))
    return masks


def run_oracle(model, inputs: dict[str, torch.Tensor], *, policy: str, capacity: int, sinks: int,
               new_tokens: int, cache: Cache | None = None
               ) -> tuple[list[list[int]], list[list[list[int]]], torch.Tensor]:
    """Greedy generation of one unpadded sequence under `policy`, eagerly, in `cache` (a `DynamicCache` when None;
    tests/test_quantization.py passes one that stores its keys quantized).

    Returns `(tokens, kept_per_step, logits)`: the generated ids, the kept positions after prefill and after
    every decode step, and the logits of every generated token (`[new_tokens, vocab]`).
    """
    keep_rule = KEEP_RULES[policy]
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1, "the oracle runs one sequence at a time"
    if cache is None:
        cache = DynamicCache()  # every layer keeps every key; the masks below say which ones a step may see
    prompt_len = input_ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=inputs.get("pixel_values"), past_key_values=cache,
                    use_cache=True)
    seen = list(range(prompt_len))
    kept = keep_rule(seen, capacity, sinks)
    kept_per_step = [kept]
    logits = [out.logits[0, -1]]
    tokens = [int(out.logits[0, -1].argmax())]
    for step in range(1, new_tokens):
        position = prompt_len + step - 1
        seen.append(position)
        kept = keep_rule(seen, capacity, sinks)
        kept_per_step.append(kept)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        attention_mask=decode_masks(model, kept, position),
                        position_ids=torch.tensor([[position]]), use_cache=True)
        logits.append(out.logits[0, -1])
        tokens.append(int(out.logits[0, -1].argmax()))
    return [tokens], kept_per_step, torch.stack(logits)
