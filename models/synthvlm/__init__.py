"""SynthVLM: a synthetic vision-language task family and a small LLaVA trained on it, the accuracy yardstick.

A question about a grid of coloured shapes can only be answered by attending to the right image tokens, and
every answer can be checked exactly, so the trained model's accuracy under a KV budget measures what an eviction
policy kept. Modules: `scenes` (generation, rendering, a pixel parser, questions), `tokenizer` (a closed
word vocabulary), `model` (the architecture, `load()` of the shipped checkpoint), `data` (seeded question sets
and batches), `evaluate` (generation and scoring), `train` (`python -m hae_fx.models.synthvlm.train`). This
package namespace imports only the torch-free part.
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
