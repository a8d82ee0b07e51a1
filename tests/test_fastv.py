"""`fastv` against an oracle written from FastV's rule (the last token's attention at layer K-1 ranks image tokens,
dropped from the later layers' hidden states; algorithms.md §4)."""

import pytest

import hae_fx
from hae_fx import HAEConfigError
from hae_fx.models.llava import tiny_llava
from hae_fx.policies.fastv import FastVConfig
from tests.policy_oracle import check_against_rule, evicts_by_score, lowest, unprotected

CONFIG = FastVConfig(capacity=18, sinks=1, window=3, layer=1)


class FastVRule:
    def __init__(self, config):
        self.config = config
        self.prune_after = config.layer - 1 if config.prune_hidden else None

    def prefill(self, attention, visual, capacity):
        seen, config = len(visual), self.config
        last_row = attention[config.layer - 1][-1]
        scores = {j: float(last_row[j]) for j in range(seen)}
        protected = [j for j in range(seen) if j < config.sinks or j >= seen - max(config.window, 1)]
        text = sorted((j for j in range(seen) if not visual[j] and j not in protected), key=lambda j: (-scores[j], j))
        image = sorted((j for j in range(seen) if visual[j] and j not in protected), key=lambda j: (-scores[j], j))
        return {j: scores[j] for j in sorted((protected + text + image)[:capacity])}

    def victim(self, scores, seen):
        return lowest(scores, unprotected(scores, seen, self.config.sinks, self.config.window))

    def attended(self, scores, row):
        for j in scores:
            scores[j] += row[j]


@pytest.mark.parametrize("prune_hidden", [True, False], ids=["prune_hidden", "kv_only"])
def test_fastv_matches_oracle_for_100_steps_on_a_padded_batch(prune_hidden):
    config = CONFIG.replace(prune_hidden=prune_hidden)
    runs = check_against_rule(config, lambda: FastVRule(config), seed=15)
    for run in runs:
        assert evicts_by_score(run, config.sinks)
        assert len(run.kept[0]) == config.capacity  # the prompt (26 or 24 tokens) lost image tokens at prefill


def test_layer_beyond_the_depth_is_refused():
    with pytest.raises(HAEConfigError, match=r"FastVConfig.layer=3 reads layer 2's attention, beyond the model's "
                                             r"depth: its text decoder has 2 layers"):
        hae_fx.transform(tiny_llava(), CONFIG.replace(layer=3))
    with pytest.raises(HAEConfigError, match=r"FastVConfig.layer must be >= 1, got 0"):
        FastVConfig(layer=0)
