"""An independent eager runner for score-based eviction rules, and the harness that holds hae_fx to it.

It shares no code with hae_fx. A rule (one per policy, in that policy's test module, written from its paper) decides
with plain Python sets and dicts which logical positions one unpadded sequence keeps. HF's own eager model with a
`DynamicCache` computes logits and attention probabilities: the cache holds every position (keys after RoPE at their
true positions), and an explicit 4-D additive mask lets each new token attend only to the kept ones, which is what
an evicting cache must compute. Attention rows are averaged over query heads, then over layers, the reading every
hae_fx policy that keeps one index set for all heads and layers uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.cache import kept_positions
from hae_fx.models.llava import tiny_llava
from tests.conftest import llava_inputs, unpadded


class Rule(Protocol):
    """A policy's eviction rule over one sequence. `attention[l]` is layer `l`'s `[T, T]` head-averaged prompt
    attention; `visual[j]` says whether prompt token `j` is an image token; `seen` is the new token's position.

    A rule with a `prune_after` layer index decides right after that layer's attention, from layers
    `0..prune_after`, and the later layers compute as if the tokens it drops were gone (hidden-state pruning).
    A rule with `per_head = True` gets each layer's `[H, T, T]` prompt attention, not its head mean; a rule with an
    `observe_values(values)` method gets, before its prefill and after every decode step, each layer's cached values
    `[Hkv, n, D]` of every position so far; a rule with a `merge(keys, values, kept)` method may rewrite each layer's
    cached `[Hkv, T, D]` prompt keys and values in place once it has chosen the `kept` positions."""

    def prefill(self, attention: list[torch.Tensor], visual: list[bool], capacity: int) -> dict[int, float]:
        """The kept positions and the score each starts with."""

    def victim(self, scores: dict[int, float], seen: int) -> int:
        """The kept position a new token replaces when the cache is full."""

    def attended(self, scores: dict[int, float], row: list[float]) -> None:
        """Update the kept positions' scores with the new token's attention `row` (over all positions)."""


@dataclass
class OracleRun:
    tokens: list[int]  # every turn's generated tokens, in order
    kept: list[list[int]]  # after prefill (or a follow-up turn's last token), then after each decode step's placement
    logits: torch.Tensor


def _mean_heads(weights: torch.Tensor) -> torch.Tensor:
    return weights[0].float().mean(dim=0)


def run_rule(model, inputs: dict[str, torch.Tensor], rule: Rule, *, capacity: int, new_tokens: int,
             turns: tuple[tuple[list[int], int], ...] = ()) -> OracleRun:
    """Greedy generation of one unpadded sequence under `rule` (`model`: HF LLaVA with eager attention).

    `turns`: follow-up turns, each `(new token ids, tokens to generate)`. A follow-up feeds the previous turn's last
    generated token, then the turn's ids, one decode step each under the rule (the rule evicts as at decode); the
    last of them gives the turn's first generated token."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1, "the oracle runs one sequence at a time"
    prompt_len = input_ids.shape[1]
    visual = (input_ids[0] == model.config.image_token_id).tolist()
    cache = DynamicCache(config=model.config)
    out, scores = _prefill(model, input_ids, inputs.get("pixel_values"), cache, rule, visual, capacity)
    assert len(scores) == min(prompt_len, capacity)
    if hasattr(rule, "merge"):
        for layer in cache.layers:
            rule.merge(layer.keys[0], layer.values[0], sorted(scores))
    kept, logits, tokens = [sorted(scores)], [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
    position = prompt_len
    observe_values = getattr(rule, "observe_values", None)

    def feed(token: int) -> torch.Tensor:
        nonlocal position
        if len(scores) >= capacity:
            del scores[rule.victim(scores, position)]
        scores[position] = 0.0
        mask = torch.full((1, 1, 1, position + 1), float("-inf"))
        mask[..., sorted(scores)] = 0.0
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, attention_mask=mask,
                        position_ids=torch.tensor([[position]]), use_cache=True, output_attentions=True)
        rows = torch.stack([_mean_heads(w)[-1] for w in out.attentions]).mean(dim=0)
        if observe_values is not None:
            observe_values(_cached_values(cache))
        rule.attended(scores, rows.tolist())
        position += 1
        return out.logits[0, -1]

    for turn_ids, turn_tokens in ((None, new_tokens), *turns):
        fed = [] if turn_ids is None else [tokens[-1], *turn_ids]
        for index in range(len(fed) + turn_tokens - 1):
            step_logits = feed(fed[index] if index < len(fed) else tokens[-1])
            if index >= len(fed) - 1:  # a generated token: the turn's last fed one, then every decode step
                kept.append(sorted(scores))
                logits.append(step_logits)
                tokens.append(int(step_logits.argmax()))
    return OracleRun(tokens=tokens, kept=kept, logits=torch.stack(logits))


def _cached_values(cache: DynamicCache) -> list[torch.Tensor]:
    return [layer.values[0].float() for layer in cache.layers]


def _prefill(model, input_ids, pixel_values, cache, rule: Rule, visual: list[bool], capacity: int):
    """The prompt forward; returns its output and the rule's kept positions with their scores."""
    layers = model.model.language_model.layers
    prompt_len = input_ids.shape[1]
    prune_after = getattr(rule, "prune_after", None)
    decided: dict[str, dict[int, float]] = {}
    captured: list[torch.Tensor] = []

    per_head = getattr(rule, "per_head", False)

    def capture(module, args, output) -> None:
        captured.append(output[1][0].float() if per_head else _mean_heads(output[1]))
        if len(captured) - 1 == prune_after:
            decided["scores"] = rule.prefill(captured, visual, capacity)

    def mask_pruned(module, args, kwargs):
        kept = torch.zeros(prompt_len, dtype=torch.bool)
        kept[sorted(decided["scores"])] = True
        see = (torch.ones(prompt_len, prompt_len, dtype=torch.bool).tril() & kept) | torch.eye(prompt_len,
                                                                                                dtype=torch.bool)
        kwargs["attention_mask"] = torch.zeros(prompt_len, prompt_len).masked_fill(~see, float("-inf"))[None, None]
        return args, kwargs

    handles = [layer.self_attn.register_forward_hook(capture) for layer in layers]
    if prune_after is not None:
        later = layers[prune_after + 1:]
        handles += [layer.register_forward_pre_hook(mask_pruned, with_kwargs=True) for layer in later]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixel_values, past_key_values=cache, use_cache=True,
                        output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    if prune_after is not None:
        return out, decided["scores"]
    if hasattr(rule, "observe_values"):
        rule.observe_values(_cached_values(cache))
    return out, rule.prefill(captured, visual, capacity)


def lowest(scores: dict[int, float], candidates: list[int]) -> int:
    """The candidate with the smallest score, ties to the lowest position."""
    return min(candidates, key=lambda j: (scores[j], j))


def unprotected(positions, seen: int, sinks: int, window: int) -> list[int]:
    return [j for j in positions if j >= sinks and j < seen - window]


class _RecordKept(LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.kept = cache, []

    def __call__(self, input_ids, scores):
        self.kept.append(kept_positions(self.cache))
        return scores


def model_for(seed: int, **kwargs):
    """A tiny LLaVA whose random attention is spread out enough for eviction to have real choices."""
    return tiny_llava(seed=seed, initializer_range=0.2, **kwargs)


def check_against_rule(config, make_rule, *, seed: int, new_tokens: int = 100) -> list[OracleRun]:
    """Generate a left-padded batch of 2 under `config` (eager-reference path) and under the oracle `make_rule()`
    per sequence; the kept positions after prefill and every step, and the tokens, must be identical."""
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=seed)
    recorder = _RecordKept(hae_fx.HAECache.for_model(model, config, batch=2))
    out = model.generate(**inputs, past_key_values=recorder.cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, logits_processor=LogitsProcessorList([recorder]))
    reference = model_for(seed, attn_implementation="eager")
    width = inputs["input_ids"].shape[1]
    runs = []
    for row in range(2):
        sequence = unpadded(inputs, row)
        run = run_rule(reference, sequence, make_rule(), capacity=config.capacity, new_tokens=new_tokens)
        assert [kept[row] for kept in recorder.kept] == run.kept, f"sequence {row}"
        assert out.sequences[row, width:].tolist() == run.tokens, f"sequence {row}"
        torch.testing.assert_close(torch.stack([step[row] for step in out.logits]), run.logits, atol=1e-4,
                                   rtol=1e-4)
        runs.append(run)
    return runs


def victims(run: OracleRun) -> list[int]:
    """The positions each decode step evicted (steps that evicted nothing are left out)."""
    return [gone for before, after in zip(run.kept, run.kept[1:], strict=False) for gone in set(before) - set(after)]


def evicts_by_score(run: OracleRun, sinks: int) -> bool:
    """Whether some step evicted a token other than the oldest unprotected one (the rule is not recency)."""
    steps = zip(run.kept, run.kept[1:], strict=False)
    return any(set(before) - set(after) != {min(j for j in before if j >= sinks)} for before, after in steps
               if set(before) - set(after))


@dataclass
class LayeredRun:
    tokens: list[int]
    kept: list[list[list[int]]]  # per layer: after prefill, then after each decode step's placement
    logits: torch.Tensor


def run_layer_rules(model, inputs: dict[str, torch.Tensor], rules: list[Rule], capacities: list[int], *,
                    new_tokens: int) -> LayeredRun:
    """Greedy generation of one unpadded sequence where layer `l` keeps its own positions under `rules[l]`, with
    `capacities[l]` slots, from its own head-averaged attention only. Each layer's new token attends to that
    layer's kept positions (a per-layer 4-D mask, given to each decoder layer by a hook)."""
    input_ids = inputs["input_ids"]
    assert input_ids.shape[0] == 1, "the oracle runs one sequence at a time"
    layers = model.model.language_model.layers
    prompt_len = input_ids.shape[1]
    visual = (input_ids[0] == model.config.image_token_id).tolist()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=inputs.get("pixel_values"), past_key_values=cache,
                    use_cache=True, output_attentions=True)
    scores = [rule.prefill([_mean_heads(out.attentions[layer])], visual, capacity)
              for layer, (rule, capacity) in enumerate(zip(rules, capacities, strict=True))]
    kept = [[sorted(layer_scores)] for layer_scores in scores]
    logits, tokens = [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
    masks: list[torch.Tensor] = []
    handles = per_layer_masks(layers, masks)
    try:
        for step in range(1, new_tokens):
            position = prompt_len + step - 1
            masks.clear()
            for layer, (rule, capacity) in enumerate(zip(rules, capacities, strict=True)):
                if len(scores[layer]) >= capacity:
                    del scores[layer][rule.victim(scores[layer], position)]
                scores[layer][position] = 0.0
                kept[layer].append(sorted(scores[layer]))
                mask = torch.full((1, 1, 1, position + 1), float("-inf"))
                mask[..., sorted(scores[layer])] = 0.0
                masks.append(mask)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                            attention_mask=masks[0], position_ids=torch.tensor([[position]]), use_cache=True,
                            output_attentions=True)
            for layer, rule in enumerate(rules):
                rule.attended(scores[layer], _mean_heads(out.attentions[layer])[-1].tolist())
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return LayeredRun(tokens=tokens, kept=kept, logits=torch.stack(logits))


class _RecordKeptPerLayer(LogitsProcessor):
    def __init__(self, cache, layers: int):
        self.cache, self.layers, self.kept = cache, layers, []

    def __call__(self, input_ids, scores):
        self.kept.append([kept_positions(self.cache, layer) for layer in range(self.layers)])
        return scores


def check_against_layer_rules(config, make_rule, capacities: list[int], *, seed: int,
                              new_tokens: int = 100) -> list[LayeredRun]:
    """`check_against_rule` for a policy whose layers keep index sets of their own: `make_rule(l)` is layer `l`'s
    rule, `capacities` the layers' slots. Kept positions of every layer after prefill and every step, tokens and
    logits must be identical, and each layer's K/V buffers must hold exactly its capacity."""
    model = hae_fx.transform(model_for(seed), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=seed)
    cache = hae_fx.HAECache.for_model(model, config, batch=2)
    assert [layer.keys.shape[2] for layer in cache.layers] == capacities
    recorder = _RecordKeptPerLayer(cache, len(capacities))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, return_dict_in_generate=True, output_logits=True,
                         logits_processor=LogitsProcessorList([recorder]))
    reference = model_for(seed, attn_implementation="eager")
    width = inputs["input_ids"].shape[1]
    runs = []
    for row in range(2):
        sequence = unpadded(inputs, row)
        rules = [make_rule(layer) for layer in range(len(capacities))]
        run = run_layer_rules(reference, sequence, rules, capacities, new_tokens=new_tokens)
        for layer in range(len(capacities)):
            assert [kept[layer][row] for kept in recorder.kept] == run.kept[layer], f"sequence {row}, layer {layer}"
        assert out.sequences[row, width:].tolist() == run.tokens, f"sequence {row}"
        torch.testing.assert_close(torch.stack([step[row] for step in out.logits]), run.logits, atol=1e-4,
                                   rtol=1e-4)
        runs.append(run)
    return runs


def per_layer_masks(layers, masks: list[torch.Tensor]) -> list:
    """Forward pre-hooks giving decoder layer `i` the attention mask `masks[i]` (filled per step by the caller), so
    each layer attends only to the slots its oracle keeps; returns the hook handles to remove."""
    def layer_mask(index):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = masks[index]
            return args, kwargs
        return hook

    return [layer.register_forward_pre_hook(layer_mask(index), with_kwargs=True) for index, layer in enumerate(layers)]
