"""`h2o` against an oracle written from H2O's rule (accumulated attention, recent window; algorithms.md §4)."""

from hae_fx.policies.h2o import H2OConfig
from tests.policy_oracle import check_against_rule, evicts_by_score, lowest, unprotected

CONFIG = H2OConfig(capacity=16, sinks=1, window=3)


class H2ORule:
    """Scores: attention received from every query so far, averaged over heads and layers."""

    def prefill(self, attention, visual, capacity):
        seen = len(visual)
        received = sum(layer.sum(dim=0) for layer in attention) / len(attention)
        scores = {j: float(received[j]) for j in range(seen)}
        protected = [j for j in range(seen) if j < CONFIG.sinks or j >= seen - CONFIG.window]
        heavy = sorted(set(range(seen)) - set(protected), key=lambda j: (-scores[j], j))
        return {j: scores[j] for j in sorted(protected + heavy[:capacity - len(protected)])}

    def victim(self, scores, seen):
        return lowest(scores, unprotected(scores, seen, CONFIG.sinks, CONFIG.window))

    def attended(self, scores, row):
        for j in scores:
            scores[j] += row[j]


def test_h2o_matches_oracle_for_100_steps_on_a_padded_batch():
    runs = check_against_rule(CONFIG, H2ORule, seed=12)
    assert all(evicts_by_score(run, CONFIG.sinks) for run in runs)
