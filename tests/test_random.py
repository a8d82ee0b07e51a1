"""`random` against an oracle written from its rule (hae_fx/policies/random.py's docstring)."""

import hae_fx
from hae_fx.policies.random import RandomConfig
from tests.policy_oracle import check_against_rule, evicts_by_score, unprotected

M = 2**31 - 1
CONFIG = RandomConfig(capacity=16, sinks=2, window=3, seed=7)


def draw(position: int, step: int, seed: int) -> int:
    x = (position * 1103515245 + step * 12345 + seed * 2654435761 + 1) % M
    for _ in range(3):
        x = (x * 48271) % M
        x ^= x >> 7
    return x


class RandomRule:
    def __init__(self, config=CONFIG):
        self.config = config

    def prefill(self, attention, visual, capacity):
        seen, sinks, window = len(visual), self.config.sinks, self.config.window
        protected = [j for j in range(seen) if j < sinks or j >= seen - window]
        others = sorted(set(range(seen)) - set(protected), key=lambda j: -draw(j, 0, self.config.seed))
        return dict.fromkeys(sorted(protected + others[:capacity - len(protected)]), 0.0)

    def victim(self, scores, seen):
        candidates = unprotected(scores, seen, self.config.sinks, self.config.window)
        return min(candidates, key=lambda j: draw(j, seen + 1, self.config.seed))

    def attended(self, scores, row):
        pass


def test_random_matches_oracle_for_100_steps_on_a_padded_batch():
    runs = check_against_rule(CONFIG, RandomRule, seed=11)
    assert all(evicts_by_score(run, CONFIG.sinks) for run in runs)


def test_another_seed_evicts_other_tokens():
    runs = check_against_rule(CONFIG.replace(seed=8), lambda: RandomRule(CONFIG.replace(seed=8)), seed=11,
                              new_tokens=20)
    assert runs[0].kept != check_against_rule(CONFIG, RandomRule, seed=11, new_tokens=20)[0].kept


def test_short_form_builds_the_same_config():
    assert hae_fx.HAEConfig(policy="random", capacity=16, sinks=2, window=3, seed=7) == CONFIG
