"""`tova` against an oracle written from TOVA's rule (the newest query's head-averaged attention; algorithms.md §4)."""

from hae_fx.policies.tova import TOVAConfig
from tests.policy_oracle import check_against_rule, evicts_by_score, lowest

CONFIG = TOVAConfig(capacity=16)  # the paper's: no sinks, no recent window


class TOVARule:
    """Scores: the last query's attention only, averaged over heads and layers; keep the highest."""

    def prefill(self, attention, visual, capacity):
        last_row = sum(layer[-1] for layer in attention) / len(attention)
        scores = {j: float(last_row[j]) for j in range(len(visual))}
        return {j: scores[j] for j in sorted(sorted(scores, key=lambda j: (-scores[j], j))[:capacity])}

    def victim(self, scores, seen):
        return lowest(scores, list(scores))

    def attended(self, scores, row):
        for j in scores:
            scores[j] = row[j]


def test_tova_matches_oracle_for_100_steps_on_a_padded_batch():
    runs = check_against_rule(CONFIG, TOVARule, seed=13)
    assert all(evicts_by_score(run, 0) for run in runs)
