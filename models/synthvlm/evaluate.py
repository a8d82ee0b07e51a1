"""Answer held-out questions with any SynthVLM (plain HF or hae_fx-transformed) and score the answers.

Scoring:
- short questions (`colour_at`, `shape_at`, `locate`, `count`, `exists`): exact match of the normalised answer.
- `describe`: the share of shapes described correctly, `|said ∩ true| / max(|said|, |true|)` over
  `(cell, colour, shape)` clauses, so a missing object and an invented one both cost.
- overall: the mean of the per-kind accuracies (each kind weighs the same, whatever its sample size).

Generation pads every batch to the same prompt width and batch size (repeating the last question, whose
answer is then dropped), so a compiled model sees one prompt shape per question group and never recompiles.

Conversations (`answer_conversations`) ask their turns one after another, as a chat UI does: each follow-up is
`generate(input_ids=history + question, past_key_values=the cache the previous turn returned)`, the history being
everything generated so far; every answer is scored by `score`, per turn.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from hae_fx.models.synthvlm.data import Conversation, Example, max_answer_tokens, prompt_batch
from hae_fx.models.synthvlm.model import prompt_ids
from hae_fx.models.synthvlm.tokenizer import WordTokenizer, normalise

_CLAUSE = re.compile(r"row (\d+) column (\d+) (\w+) (\w+)")


def prompt_width(tokenizer: WordTokenizer, examples: Sequence[Example]) -> int:
    return max(len(prompt_ids(tokenizer, e.question)) for e in examples)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer: WordTokenizer, examples: Sequence[Example], *,
                     batch_size: int = 32, max_new_tokens: int | None = None, width: int | None = None,
                     on_batch: Callable[[Sequence[Example], object], None] | None = None) -> list[str]:
    """Greedy answers to `examples`, in order.

    Args:
        max_new_tokens: default: the longest answer the examples' kinds can have, plus `<eos>`.
        width: prompt width every batch is left-padded to; default: the longest prompt among `examples`.
        on_batch: called with each batch's examples and `generate`'s output (e.g. to read its cache).
    """
    if not examples:
        return []
    max_new_tokens = max_answer_tokens({e.kind for e in examples}) if max_new_tokens is None else max_new_tokens
    width = prompt_width(tokenizer, examples) if width is None else width
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        inputs = prompt_batch(tokenizer, padded, width=width)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
        if on_batch is not None:
            on_batch(chunk, out)
        answers += [_until_eos(tokenizer, row) for row in out.sequences[: len(chunk), width:].tolist()]
    return answers


#: tokens a conversation's every answer takes: one word and `<eos>` (a longer answer is wrong, and cut there)
CONVERSATION_ANSWER_TOKENS = 2


def conversation_width(tokenizer: WordTokenizer, conversations: Sequence[Conversation]) -> int:
    """The prompt width of the conversations' first turns."""
    return prompt_width(tokenizer, [c.turns[0] for c in conversations])


@torch.no_grad()
def answer_conversations(model: torch.nn.Module, tokenizer: WordTokenizer, conversations: Sequence[Conversation], *,
                         batch_size: int = 32, width: int | None = None,
                         on_batch: Callable[[Sequence[Conversation], object], None] | None = None) -> list[list[str]]:
    """Greedy answers to every turn of every conversation (`[conversation][turn]`), each turn continuing on the
    cache the previous one returned.

    Every answer gets `CONVERSATION_ANSWER_TOKENS` new tokens, so every row's history has one length and the next
    question is appended without padding inside the turn (which an evicting cache refuses). `on_batch` is called
    with each batch's conversations and the last turn's `generate` output.
    """
    if not conversations:
        return []
    width = conversation_width(tokenizer, conversations) if width is None else width
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    settings = {"max_new_tokens": CONVERSATION_ANSWER_TOKENS, "min_new_tokens": 0, "do_sample": False,
                "return_dict_in_generate": True}
    answers: list[list[str]] = []
    for start in range(0, len(conversations), batch_size):
        chunk = list(conversations[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        inputs = {k: v.to(device) for k, v in prompt_batch(tokenizer, [c.turns[0] for c in padded], width).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, **settings)
        turns = [out.sequences[:, width:]]
        mask = inputs["attention_mask"]
        for turn in range(1, len(chunk[0].turns)):
            asked = [tokenizer.encode(c.turns[turn].question) for c in padded]
            if len(set(map(len, asked))) != 1:
                raise ValueError(f"turn {turn}'s questions differ in length; a batch's follow-ups must have one")
            history = torch.cat([out.sequences, torch.tensor(asked, device=device)], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch_size, history.shape[1] - mask.shape[1])], dim=1)
            out = model.generate(input_ids=history, attention_mask=mask, past_key_values=out.past_key_values,
                                 **settings)
            turns.append(out.sequences[:, history.shape[1]:])
        if on_batch is not None:
            on_batch(chunk, out)
        for row in range(len(chunk)):
            answers.append([_until_eos(tokenizer, tokens[row].tolist()) for tokens in turns])
    return answers


def _until_eos(tokenizer: WordTokenizer, row: list[int]) -> str:
    return tokenizer.decode(row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row)


def described_objects(text: str) -> set[tuple[tuple[int, int], str, str]]:
    """`((row, col), colour, shape)` for every "row R column C colour shape" clause of a description (0-based)."""
    return {((int(r) - 1, int(c) - 1), colour, shape) for r, c, colour, shape in _CLAUSE.findall(normalise(text))}


def score(example: Example, answer: str) -> float:
    """1.0/0.0 for short questions; the share of shapes described correctly for `describe` (module docstring)."""
    if example.kind != "describe":
        return float(normalise(answer) == normalise(example.answer))
    truth = {(cell, c, s) for cell, (c, s) in example.scene.objects.items()}
    said = described_objects(answer)
    return len(truth & said) / max(len(truth), len(said), 1)


def accuracy_by_kind(examples: Sequence[Example], answers: Sequence[str]) -> dict[str, float]:
    """Per-kind accuracy, plus `"overall"`: their unweighted mean."""
    scores: dict[str, list[float]] = defaultdict(list)
    for example, answer in zip(examples, answers, strict=True):
        scores[example.kind].append(score(example, answer))
    result = {kind: sum(values) / len(values) for kind, values in scores.items()}
    result["overall"] = sum(result.values()) / len(result)
    return result


def conversation_accuracy(conversations: Sequence[Conversation], answers: Sequence[Sequence[str]]) -> list[float]:
    """Per turn, the share of conversations whose answer to that turn is right."""
    turns = len(conversations[0].turns)
    return [sum(score(c.turns[t], a[t]) for c, a in zip(conversations, answers, strict=True)) / len(conversations)
            for t in range(turns)]


def question_groups(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """`"short"` questions and `"describe"` questions, in order; each group is generated on its own, with one
    prompt width and one `max_new_tokens` (an empty group is left out)."""
    groups = {"short": [e for e in examples if e.kind != "describe"],
              "describe": [e for e in examples if e.kind == "describe"]}
    return {name: group for name, group in groups.items() if group}


def evaluate(model: torch.nn.Module, tokenizer: WordTokenizer, examples: Sequence[Example], *,
             batch_size: int = 32) -> dict[str, float]:
    """`accuracy_by_kind` of greedy answers, each `question_groups` group generated on its own."""
    scored: list[Example] = []
    answers: list[str] = []
    for group in question_groups(examples).values():
        scored += group
        answers += generate_answers(model, tokenizer, group, batch_size=batch_size)
    return accuracy_by_kind(scored, answers)
