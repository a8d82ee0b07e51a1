"""`snapkv` against an oracle written from SnapKV's rule (observation-window votes, pooled; algorithms.md §4)."""

import pytest
import torch

from hae_fx import HAEConfigError
from hae_fx.policies.snapkv import SnapKVConfig, pool_votes
from tests.policy_oracle import check_against_rule, evicts_by_score, lowest, unprotected

CONFIG = SnapKVConfig(capacity=16, sinks=1, window=4, kernel_size=3)


class SnapKVRule:
    """Votes of the last `window` prompt queries on the prefix, pooled over neighbours (zero padding); then the
    lowest of pooled vote + attention received since is evicted."""

    def __init__(self, config=CONFIG):
        self.config = config

    def prefill(self, attention, visual, capacity):
        seen, window, half = len(visual), self.config.window, self.config.kernel_size // 2
        prefix = range(seen - window)
        mean = sum(attention) / len(attention)
        votes = [float(mean[seen - window:, j].sum()) for j in prefix] + [0.0] * window
        pool = max if self.config.pooling == "max" else (lambda values: sum(values) / len(values))
        scores = {j: pool([votes[i] if 0 <= i < seen else 0.0 for i in range(j - half, j + half + 1)])
                  for j in range(seen)}
        protected = [j for j in range(seen) if j < self.config.sinks or j >= seen - window]
        chosen = sorted(set(range(seen)) - set(protected), key=lambda j: (-scores[j], j))
        return {j: scores[j] for j in sorted(protected + chosen[:capacity - len(protected)])}

    def victim(self, scores, seen):
        return lowest(scores, unprotected(scores, seen, self.config.sinks, self.config.window))

    def attended(self, scores, row):
        for j in scores:
            scores[j] += row[j]


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_matches_oracle_for_100_steps_on_a_padded_batch(pooling):
    config = CONFIG.replace(pooling=pooling)
    runs = check_against_rule(config, lambda: SnapKVRule(config), seed=14)
    assert all(evicts_by_score(run, config.sinks) for run in runs)


def test_pooling_keeps_neighbours_together():
    votes = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0, 1.0]])
    assert pool_votes(votes, 3, "max").tolist() == [[0.0, 9.0, 9.0, 9.0, 1.0, 1.0]]
    assert pool_votes(votes, 3, "avg")[0].tolist() == pytest.approx([0.0, 3.0, 3.0, 3.0, 1 / 3, 1 / 3])


@pytest.mark.parametrize("fields, message", [
    (dict(kernel_size=4), r"SnapKVConfig.kernel_size must be odd"),
    (dict(window=0), r"SnapKVConfig.window must be >= 1, got 0"),
    (dict(pooling="median"), r"SnapKVConfig.pooling must be one of \('avg', 'max'\), got 'median'"),
])
def test_bad_fields_name_the_field(fields, message):
    with pytest.raises(HAEConfigError, match=message):
        SnapKVConfig(**fields)
