"""`lookm` against an oracle written from LOOK-M's rule (H2O scores with a text prior, evicted prompt keys and
values averaged into their most similar kept key; algorithms.md §4)."""

import torch

from hae_fx.policies.lookm import LookMConfig
from tests.policy_oracle import check_against_rule, lowest, unprotected

CONFIG = LookMConfig(capacity=16, sinks=1, window=4)


class LookMRule:
    """Accumulated attention; text before images at prefill, images evicted first at decode; at prefill, per layer
    and KV head, each dropped prompt token whose best cosine similarity to a kept key reaches the mean best
    similarity of the dropped tokens is averaged into that kept key's token (keys and values alike)."""

    def __init__(self, config=CONFIG):
        self.config = config

    def prefill(self, attention, visual, capacity):
        seen = len(visual)
        self.visual = {j for j in range(seen) if visual[j]}
        mean = sum(attention) / len(attention)
        scores = {j: float(mean[:, j].sum()) for j in range(seen)}
        protected = [j for j in range(seen) if j < self.config.sinks or j >= seen - self.config.window]
        rest = sorted(set(range(seen)) - set(protected), key=lambda j: (j in self.visual, -scores[j], j))
        return {j: scores[j] for j in sorted(protected + rest[:capacity - len(protected)])}

    def merge(self, keys, values, kept):
        dropped = [j for j in range(keys.shape[1]) if j not in kept]
        for head in range(keys.shape[0]):
            k, v = keys[head].clone(), values[head].clone()
            unit = {j: k[j] / k[j].norm().clamp_min(1e-12) for j in range(k.shape[0])}
            best = {}
            for j in dropped:
                similarity = [float(unit[j] @ unit[t]) for t in kept]
                top = max(similarity)
                best[j] = (top, kept[similarity.index(top)])
            if not best:
                continue
            threshold = sum(top for top, _ in best.values()) / len(best)
            for target in kept:
                sources = [j for j, (top, t) in best.items() if t == target and top >= threshold]
                if sources:
                    keys[head, target] = (k[target] + sum(k[j] for j in sources)) / (1 + len(sources))
                    values[head, target] = (v[target] + sum(v[j] for j in sources)) / (1 + len(sources))

    def victim(self, scores, seen):
        candidates = unprotected(scores, seen, self.config.sinks, self.config.window)
        images = [j for j in candidates if j in self.visual]
        return lowest(scores, images or candidates)

    def attended(self, scores, row):
        for j in scores:
            scores[j] += row[j]


class WithoutMerging(LookMRule):
    def merge(self, keys, values, kept):
        pass


def test_lookm_matches_oracle_for_100_steps_on_a_padded_batch():
    runs = check_against_rule(CONFIG, lambda: LookMRule(CONFIG), seed=17)
    for run in runs:
        assert len(run.kept[0]) == CONFIG.capacity  # the prompt (24-26 tokens) lost tokens at prefill


def test_merging_changes_the_generation():
    """The oracle without merging generates other logits: merging is what the comparison above checks too."""
    from tests.conftest import llava_inputs
    from tests.policy_oracle import model_for, run_rule

    model = model_for(17, attn_implementation="eager")
    inputs = llava_inputs(model, 1, seed=17)
    sequence = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
    merged = run_rule(model, sequence, LookMRule(CONFIG), capacity=CONFIG.capacity, new_tokens=3)
    plain = run_rule(model, sequence, WithoutMerging(CONFIG), capacity=CONFIG.capacity, new_tokens=3)
    assert not torch.allclose(merged.logits, plain.logits, atol=1e-3)
