"""`madakv` against an oracle written from MadaKV's rules (algorithms.md §2): per KV head, modality budgets from the
proxy tokens' attention (MPA); per layer, budgets compensated from the layers before (HCC). Every head of every
layer keeps positions of its own, and each new token attends, head by head, to its head's positions only."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx import HAEConfigError
from hae_fx.policies.composed import ComposedConfig
from hae_fx.policies.madakv import MadaKVConfig
from tests.conftest import llava_inputs, unpadded
from tests.policy_oracle import model_for, per_layer_masks

CONFIG = MadaKVConfig(capacity=14, sinks=1, window=4, theta=0.9)
SEED = 14


class MadaKVOracle:
    """MadaKV over one unpadded sequence, with plain Python lists and dicts: `kept[l][h]` maps each position head
    `h` of layer `l` keeps to its score."""

    def __init__(self, config: MadaKVConfig, layers: int, q_heads: int, kv_heads: int) -> None:
        self.config, self.layers, self.q_heads, self.kv_heads = config, layers, q_heads, kv_heads
        self.group = q_heads // kv_heads
        self.budgets: list[float] = []  # φ of each layer, for the test's own checks

    def head_rows(self, layer_attention: torch.Tensor) -> list[torch.Tensor]:
        """`[Hq, Q, K]` attention to one `[Q, K]` per KV head: the mean of the query heads that share it."""
        return [layer_attention[h * self.group:(h + 1) * self.group].mean(dim=0) for h in range(self.kv_heads)]

    def prefill(self, attention: list[torch.Tensor], visual: list[bool]) -> list[list[dict[int, float]]]:
        config, length = self.config, len(visual)
        protected = [j for j in range(length) if j < config.sinks or j >= length - config.window]
        proxies = range(max(length - config.window, 0), length)
        most = config.capacity - config.sinks - config.window
        budget = float(most)
        kept = []
        for layer, layer_attention in enumerate(attention):
            self.budgets.append(budget)
            heads, deficit = [], 0.0
            for rows in self.head_rows(layer_attention):
                psi = [sum(float(rows[q, j]) for q in proxies) for j in range(length)]
                images = [j for j in range(length) if visual[j] and j not in protected]
                texts = [j for j in range(length) if not visual[j] and j not in protected]
                mass_v, mass_t = sum(psi[j] for j in images), sum(psi[j] for j in texts)
                slots = math.floor(budget)
                for_images = math.floor(mass_v / (mass_v + mass_t) * slots) if mass_v + mass_t > 0 else 0
                for_texts = slots - for_images
                if for_images > len(images):  # a modality's surplus goes to the other
                    for_texts += for_images - len(images)
                    for_images = len(images)
                if for_texts > len(texts):
                    for_images = min(len(images), for_images + for_texts - len(texts))
                    for_texts = len(texts)
                chosen = protected + highest(psi, images, for_images) + highest(psi, texts, for_texts)
                heads.append({j: psi[j] for j in chosen})
                deficit += self.sparsity(psi, images) + self.sparsity(psi, texts) - budget
            kept.append(heads)
            if self.config.compensate and layer + 1 < self.layers:
                budget = min(max(budget - deficit / (self.kv_heads * (self.layers - 1 - layer)), 0.0), most)
        return kept

    def sparsity(self, psi: list[float], positions: list[int]) -> int:
        """The fewest of `positions` whose ψ reaches `theta` of their total."""
        target, covered, count = self.config.theta * sum(psi[j] for j in positions), 0.0, 0
        for value in sorted((psi[j] for j in positions), reverse=True):
            if covered >= target:
                break
            covered, count = covered + value, count + 1
        return count

    def step(self, kept: list[list[dict[int, float]]], position: int) -> None:
        """Make room for the token at `position` in every head (the lowest score outside sinks and window goes)."""
        config = self.config
        for heads in kept:
            for scores in heads:
                if len(scores) >= config.capacity:
                    candidates = [j for j in scores if config.sinks <= j < position - config.window]
                    del scores[min(candidates, key=lambda j: (scores[j], j))]
                scores[position] = 0.0

    def attended(self, kept: list[list[dict[int, float]]], attention: list[torch.Tensor]) -> None:
        for heads, layer_attention in zip(kept, attention, strict=True):
            for scores, rows in zip(heads, self.head_rows(layer_attention), strict=True):
                for j in scores:
                    scores[j] += float(rows[-1, j])


def highest(psi: list[float], positions: list[int], count: int) -> list[int]:
    """The `count` positions of highest ψ (ties: the lower position)."""
    return sorted(positions, key=lambda j: (-psi[j], j))[:count]


def snapshot(kept: list[list[dict[int, float]]]) -> list[list[list[int]]]:
    return [[sorted(scores) for scores in heads] for heads in kept]


def run_oracle(model, config: MadaKVConfig, sequence: dict[str, torch.Tensor], new_tokens: int):
    """Greedy generation of one unpadded sequence under `MadaKVOracle` with HF's eager model and a cache of every
    position; each decoder layer gets a per-head additive mask of its heads' kept positions."""
    input_ids = sequence["input_ids"]
    text = model.config.text_config
    layers = model.model.language_model.layers
    oracle = MadaKVOracle(config, len(layers), text.num_attention_heads, text.num_key_value_heads)
    visual = (input_ids[0] == model.config.image_token_id).tolist()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(**sequence, past_key_values=cache, use_cache=True, output_attentions=True)
    kept = oracle.prefill([a[0].float() for a in out.attentions], visual)
    history, logits, tokens = [snapshot(kept)], [out.logits[0, -1]], [int(out.logits[0, -1].argmax())]
    masks: list[torch.Tensor] = []
    handles = per_layer_masks(layers, masks)
    try:
        for position in range(input_ids.shape[1], input_ids.shape[1] + new_tokens - 1):
            oracle.step(kept, position)
            history.append(snapshot(kept))
            masks.clear()
            for heads in kept:
                mask = torch.full((1, oracle.q_heads, 1, position + 1), float("-inf"))
                for query_head in range(oracle.q_heads):
                    mask[0, query_head, 0, sorted(heads[query_head // oracle.group])] = 0.0
                masks.append(mask)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                            attention_mask=torch.zeros(1, 1, 1, position + 1), position_ids=torch.tensor([[position]]),
                            use_cache=True, output_attentions=True)
            oracle.attended(kept, [a[0].float() for a in out.attentions])
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return oracle, history, tokens, torch.stack(logits)


class RecordHeads(LogitsProcessor):
    """Each layer's per-head kept positions, per sequence, read from the cache's slot metadata at every step."""

    def __init__(self, cache):
        self.cache, self.kept = cache, []

    def __call__(self, input_ids, scores):
        per_layer = [group.core["slot_pos"].tolist() for group in self.cache.slots.groups]
        self.kept.append([[[sorted(p for p in head if p >= 0) for head in layer[row]] for layer in per_layer]
                          for row in range(len(per_layer[0]))])
        return scores


@pytest.mark.parametrize("compensate", [True, False])
def test_madakv_matches_oracle_for_100_steps_on_a_padded_batch(compensate):
    new_tokens, config = 100, CONFIG.replace(compensate=compensate)
    model = hae_fx.transform(model_for(SEED), config, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=SEED)
    recorder = RecordHeads(hae_fx.HAECache.for_model(model, config, batch=2))
    out = model.generate(**inputs, past_key_values=recorder.cache, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, logits_processor=LogitsProcessorList([recorder]))
    reference = model_for(SEED, attn_implementation="eager")
    width = inputs["input_ids"].shape[1]
    for row in range(2):
        sequence = unpadded(inputs, row)
        oracle, history, tokens, logits = run_oracle(reference, config, sequence, new_tokens)
        assert [step[row] for step in recorder.kept] == history, f"sequence {row}"
        assert out.sequences[row, width:].tolist() == tokens, f"sequence {row}"
        torch.testing.assert_close(torch.stack([step[row] for step in out.logits]), logits, atol=1e-4, rtol=1e-4)
        # the rules had something to decide: HCC moved layer 1's budget (only with it on), the heads of a layer kept
        # different positions, and decode evicted
        assert (oracle.budgets[1] != oracle.budgets[0]) == compensate, f"sequence {row}"
        assert any(heads[0] != heads[1] for heads in history[0]), f"sequence {row}"
        assert history[-1] != history[0]


def test_memory_is_capacity_slots_per_head_and_layer():
    """K/V and slot metadata are `capacity` slots per KV head and layer (no full-size buffer), and the bytes the
    cache checks before allocating are those it allocates."""
    model = hae_fx.transform(model_for(SEED), CONFIG, options={"hae.compiler": "eager"})
    cache = hae_fx.HAECache.for_model(model, CONFIG, batch=2)
    text = model.config.text_config
    kv_heads, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    assert [tuple(layer.keys.shape) for layer in cache.layers] == [(2, kv_heads, 14, head_dim)] * 2
    assert [tuple(group.core["slot_pos"].shape) for group in cache.slots.groups] == [(2, kv_heads, 14)] * 2
    snapkv = hae_fx.HAECache.for_model(model, hae_fx.HAEConfig(policy="snapkv", capacity=14, sinks=1, window=4),
                                       batch=2)
    assert cache.kv_nbytes == snapkv.kv_nbytes
    planned = hae_fx.slots.SlotBuffers.planned_nbytes(CONFIG, cache.policy, 2, [14, 14], kv_heads)
    assert planned == sum(t.numel() * t.element_size() for t in cache.slots.tensors())


@pytest.mark.parametrize("fields, message", [
    ({"theta": 0.0}, r"MadaKVConfig.theta must lie in \(0, 1\]"),
    ({"theta": 1.5}, r"MadaKVConfig.theta must lie in \[0, 1\], got 1.5"),
    ({"window": 0}, r"MadaKVConfig.window must be >= 1, got 0"),
    ({"compensate": 1}, r"MadaKVConfig.compensate must be"),
])
def test_bad_fields_name_the_field(fields, message):
    with pytest.raises(HAEConfigError, match=message):
        MadaKVConfig(**fields)


def test_composing_a_per_head_policy_is_refused():
    with pytest.raises(HAEConfigError, match=r"ComposedConfig.prefill='madakv' keeps an index set per KV head"):
        ComposedConfig(prefill="madakv", decode="h2o")
