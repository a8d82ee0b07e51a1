"""A synthetic vision-language task family with answers that are correct by construction.

Later work trains a small LLaVA on these scenes and uses its accuracy as a yardstick for KV-cache eviction:
a question about a grid of coloured shapes can only be answered by attending to the right image tokens, and
every answer can be checked exactly. This subpackage holds only the deterministic part: scene generation and
rendering (`scenes`), and a closed-vocabulary word tokenizer (`tokenizer`). Nothing here needs torch.
"""

from __future__ import annotations

from hae_fx.models.synthvlm.scenes import (
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    answer_from_scene,
    make_question,
    parse,
    random_scene,
    render,
)
from hae_fx.models.synthvlm.tokenizer import WordTokenizer, build_vocab

__all__ = [
    "COLOURS",
    "QUESTION_KINDS",
    "SHAPES",
    "Scene",
    "WordTokenizer",
    "answer_from_scene",
    "build_vocab",
    "make_question",
    "parse",
    "random_scene",
    "render",
]
