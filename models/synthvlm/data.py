"""Seeded question sets and the tensors SynthVLM trains and generates on.

Scenes come from two disjoint seed streams: `TRAIN` for training, `HELD_OUT` for every accuracy number
(training logs, tests, the accuracy benchmark). `held_out(count)` is a fixed, kind-balanced list, so "the first
200 held-out questions" means the same questions everywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hae_fx.models.synthvlm.model import pixel_values, prompt_ids
from hae_fx.models.synthvlm.scenes import (
    DEFAULT_MAX_OBJECTS,
    LONGEST_SHORT_ANSWER,
    QUESTION_KINDS,
    WORDS_PER_DESCRIBED_OBJECT,
    Scene,
    make_question,
    random_scene,
    render,
)
from hae_fx.models.synthvlm.tokenizer import WordTokenizer

TRAIN, HELD_OUT = 0, 1  # seed streams
SHORT_KINDS: tuple[str, ...] = tuple(k for k in QUESTION_KINDS if k != "describe")
IGNORE_INDEX = -100  # label of prompt and padding positions (HF's cross-entropy ignore index)


@dataclass(frozen=True)
class Example:
    """One question about one scene, with its correct answer."""

    scene: Scene
    kind: str
    question: str
    answer: str


def scene_for(stream: int, index: int) -> Scene:
    return random_scene(np.random.default_rng([stream, index]))


def example_for(stream: int, index: int, kind: str) -> Example:
    scene = scene_for(stream, index)
    question, answer = make_question(scene, kind, np.random.default_rng([stream, index, 1]))
    return Example(scene, kind, question, answer)


def held_out(count: int, kinds: Sequence[str] = QUESTION_KINDS) -> list[Example]:
    """The first `count` held-out questions, cycling through `kinds` (so each kind gets `count / len(kinds)`)."""
    return [example_for(HELD_OUT, i, kinds[i % len(kinds)]) for i in range(count)]


def images(examples: Sequence[Example]) -> np.ndarray:
    """`[N, 96, 96, 3]` uint8 renders of the examples' scenes."""
    return np.stack([np.asarray(render(e.scene)) for e in examples])


def max_answer_tokens(kinds: Collection[str]) -> int:
    """Tokens (with `<eos>`) the longest answer of these kinds takes on default scenes: `max_new_tokens`."""
    longest = WORDS_PER_DESCRIBED_OBJECT * DEFAULT_MAX_OBJECTS if "describe" in kinds else LONGEST_SHORT_ANSWER
    return longest + 1


def prompt_batch(tokenizer: WordTokenizer, examples: Sequence[Example], width: int | None = None,
                 pixels: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts (to `width`, default the longest) with their attention mask and pixel values."""
    prompts = [prompt_ids(tokenizer, e.question) for e in examples]
    width = max(map(len, prompts)) if width is None else width
    if any(len(p) > width for p in prompts):
        raise ValueError(f"a prompt is longer than width={width}")
    input_ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pixels = images(examples) if pixels is None else pixels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values(pixels)}


def training_batch(tokenizer: WordTokenizer, questions: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + answer + <eos>` sequences; only answer and `<eos>` positions carry labels."""
    rows, labels = [], []
    for question, answer in questions:
        prompt = prompt_ids(tokenizer, question)
        target = tokenizer.encode(answer, add_eos=True)
        rows.append(prompt + target)
        labels.append([IGNORE_INDEX] * len(prompt) + target)
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    return {
        "input_ids": torch.tensor([r + [tokenizer.pad_id] * p for r, p in zip(rows, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad, strict=True)]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * p for lab, p in zip(labels, pad, strict=True)]),
    }
