"""`ahakv` against an oracle written from AhaKV's rule (recent accumulation, step-gain softmax, value prior;
algorithms.md §3)."""

import math

import pytest
import torch

from hae_fx import HAEConfigError
from hae_fx.policies.ahakv import AhaKVConfig, AhaKVPolicy
from hae_fx.policies.base import Prompt
from tests.policy_oracle import check_against_rule, evicts_by_score

CONFIG = AhaKVConfig(capacity=8, sinks=1, window=4, prior_kernel=3)  # prompts of 24-26: step gains up to 1.3


class AhaKVRule:
    """Score of position j: (pooled squared value norm of j) x (sum over the last `window` query rows of their
    step-gain softmax attention to j). The step gain rescales a row's logits by sqrt(2 log(i/k)) relative to the
    model's 1/sqrt(d) when the row attends over i > k = capacity keys; here recovered from the model's own
    probabilities, since log p differs from the scaled logits by a per-row constant."""

    per_head = True

    def __init__(self, config=CONFIG):
        self.config = config
        self.rows: dict[int, list[float]] = {}  # query position -> head- and layer-averaged score row
        self.prior: dict[int, float] = {}

    def observe_values(self, values):
        norms = sum(v.pow(2).sum(dim=-1).mean(dim=0) for v in values) / len(values)  # [n]
        if not self.prior:  # the prompt: pooled over positions, zero padding
            half = self.config.prior_kernel // 2
            n = norms.shape[0]
            self.prior = {j: sum(float(norms[i]) for i in range(j - half, j + half + 1) if 0 <= i < n)
                          / self.config.prior_kernel for j in range(n)}
        else:
            self.prior[norms.shape[0] - 1] = float(norms[-1])

    def _step_gain_row(self, probs, q, capacity):
        keys = q + 1
        gain = math.sqrt(2 * math.log(keys / capacity)) if keys > capacity else 1.0
        return torch.softmax(gain * torch.log(probs[q, :keys]), dim=-1)

    def _ranked(self, j, seen):
        recent = sum(row[j] for q, row in self.rows.items() if seen - self.config.window <= q < seen)
        return self.prior[j] * recent

    def prefill(self, attention, visual, capacity):
        seen, window = len(visual), self.config.window
        for q in range(max(0, seen - window), seen):
            per_layer = [torch.stack([self._step_gain_row(head, q, capacity) for head in layer]).mean(dim=0)
                         for layer in attention]
            self.rows[q] = (sum(per_layer) / len(per_layer)).tolist() + [0.0] * (seen - q - 1)
        protected = [j for j in range(seen) if j < self.config.sinks or j >= seen - window]
        ranked = {j: self._ranked(j, seen) for j in range(seen)}
        chosen = sorted(set(range(seen)) - set(protected), key=lambda j: (-ranked[j], j))
        self.next_query = seen
        return {j: ranked[j] for j in sorted(protected + chosen[:capacity - len(protected)])}

    def victim(self, scores, seen):
        candidates = [j for j in scores if self.config.sinks <= j < seen - self.config.window]
        return min(candidates, key=lambda j: (self._ranked(j, seen), j))

    def attended(self, scores, row):
        self.rows[self.next_query] = row
        self.next_query += 1


def test_ahakv_matches_oracle_for_100_steps_on_a_padded_batch():
    runs = check_against_rule(CONFIG, lambda: AhaKVRule(CONFIG), seed=16)
    assert all(evicts_by_score(run, CONFIG.sinks) for run in runs)


def test_step_gain_scale_is_the_entropy_matching_temperature():
    policy = AhaKVPolicy(AhaKVConfig(capacity=8, sinks=1, window=4))
    prompt = Prompt(token_pos=torch.tensor([[-1, 0, 7, 8, 31]]), modality=torch.zeros(1, 5, dtype=torch.int8))
    scale = policy.prefill_score_scale(prompt, head_dim=16)
    expected = [0.25, 0.25, 0.25, math.sqrt(2 * math.log(9 / 8) / 16), math.sqrt(2 * math.log(32 / 8) / 16)]
    assert scale[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("fields, message", [
    (dict(prior_kernel=2), r"AhaKVConfig.prior_kernel must be odd"),
    (dict(window=0), r"AhaKVConfig.window must be >= 1, got 0"),
])
def test_bad_fields_name_the_field(fields, message):
    with pytest.raises(HAEConfigError, match=message):
        AhaKVConfig(**fields)
