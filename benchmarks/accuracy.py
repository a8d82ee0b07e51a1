"""Accuracy against KV budget for every eviction policy: SynthVLM's questions and follow-ups (asked of SynthVLM or of
Gemma-VLM, the same task on the frozen Gemma 3 270M), or Gemma 3 270M's retrieval tasks.

    python benchmarks/accuracy.py                       # SynthVLM: 600 questions and 300 conversations, 6 budgets
    python benchmarks/accuracy.py --quick               # CI-sized: 60 questions, 3 budgets
    python benchmarks/accuracy.py --tune                # also tune `hae` on the tuning split, run `hae_tuned`
    python benchmarks/accuracy.py --ablate              # also `hae` taken apart (`ABLATIONS`)
    python benchmarks/accuracy.py --kv-dtype int8       # every variant also with int8 K/V slots (rows `name+int8`)
    python benchmarks/accuracy.py --model gemma-vlm     # SynthVLM's questions asked of Gemma-VLM
    python benchmarks/accuracy.py --model gemma-vlm --device cuda --lm-pack PACK   # on a GPU without the registry
    python benchmarks/accuracy.py --model gemma3-270m [retrieval options]   # benchmarks/retrieval.py's tasks

Every policy registered in `hae_fx.policies` runs through `hae_fx.transform` (Dynamo capture and the hae graph
passes; the rewritten graphs run on the ops' reference implementations unless `--compiler inductor`, which
tests show keeps the same tokens) (a policy with a `prune_hidden` field runs twice: KV-only and with it). A policy
that never evicts (`full`) runs at 100% only; the others run at each budget, where a budget is a fraction of the
full cache: `capacity = round(budget * (prompt width + every new token))`, per question group. The groups are short
questions, descriptions, and conversations (a one-word question, then `colour_at` and `shape_at` follow-ups about
other cells, each asked on the cache the previous turn returned: `models.synthvlm.data.Conversation`), each with
its own prompt width and answer length. Sinks, window and bin scale with the capacity (`config_for`), the same rule
for every policy. "KV vs full" is the K/V bytes of the slots a question can fill (a ring longer than the question,
as `--set full_windows=True` keeps a sliding window, counts for no more than its tokens) over a full cache's in the
model's dtype. With `--kv-dtype`, each variant runs a second time with its K/V slots stored in that 8-bit form
(`PolicyConfig.kv_dtype`); its "KV vs full" counts the real bytes (8-bit values and scales), so it shows the two
savings multiplied.

Scores (`hae_fx.models.synthvlm.evaluate.score`): exact match for short answers, the share of shapes described
correctly for descriptions; each conversation turn (`turn1`..`turn3`) is a kind of its own. A kind is **inert**
when every variant scores it the same at every budget (measured on the run itself): eviction cannot be seen
there, so the **headline** is the mean over the other kinds, and the inert ones are reported apart. Every
difference the report claims comes with a 95% confidence interval from a paired bootstrap over questions
(resampled within each kind, the same questions for both sides).

Why a policy loses a question about one cell (`locate`, `colour_at`, `shape_at`; `scenes.asked_cell`): the report's
"asked cell's patches kept" table gives, per variant and budget, the share of that cell's image patches
(`model.cell_patches`) the cache held after prefill and after the last generated token (layer 0's slots for a
policy with per-layer capacities or per-head sets). `--ablate` adds `hae` taken apart, each under its own label:
DAP's prefill with StreamingLLM's decode (`dap_streaming`), StreamingLLM's or FastV's prefill with DDES's decode
(`streaming_ddes`, `fastv_ddes`), no visual-first eviction (`hae_no_visual_first`) and a greedy one-slot bin
(`hae_greedy_bin`); `--set` does not apply to them.

`--tune` chooses `hae`'s fields on the tuning split (`data.TUNE`, scenes disjoint from the test split's
`data.HELD_OUT`) by the mean score over `TUNE_BUDGETS`, then runs the chosen setting as `hae_tuned` on the test
split next to the paper's defaults (`hae`).

Writes `accuracy.csv`, `accuracy.md` (the tables) and `accuracy.png` (accuracy against KV budget, one line per
policy, one panel per task) under `--out`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import hae_fx
from hae_fx.cache import kept_positions
from hae_fx.config import PolicyConfig
from hae_fx.models.synthvlm import QUESTION_KINDS, WordTokenizer
from hae_fx.models.synthvlm.data import (
    HELD_OUT,
    TUNE,
    Conversation,
    Example,
    conversations,
    held_out,
    max_answer_tokens,
)
from hae_fx.models.synthvlm.evaluate import (
    CONVERSATION_ANSWER_TOKENS,
    answer_conversations,
    conversation_width,
    generate_answers,
    prompt_width,
    question_groups,
    score,
)
from hae_fx.models.synthvlm.model import cell_patches
from hae_fx.models.synthvlm.scenes import asked_cell
from hae_fx.policies import available, config_class, get_policy, sweep_config

BUDGETS = (1.0, 0.75, 0.5, 0.35, 0.2, 0.1)
QUICK_BUDGETS = (1.0, 0.5, 0.2)
TUNE_BUDGETS = (0.5, 0.2)
SINKS = 4
RESULTS = Path(__file__).parent / "results"
TURN_KINDS = ("turn1", "turn2", "turn3")  # a conversation's first question and its two follow-ups
BOOTSTRAP_SAMPLES = 2000
#: `hae` settings `--tune` tries on the tuning split: one field changed from the paper's defaults at a time
#: (`bin_fraction` is the recycle bin as a fraction of the capacity; `config_for`'s rule is 1/8)
HAE_GRID: tuple[dict[str, object], ...] = (
    {},
    {"bin_fraction": 0.0},
    {"bin_fraction": 0.25},
    {"score_source": "dap_layer"},
    {"visual_first": 0.0},
    {"decay": 0.05},
    {"r": 0.01, "alpha": 0.005},
)
#: kinds whose question concerns one scene cell (`scenes.asked_cell`): the report says how much of it was kept
CELL_KINDS = ("locate", "colour_at", "shape_at")


@dataclass(frozen=True)
class Variant:
    """A policy under test: whether `prune_hidden` is on, how its K/V slots are stored (None: model dtype), and
    fields that differ from `config_for`'s rule (a tuned setting, or `--set` for ablations), under its own `label`."""

    policy: str
    prune_hidden: bool = False
    kv_dtype: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        name = self.label or (f"{self.policy}_prune" if self.prune_hidden else self.policy) + \
            "".join(f"[{field}={value}]" for field, value in self.overrides)
        return f"{name}+{self.kv_dtype}" if self.kv_dtype else name

    @property
    def evicts(self) -> bool:
        return get_policy(self.policy).evicts


def config_fields(policy: str) -> set[str]:
    """The fields of `policy`'s config."""
    return {f.name for f in dataclasses.fields(config_class(policy))}


def variants(kv_dtypes: Sequence[str] = ()) -> list[Variant]:
    """Every registered policy; those with a `prune_hidden` field in both modes; each also with every one of
    `kv_dtypes`."""
    out = []
    for name in available():
        for kv_dtype in (None, *kv_dtypes):
            out.append(Variant(name, kv_dtype=kv_dtype))
            if "prune_hidden" in config_fields(name):
                out.append(Variant(name, prune_hidden=True, kv_dtype=kv_dtype))
    return out


#: `--ablate`: `hae` taken apart. Each `composed` variant is `<prefill half>_<decode half>`, `dap` and `ddes`
#: naming `hae`'s prefill (Dual-Attention Pruning) and decode (the DDES recycle bin); each half runs with
#: `config_for`'s rule, as the policy it comes from does on its own (so `fastv_ddes`'s FastV prunes the caches
#: only, like the `fastv` row)
ABLATIONS: tuple[Variant, ...] = (
    Variant("composed", overrides=(("prefill", "hae"), ("decode", "streaming")), label="dap_streaming"),
    Variant("composed", overrides=(("prefill", "streaming"), ("decode", "hae")), label="streaming_ddes"),
    Variant("composed", overrides=(("prefill", "fastv"), ("decode", "hae")), label="fastv_ddes"),
    Variant("hae", overrides=(("visual_first", 0.0),), label="hae_no_visual_first"),
    Variant("hae", overrides=(("bin_fraction", 0.0),), label="hae_greedy_bin"),
)


def config_for(variant: Variant, capacity: int) -> PolicyConfig:
    """The configuration a variant runs with at `capacity` slots.

    One rule for every policy: 4 sinks, a recent window of a quarter of the capacity (at most 16), and, for
    policies with a recycle bin, a bin of an eighth (at least 1; `bin_fraction` overrides the eighth). Every other
    field keeps its default (the papers' values: DAP thresholds, SnapKV's pooling, ...) unless the variant
    overrides it. A `composed` policy's halves, given by name, each get this rule too (with the variant's
    `prune_hidden`), not their config defaults.
    """
    overrides = dict(variant.overrides)
    for half in ("prefill", "decode"):
        if isinstance(overrides.get(half), str):
            overrides[half] = config_for(Variant(overrides[half], prune_hidden=variant.prune_hidden), capacity)
    bin_fraction = float(overrides.pop("bin_fraction", 1 / 8))
    return sweep_config(variant.policy, capacity=capacity, sinks=SINKS, window=max(1, min(16, capacity // 4)),
                        bin_size=max(1, int(capacity * bin_fraction)), prune_hidden=variant.prune_hidden,
                        kv_dtype=variant.kv_dtype, **overrides)


@dataclass
class Group:
    """Questions generated together: one prompt width and one answer length per turn (so one compiled shape).
    Either `examples` (single questions) or `conversations`."""

    name: str
    width: int
    new_tokens: int  # every token generated or fed after the prompt
    examples: list[Example] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def full_length(self) -> int:
        return self.width + self.new_tokens

    @property
    def size(self) -> int:
        return len(self.examples) + len(self.conversations)

    def capacity(self, budget: float) -> int:
        return max(1, round(budget * self.full_length))


def groups_of(tokenizer: WordTokenizer, examples: Sequence[Example],
              chats: Sequence[Conversation] = ()) -> list[Group]:
    """`question_groups`, each with the prompt width and answer length its full cache is sized for, and the
    conversations as one more group (its full cache holds every turn's question and answer)."""
    groups = [Group(name, prompt_width(tokenizer, group), max_answer_tokens({e.kind for e in group}), examples=group)
              for name, group in question_groups(examples).items()]
    if chats:
        follow_ups = sum(len(tokenizer.encode(turn.question)) for turn in chats[0].turns[1:])
        groups.append(Group("conversation", conversation_width(tokenizer, chats),
                            follow_ups + CONVERSATION_ANSWER_TOKENS * len(chats[0].turns), conversations=list(chats)))
    return groups


@dataclass
class Row:
    """One variant at one budget, over every group."""

    variant: str
    budget: float
    scores: dict[str, list[float]] = field(default_factory=dict)  # per kind, per question, in question order
    kv_bytes: float = 0.0  # per question, mean
    full_kv_bytes: float = 0.0  # what a full cache of the same groups holds, per question
    visual_kept_prefill: float = 0.0  # fraction of the prompt's visual tokens left after prefill
    visual_kept_end: float = 0.0  # ... and after the last generated token
    #: per `CELL_KINDS` kind, per question: the fraction of the asked cell's patches kept after prefill ...
    cell_kept_prefill: dict[str, list[float]] = field(default_factory=dict)
    cell_kept_end: dict[str, list[float]] = field(default_factory=dict)  # ... and after the last generated token
    seconds: float = 0.0

    @property
    def accuracy(self) -> dict[str, float]:
        return {kind: float(np.mean(values)) for kind, values in self.scores.items()}

    def headline(self, kinds: Sequence[str]) -> float:
        """The mean over `kinds` of their accuracies (each kind weighs the same)."""
        accuracy = self.accuracy
        return float(np.mean([accuracy[k] for k in kinds]))

    def as_dict(self, headline_kinds: Sequence[str]) -> dict[str, object]:
        row = {"policy": self.variant, "budget": self.budget,
               "kv_fraction": round(self.kv_bytes / self.full_kv_bytes, 4),
               "kv_bytes_per_question": round(self.kv_bytes),
               "visual_kept_prefill": round(self.visual_kept_prefill, 4),
               "visual_kept_end": round(self.visual_kept_end, 4)}
        row.update({kind: round(value, 4) for kind, value in self.accuracy.items()})
        row["headline"] = round(self.headline(headline_kinds), 4)
        row["overall"] = round(self.headline(list(self.scores)), 4)
        for kind in CELL_KINDS:
            if kind in self.scores:  # blank for rows written before the diagnostic existed (`--merge`)
                for when, kept in (("prefill", self.cell_kept_prefill), ("end", self.cell_kept_end)):
                    row[f"{kind}_cell_kept_{when}"] = round(float(np.mean(kept[kind])), 4) if kind in kept else ""
        row["seconds"] = round(self.seconds, 1)
        return row


def asked_cell_kept(example: Example, visual_positions: Sequence[int], kept: Collection[int]) -> float | None:
    """The fraction of the patches of the cell `example` asks about (`scenes.asked_cell`; a patch belongs to the
    cell holding its centre, `model.cell_patches`) whose logical positions are in `kept`, `visual_positions` being
    the prompt positions of the image's patches in row-major order; None for a question about the whole scene."""
    cell = asked_cell(example.scene, example.question)
    if cell is None:
        return None
    positions = [visual_positions[patch] for patch in cell_patches(cell, example.scene.grid_size)]
    return sum(p in kept for p in positions) / len(positions)


def fillable_kv_bytes(cache: hae_fx.HAECache, tokens: int) -> float:
    """K/V bytes per sequence of the slots a sequence of `tokens` tokens can fill: every slot of a cache no longer
    than the sequence, and no more than `tokens` of a longer ring (a window `full_windows` keeps whole)."""
    return sum(t.numel() * t.element_size() * min(layer.slots, tokens) / layer.slots
               for layer in cache.layers for t in layer.kv_tensors()) / cache.batch


class _CacheStats:
    """Collects, per generated question, the cache's KV bytes and how many of its visual tokens survived, and, per
    `CELL_KINDS` question, how many of the asked cell's (`asked_cell_kept`). The end of generation reads layer 0's
    slots (`kept_positions`): for a policy with per-layer capacities its largest, with a head axis any KV head's."""

    def __init__(self) -> None:
        self.full_length = 0  # the current group's full cache, in slots (`Group.full_length`)
        self.kv_bytes: list[float] = []
        self.visual_prefill: list[float] = []
        self.visual_end: list[float] = []
        self.cell_prefill: dict[str, list[float]] = {}
        self.cell_end: dict[str, list[float]] = {}

    def __call__(self, examples: Sequence[object], out) -> None:
        cache = out.past_key_values
        per_sequence = fillable_kv_bytes(cache, self.full_length)
        summary = hae_fx.report(cache)
        now = kept_positions(cache)
        for row, example in enumerate(examples):
            visual = set(cache.prompt_visual_positions[row])
            sequence = summary.sequences[row]
            self.kv_bytes.append(per_sequence)
            self.visual_prefill.append(len(visual.intersection(cache.prefill_kept[row])) / len(visual))
            self.visual_end.append(sequence.kept_visual / sequence.prompt_visual)
            if isinstance(example, Example) and example.kind in CELL_KINDS:  # not a conversation
                visual = cache.prompt_visual_positions[row]
                self.cell_prefill.setdefault(example.kind, []).append(
                    asked_cell_kept(example, visual, set(cache.prefill_kept[row])))
                self.cell_end.setdefault(example.kind, []).append(asked_cell_kept(example, visual, set(now[row])))


def _answer_group(model: torch.nn.Module, tokenizer: WordTokenizer, group: Group, batch_size: int,
                  stats: _CacheStats) -> dict[str, list[float]]:
    """Per-kind, per-question scores of one group's answers (conversations: one kind per turn)."""
    scores: dict[str, list[float]] = {}
    if group.conversations:
        answers = answer_conversations(model, tokenizer, group.conversations, batch_size=batch_size,
                                       width=group.width, on_batch=stats)
        for chat, said in zip(group.conversations, answers, strict=True):
            for kind, turn, answer in zip(TURN_KINDS, chat.turns, said, strict=True):
                scores.setdefault(kind, []).append(score(turn, answer))
        return scores
    answers = generate_answers(model, tokenizer, group.examples, batch_size=batch_size,
                               max_new_tokens=group.new_tokens, width=group.width, on_batch=stats)
    for example, answer in zip(group.examples, answers, strict=True):
        scores.setdefault(example.kind, []).append(score(example, answer))
    return scores


def run(base: torch.nn.Module, tokenizer: WordTokenizer, variant: Variant, budget: float, groups: Sequence[Group], *,
        batch_size: int, options: dict) -> Row:
    """Answer every group's questions with a fresh copy of `base` transformed for `variant` at `budget`."""
    row, stats = Row(variant.name, budget), _CacheStats()
    start = time.perf_counter()
    questions = 0
    for group in groups:
        model = hae_fx.transform(copy.deepcopy(base), config_for(variant, group.capacity(budget)), options=options)
        stats.full_length = group.full_length
        row.scores.update(_answer_group(model, tokenizer, group, batch_size, stats))
        questions += group.size
        # against a full cache in the model's dtype, whatever this variant stores
        full = hae_fx.HAECache.for_model(model, hae_fx.HAEConfig(policy="full", capacity=group.full_length), batch=1)
        row.full_kv_bytes += group.size * full.kv_nbytes
    row.seconds = time.perf_counter() - start
    row.scores = {kind: row.scores[kind] for kind in (*QUESTION_KINDS, *TURN_KINDS) if kind in row.scores}
    row.kv_bytes = sum(stats.kv_bytes) / questions
    row.full_kv_bytes /= questions
    row.visual_kept_prefill = sum(stats.visual_prefill) / questions
    row.visual_kept_end = sum(stats.visual_end) / questions
    row.cell_kept_prefill, row.cell_kept_end = stats.cell_prefill, stats.cell_end
    return row


# ------------------------------------------------------------------------------------------------ analysis


def inert_kinds(rows: Sequence[Row]) -> list[str]:
    """Kinds every row scores alike, at every budget: eviction is invisible there."""
    kinds = list(rows[0].scores)
    return [k for k in kinds if len({tuple(r.scores[k]) for r in rows}) == 1]


def headline_kinds(rows: Sequence[Row]) -> list[str]:
    """The kinds eviction can affect (every kind, if none can be told apart from the others)."""
    inert = set(inert_kinds(rows))
    return [k for k in rows[0].scores if k not in inert] or list(rows[0].scores)


def paired_bootstrap(a: Row, b: Row, kinds: Sequence[str], *, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """`a`'s headline minus `b`'s over `kinds`, and its 95% interval: questions resampled with replacement within
    each kind, the same resample for both rows (they answered the same questions)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for kind in kinds:
        diff = np.asarray(a.scores[kind]) - np.asarray(b.scores[kind])
        means += diff[rng.integers(len(diff), size=(samples, len(diff)))].mean(axis=1)
    means /= len(kinds)
    low, high = np.percentile(means, [2.5, 97.5])
    return a.headline(kinds) - b.headline(kinds), float(low), float(high)


def comparisons(rows: Sequence[Row], kinds: Sequence[str]) -> list[tuple[str, float, Row, Row]]:
    """The differences the report claims: at each budget the winner against the runner-up, `hae` against
    `streaming`, `hae_tuned` against `hae`, and `hae` (both settings) against `full`."""
    full = next((r for r in rows if r.variant == "full"), None)
    out = []
    for budget in sorted({r.budget for r in rows if r.budget < 1.0}, reverse=True):
        at = {r.variant: r for r in rows if r.budget == budget}
        ranked = sorted(at.values(), key=lambda r: -r.headline(kinds))
        if len(ranked) > 1:
            out.append(("winner vs runner-up", budget, ranked[0], ranked[1]))
        for a, b, what in (("hae", "streaming", "hae vs streaming"), ("hae_tuned", "hae", "tuned vs paper's")):
            if a in at and b in at:
                out.append((what, budget, at[a], at[b]))
        for name in ("hae", "hae_tuned"):
            if name in at and full is not None:
                out.append((f"{name} vs full", budget, at[name], full))
    return out


def markdown_table(rows: Sequence[Row], kinds: Sequence[str]) -> str:
    inert = [k for k in rows[0].scores if k not in kinds]
    header = ["policy", "budget", "KV vs full", "visual kept (prefill / end)", *kinds, "**headline**",
              *(f"{k} (inert)" for k in inert)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        accuracy = row.accuracy
        cells = [row.variant, f"{row.budget:.0%}", f"{row.kv_bytes / row.full_kv_bytes:.2f}x",
                 f"{row.visual_kept_prefill:.0%} / {row.visual_kept_end:.0%}",
                 *(f"{100 * accuracy[k]:.1f}" for k in kinds), f"**{100 * row.headline(kinds):.1f}**",
                 *(f"{100 * accuracy[k]:.1f}" for k in inert)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def asked_cell_table(rows: Sequence[Row]) -> str:
    """Per variant and budget, per `CELL_KINDS` kind: the mean fraction of the asked cell's patches kept after
    prefill and at the end of generation ("" when no row recorded it: rows merged from older runs)."""
    kinds = [k for k in CELL_KINDS if any(k in r.cell_kept_prefill for r in rows)]
    if not kinds:
        return ""
    lines = ["| policy | budget | " + " | ".join(kinds) + " |", "|" + "---|" * (2 + len(kinds))]
    for row in rows:
        cells = [f"{np.mean(row.cell_kept_prefill[k]):.0%} / {np.mean(row.cell_kept_end[k]):.0%}"
                 if k in row.cell_kept_prefill else "" for k in kinds]
        lines.append(f"| {row.variant} | {row.budget:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners_table(rows: Sequence[Row], kinds: Sequence[str]) -> str:
    """Per budget: the best variant on the headline, on single questions and on follow-ups."""
    single = [k for k in kinds if k in QUESTION_KINDS]
    turns = [k for k in kinds if k in TURN_KINDS[1:]]
    lines = ["| budget | best headline | best single questions | best follow-ups (turns 2-3) |", "|---|---|---|---|"]
    for budget in sorted({r.budget for r in rows if r.budget < 1.0}, reverse=True):
        at = [r for r in rows if r.budget == budget]
        cells = []
        for subset in (kinds, single, turns):
            if not subset:
                cells.append("")
                continue
            best = max(at, key=lambda r: r.headline(subset))
            cells.append(f"{best.variant} {100 * best.headline(subset):.1f}")
        lines.append(f"| {budget:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def differences_table(rows: Sequence[Row], kinds: Sequence[str]) -> str:
    lines = ["| comparison | budget | a | b | a − b (points) | 95% CI |", "|---|---|---|---|---|---|"]
    for what, budget, a, b in comparisons(rows, kinds):
        diff, low, high = paired_bootstrap(a, b, kinds)
        lines.append(f"| {what} | {budget:.0%} | {a.variant} {100 * a.headline(kinds):.1f} | "
                     f"{b.variant} {100 * b.headline(kinds):.1f} | {100 * diff:+.1f} | "
                     f"[{100 * low:+.1f}, {100 * high:+.1f}] |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], kinds: Sequence[str], path: Path) -> None:
    """Accuracy against KV fraction, one line per variant, one panel per task: single questions and follow-ups
    (the headline kinds of each) and, if any, the inert kinds."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    inert = [k for k in rows[0].scores if k not in kinds]
    panels = [(title, subset) for title, subset in (
        ("single questions (headline kinds)", [k for k in kinds if k in QUESTION_KINDS]),
        ("conversations (headline turns)", [k for k in kinds if k in TURN_KINDS]),
        ("inert kinds", inert)) if subset]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, subset) in zip(axes[0], panels, strict=True):
        for name in dict.fromkeys(r.variant for r in rows):
            points = sorted((r.kv_bytes / r.full_kv_bytes, 100 * r.headline(subset))
                            for r in rows if r.variant == name)
            if len(points) == 1:
                ax.axhline(points[0][1], color="grey", linestyle=":", label=f"{name} (100% KV)")
            else:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_ylim(0, 102)
        ax.set_xlabel("KV cache, fraction of a full cache")
        ax.set_ylabel("accuracy, mean over kinds (%)")
        ax.set_title(f"{title}:\n{', '.join(subset)}", fontsize=9)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("SynthVLM: accuracy against KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ tuning


def tune(base: torch.nn.Module, tokenizer: WordTokenizer, groups: Sequence[Group], *, batch_size: int,
         options: dict) -> tuple[dict[str, object], list[tuple[dict[str, object], float]]]:
    """The `HAE_GRID` setting with the best mean score (every kind, every `TUNE_BUDGETS` budget) on `groups`, the
    tuning split; returns it and every setting's score."""
    results = []
    for overrides in tqdm(HAE_GRID, desc="tune hae", unit="setting", leave=False):
        variant = Variant("hae", overrides=tuple(overrides.items()))
        rows = [run(base, tokenizer, variant, budget, groups, batch_size=batch_size, options=options)
                for budget in TUNE_BUDGETS]
        results.append((overrides, float(np.mean([r.headline(list(r.scores)) for r in rows]))))
    best = max(results, key=lambda item: item[1])[0]  # the first of equals: the defaults win ties
    return best, results


def _setting(overrides: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the paper's defaults"


# ------------------------------------------------------------------------------------------------ entry point


def _field_value(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, ast.literal_eval(value)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("synthvlm", "gemma-vlm", "gemma3-270m"), default="synthvlm",
                        help="the scene-task model (gemma-vlm needs `pip install \"hae_fx[gemma]\"`); gemma3-270m "
                             "runs benchmarks/retrieval.py with the options that follow")
    parser.add_argument("--quick", action="store_true", help="60 questions, 30 conversations and 3 budgets (CI)")
    parser.add_argument("--questions", type=int, default=None, help="test-split questions (default 600; quick 60)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="test-split conversations (default half the questions; 0: none)")
    parser.add_argument("--budgets", type=lambda s: tuple(float(b) for b in s.split(",")), default=None,
                        help="comma-separated fractions of the full cache")
    parser.add_argument("--policies", type=lambda s: s.split(","), default=None,
                        help="variants to run, e.g. full,streaming,hae,hae_prune,hae+int8 (default: all)")
    parser.add_argument("--kv-dtype", choices=("int8", "float8_e4m3fn"), action="append", default=[],
                        help="also run every variant with its K/V slots in this 8-bit form (repeatable)")
    parser.add_argument("--set", type=_field_value, action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field for every variant whose config has it, e.g. compensate=False (an "
                             "ablation; a Python literal; repeatable)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run hae taken apart: DAP or DDES with a baseline's other half, no visual-first, "
                             "a greedy bin (ABLATIONS)")
    parser.add_argument("--tune", action="store_true",
                        help="tune hae's fields on the tuning split and add the chosen setting as hae_tuned")
    parser.add_argument("--tune-questions", type=int, default=300, help="tuning-split questions (conversations: half)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="what runs the rewritten graphs: the ops' reference implementations (default: the "
                             "sweep transforms a model per variant, budget and group, and Inductor would spend most "
                             "of the time compiling), or Inductor")
    parser.add_argument("--rows-out", type=Path, default=None,
                        help="also write the rows (per-question scores) and the tuning table as JSON, for --merge")
    parser.add_argument("--merge", type=lambda s: [Path(p) for p in s.split(",")], default=None,
                        help="comma-separated --rows-out files of runs over the same questions (e.g. policies split "
                             "over processes): report them together instead of running")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/accuracy[_quick]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model and its caches live (float32 either way)")
    parser.add_argument("--lm-pack", type=Path, default=None,
                        help="Gemma-VLM: the folder `python -m hae_fx.models.gemma_vlm.lm_pack` wrote, for a machine "
                             "without the registry package")
    args, rest = parser.parse_known_args(argv)
    if rest and args.model != "gemma3-270m":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def _retrieval_main():
    """benchmarks/retrieval.py's `main`, loaded from next to this file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("retrieval_benchmark", Path(__file__).with_name("retrieval.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module.main


def scene_model(name: str, device: str = "cpu", lm_pack: Path | None = None):
    """`(model, tokenizer)` of a scene-task model on `device`: SynthVLM or Gemma-VLM (both answer `WordTokenizer`
    ids; Gemma-VLM's language model from the registry, or from `lm_pack`'s folder)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         "run on a GPU machine or use --device cpu")
    if name == "gemma-vlm":
        from hae_fx.models.gemma_vlm.model import load as load_gemma_vlm

        return load_gemma_vlm(device=device, pack=lm_pack)
    if lm_pack is not None:
        raise SystemExit("--lm-pack is Gemma-VLM's language model; use it with --model gemma-vlm")
    from hae_fx.models.synthvlm.model import load as load_synthvlm

    return load_synthvlm(device=device)


def selected_variants(args: argparse.Namespace) -> list[Variant]:
    """The variants `--policies` names (all by default), with `--set`'s fields, then `--ablate`'s."""
    every = variants(args.kv_dtype)
    chosen = [v for v in every if args.policies is None or v.name in args.policies]
    if args.set:
        chosen = [dataclasses.replace(v, overrides=tuple((name, value) for name, value in args.set
                                                        if name in config_fields(v.policy))) for v in chosen]
    if args.ablate:
        chosen += ABLATIONS
    if not chosen and not args.tune:
        raise SystemExit(f"--policies matched none of {[v.name for v in every]}")
    return chosen


def main(argv: list[str] | None = None) -> list:
    args, rest = parse_args(argv)
    if args.model == "gemma3-270m":
        return _retrieval_main()(rest + (["--quick"] if args.quick else []))
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = args.questions or (60 if args.quick else 600)
    chats = questions // 2 if args.conversations is None else args.conversations
    budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    name = "accuracy" + ("_gemma_vlm" if args.model == "gemma-vlm" else "") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    chosen = selected_variants(args)

    if args.merge:
        rows, tuning = [], ""
        for path in args.merge:
            saved = json.loads(path.read_text())
            rows += [Row(**fields) for fields in saved["rows"]]
            tuning += saved["tuning"]
        _write_report(rows, tuning, out, argv, f"merged from {', '.join(map(str, args.merge))}")
        return rows

    base, tokenizer = scene_model(args.model, args.device, args.lm_pack)
    groups = groups_of(tokenizer, held_out(questions, stream=HELD_OUT), conversations(chats, HELD_OUT))
    options = {"hae.compiler": args.compiler}
    print(f"test split: {questions} questions and {chats} conversations in groups "
          + ", ".join(f"{g.name} ({g.size}, full cache {g.full_length} slots)" for g in groups))
    start = time.perf_counter()
    tuning = ""
    if args.tune:
        tune_groups = groups_of(tokenizer, held_out(args.tune_questions, stream=TUNE),
                                conversations(args.tune_questions // 2, TUNE) if chats else ())
        best, results = tune(base, tokenizer, tune_groups, batch_size=args.batch_size, options=options)
        chosen.append(Variant("hae", overrides=tuple(best.items()), label="hae_tuned"))
        tuning = ("Tuning split (`data.TUNE`, " + f"{args.tune_questions} questions, {args.tune_questions // 2} "
                  f"conversations), mean over every kind at {', '.join(f'{b:.0%}' for b in TUNE_BUDGETS)}:\n\n"
                  "| `hae` setting | tuning score |\n|---|---|\n"
                  + "\n".join(f"| {_setting(o)} | {100 * v:.1f} |" for o, v in results)
                  + f"\n\nChosen (`hae_tuned`): {_setting(best)}.\n\n")
        print(tuning)
    runs = [(v, b) for v in chosen for b in (budgets if v.evicts else (1.0,))]
    rows: list[Row] = []
    progress = tqdm(runs, desc="accuracy", unit="run")
    for variant, budget in progress:
        progress.set_postfix_str(f"{variant.name} {budget:.0%}")
        rows.append(run(base, tokenizer, variant, budget, groups, batch_size=args.batch_size, options=options))
        row = rows[-1]
        progress.write(f"{row.variant:>10} {row.budget:>5.0%}  KV {row.kv_bytes / row.full_kv_bytes:.2f}x  "
                       f"visual kept {row.visual_kept_prefill:.0%}/{row.visual_kept_end:.0%}  "
                       f"all kinds {100 * row.headline(list(row.scores)):.1f}  ({row.seconds:.0f} s)")
    progress.close()
    if args.rows_out:
        args.rows_out.write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "tuning": tuning}))
    _write_report(rows, tuning, out, argv,
                  f"{args.model}, {questions} questions, {chats} conversations, compiler {args.compiler}, "
                  f"{args.device}, torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
                  f"{time.perf_counter() - start:.0f} s")
    return rows


def _write_report(rows: Sequence[Row], tuning: str, out: Path, argv: list[str] | None, facts: str) -> None:
    """The tables (printed and `accuracy.md`), `accuracy.csv` and `accuracy.png` of `rows`."""
    kinds = headline_kinds(rows)
    inert = [k for k in rows[0].scores if k not in kinds]
    report = (f"Headline kinds (eviction changes their score somewhere): {', '.join(kinds)}. Inert kinds (every "
              f"variant, every budget, the same per-question scores): {', '.join(inert) or 'none'}.\n\n"
              f"{markdown_table(rows, kinds)}\n\nBest per budget:\n\n{winners_table(rows, kinds)}\n\n"
              f"Differences (headline points, paired bootstrap over questions, {BOOTSTRAP_SAMPLES} resamples):\n\n"
              f"{differences_table(rows, kinds)}\n")
    if cells := asked_cell_table(rows):
        report += ("\nAsked cell's patches kept (prefill / end): per question about one cell, the share of that "
                   "cell's image patches the cache held after prefill and after the last generated token (layer "
                   f"0's slots), mean over the kind's questions:\n\n{cells}\n")
    print(report)
    command = " ".join(["python benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)])
    (out / "accuracy.md").write_text(f"`{command}` ({facts})\n\n{tuning}{report}")
    with (out / "accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].as_dict(kinds)))
        writer.writeheader()
        writer.writerows(r.as_dict(kinds) for r in rows)
    plot(rows, kinds, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.csv'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
