"""Seeded question sets and the tensors SynthVLM trains and generates on.

Scenes come from three disjoint seed streams: `TRAIN` for training, `HELD_OUT` for every accuracy number
(training logs, tests, the accuracy benchmark's test split) and `TUNE` for choosing a policy's settings (the
accuracy benchmark's tuning split), so no setting is chosen on the questions it is scored on. `held_out(count)` is
a fixed, kind-balanced list, so "the first 200 held-out questions" means the same questions everywhere.

A `Conversation` is one scene and several questions asked one after another, as a chat UI asks follow-ups: the
first question of a one-word kind, then `colour_at` and `shape_at` questions about other cells.
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
    cells_named,
    make_question,
    question_about,
    random_scene,
    render,
)
from hae_fx.models.synthvlm.tokenizer import WordTokenizer

TRAIN, HELD_OUT, TUNE = 0, 1, 2  # seed streams
SHORT_KINDS: tuple[str, ...] = tuple(k for k in QUESTION_KINDS if k != "describe")
#: kinds whose answer is one word: a conversation's first question (so every row's answer takes two tokens)
ONE_WORD_KINDS: tuple[str, ...] = ("colour_at", "shape_at", "count", "exists")
#: the kinds of a conversation's follow-up questions, in order (one kind per turn: every row's turn has one length)
FOLLOW_UP_KINDS: tuple[str, ...] = ("colour_at", "shape_at")
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


def held_out(count: int, kinds: Sequence[str] = QUESTION_KINDS, stream: int = HELD_OUT) -> list[Example]:
    """The first `count` questions of `stream` (default the held-out one), cycling through `kinds` (so each kind
    gets `count / len(kinds)`)."""
    return [example_for(stream, i, kinds[i % len(kinds)]) for i in range(count)]


@dataclass(frozen=True)
class Conversation:
    """Questions about one scene, asked one after another on the same cache: `turns[0]` with the image, each later
    one appended to the history after the previous answer."""

    turns: tuple[Example, ...]

    @property
    def scene(self) -> Scene:
        return self.turns[0].scene


def conversation_for(stream: int, index: int) -> Conversation:
    """Scene `index` of `stream`: a first question of a one-word kind (cycling through `ONE_WORD_KINDS`), then one
    `FOLLOW_UP_KINDS` question per turn, each about an occupied cell no earlier turn named."""
    first = example_for(stream, index, ONE_WORD_KINDS[index % len(ONE_WORD_KINDS)])
    rng = np.random.default_rng([stream, index, 2])
    named = set(cells_named(first.question))
    others = [cell for cell in first.scene.cells() if cell not in named]
    cells = rng.choice(len(others), size=len(FOLLOW_UP_KINDS), replace=False)
    turns = [first]
    for kind, cell in zip(FOLLOW_UP_KINDS, cells, strict=True):
        question, answer = question_about(first.scene, others[int(cell)], kind)
        turns.append(Example(first.scene, kind, question, answer))
    return Conversation(tuple(turns))


def conversations(count: int, stream: int = HELD_OUT) -> list[Conversation]:
    """The first `count` conversations of `stream`. Their scenes are those of `held_out`'s questions of the same
    indices (a question and a conversation about one scene ask different things, so they are scored apart)."""
    return [conversation_for(stream, i) for i in range(count)]


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


def training_batch(tokenizer: WordTokenizer, questions: Sequence[tuple[str, str]],
                   follow_ups: Sequence[Sequence[tuple[str, str]]] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded `prompt + answer + <eos>` sequences; only answer and `<eos>` positions carry labels.

    `follow_ups[i]`, if given, are further `(question, answer)` turns of row `i`, each appended as `question + answer
    + <eos>`: the layout a follow-up turn has at generation (the history, then the new question).
    """
    rows, labels = [], []
    for row, (question, answer) in enumerate(questions):
        prompt = prompt_ids(tokenizer, question)
        target = tokenizer.encode(answer, add_eos=True)
        ids, label = prompt + target, [IGNORE_INDEX] * len(prompt) + target
        for follow_up, reply in follow_ups[row] if follow_ups is not None else ():
            asked, target = tokenizer.encode(follow_up), tokenizer.encode(reply, add_eos=True)
            ids += asked + target
            label += [IGNORE_INDEX] * len(asked) + target
        rows.append(ids)
        labels.append(label)
    width = max(map(len, rows))
    pad = [width - len(r) for r in rows]
    return {
        "input_ids": torch.tensor([r + [tokenizer.pad_id] * p for r, p in zip(rows, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * p for r, p in zip(rows, pad, strict=True)]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * p for lab, p in zip(labels, pad, strict=True)]),
    }
