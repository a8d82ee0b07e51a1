"""Long-context retrieval and streaming perplexity on real text, with the real Gemma 3 270M, for every policy.

    python benchmarks/retrieval.py            # every retrieval task at 1k and 2k tokens; perplexity over 256
    python benchmarks/retrieval.py --quick    # CI-sized: one 256-token passkey prompt, evicting policies at 50%
    python benchmarks/retrieval.py --tasks passkey --lengths 1024 --policies hae --tune   # and `hae_tuned`

RULER-style tasks, each sample generated deterministically from `--seed` over the King James Bible
(`hae_fx.models.corpus`):

- `passkey`: a five-digit pass key hidden at evenly spaced depths in the text; asked for after it.
- `multikey`: four "special magic number for <word>" facts at seeded depths; asked for one of them.
- `vartrack`: RULER's variable tracking, asked for a value: `VAR A = 12345.` then `VAR B = VAR A.` and two more
  links, in order at seeded depths, beside a second chain with another number; asked for the value of the last
  variable of the first chain, which only following every link gives.
- `followup`: the same four facts; three of them asked one after another, each question appended to the history
  (everything generated so far) and answered on the cache the previous turn returned, as a chat UI asks follow-ups
  (`generate(input_ids=history + question, past_key_values=returned_cache)`); scored per turn.
- `perplexity`: the text itself, read as StreamingLLM measures it: a short prefix is the prompt, every later token
  is fed through the decode loop (forced, so the cache evicts as it goes) and scored by its next-token NLL.

HF's own `generate` with its full cache is the reference (follow-ups continue on HF's own cache). A retrieval task is
kept only where that reference scores >= 90% (a follow-up task: on every turn); a dropped task is reported, not
run. Then every policy in `hae_fx.policies.available()` runs through `hae_fx.transform`: the evicting ones at
budgets of 10/20/35/50/75% of the sequence (prompt + new tokens), `full` at 100%, with the same rule for sinks,
window and bin as `benchmarks/accuracy.py`. On 2 CPU cores each policy and budget costs a transform and a prefill
of every sample, and the default sweep takes hours (one task at 1k tokens, 8 samples: 22 minutes). Writes
`retrieval.csv`, `retrieval.md` and `retrieval.png` (score against
budget, one line per policy, one panel per task) under `--out`.

`--tune` chooses `hae`'s text-prompt fields (`TEXT_GRID`: the observation window, the pooling width, the layer
DAP reads, the decode score, the recycle bin's size) on a tuning split, the same tasks drawn from `--seed + 1`
(other keys, other verses, the same depths), by the mean score over `TUNE_BUDGETS`; then it runs the chosen setting
as `hae_tuned` on the test split next to `hae`'s defaults, and `retrieval.md` lists every setting's tuning score.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import random
import re
import string
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.config import PolicyConfig
from hae_fx.kv_quant import KV_DTYPES
from hae_fx.models import corpus
from hae_fx.models.gemma3_270m import load
from hae_fx.policies import available, get_policy, sweep_config

BUDGETS = (0.75, 0.5, 0.35, 0.2, 0.1)  # evicting policies; `full` runs at 100%
SINKS = 4
KEEP_THRESHOLD = 0.9  # a retrieval task counts only where HF's full cache scores at least this
RESULTS = Path(__file__).parent / "results"
RETRIEVAL_TASKS = ("passkey", "multikey", "vartrack", "followup")
FOLLOWUP_TURNS = 3  # questions per follow-up sample, each about a different one of its facts
#: `hae` settings `--tune` tries: its text-prompt fields, one changed from the defaults at a time
TEXT_GRID: tuple[dict[str, object], ...] = (
    {},
    {"observation_window": 8},
    {"observation_window": 16},
    {"observation_window": 64},
    {"pool_kernel": 3},
    {"pool_kernel": 11},
    {"pool_kernel": 15},
    {"dap_layer": 11},  # Gemma 3 270M's second full-attention layer (`dap_global` turns the default 1 into 5)
    {"score_source": "dap_layer"},
    {"bin_size": 1},  # greedy: every slot holds an active token once decode frees the prefill's bin
    {"bin_size": 16},  # a fixed bin where the sweep's rule gives an eighth of the capacity
)
TUNE_BUDGETS = (0.2, 0.1)  # where eviction bites: at 35% and above `hae`'s defaults already keep every key
ANSWER_TOKENS = 7  # " " and five digits (Gemma writes digits one token each), and one spare

PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the pass key.\n\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nQuestion: What is the pass key mentioned in the text above?\nAnswer: The pass key is"
MULTIKEY_INTRO = ("Some special magic numbers are hidden inside the following text. Make sure to memorize them. "
                  "I will quiz you about the numbers afterwards.\n\n")
MULTIKEY_NEEDLE = " One of the special magic numbers for {word} is: {key}."
MULTIKEY_QUESTION = ("\n\nQuestion: What is the special magic number for {word} mentioned in the text above?\n"
                     "Answer: The special magic number for {word} is")
MULTIKEY_WORDS = ("apple", "river", "candle", "garden", "violin", "harbor", "lantern", "marble", "falcon", "meadow",
                  "copper", "island", "thunder", "pepper", "saddle", "window", "orchard", "compass", "velvet", "tiger")
MULTIKEY_NEEDLES = 4
VARTRACK_INTRO = "Memorize and track the chain of variable assignments hidden in the following text. "
VARTRACK_VALUE = " VAR {name} = {key}."
VARTRACK_LINK = " VAR {name} = VAR {source}."
VARTRACK_QUESTION = ("\n\nQuestion: What is the value of VAR {name} in the text above?\n"
                     "Answer: The value of VAR {name} is")
VARTRACK_HOPS = 3  # links after the value's own assignment
VARTRACK_CHAINS = 2  # the asked chain and one distractor


@dataclass(frozen=True)
class Sample:
    """One prompt. Retrieval: `answer` is the number to retrieve. Perplexity: `targets` are the tokens that the
    decode loop is fed and scored on, after the prompt. Follow-ups: `follow_ups` are the later questions' tokens and
    their answers, asked one after another after the first."""

    prompt: tuple[int, ...]
    answer: str = ""
    targets: tuple[int, ...] = ()
    follow_ups: tuple[tuple[tuple[int, ...], str], ...] = ()


@dataclass(frozen=True)
class TaskSet:
    """Samples of one task at one length; every prompt has the same length, so one compiled prefill shape."""

    task: str
    length: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.task}@{self.length}"

    @property
    def max_new_tokens(self) -> int:
        return len(self.samples[0].targets) if self.task == "perplexity" else ANSWER_TOKENS

    @property
    def sequence(self) -> int:
        """Tokens a full cache holds at the end: the prompt and every new token (follow-ups: every later question
        and its answer too)."""
        later = sum(len(ids) + self.max_new_tokens for ids, _ in self.samples[0].follow_ups)
        return len(self.samples[0].prompt) + self.max_new_tokens + later

    def capacity(self, budget: float) -> int:
        return max(1, round(budget * self.sequence))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _filler(tokenizer, n_tokens: int, seed: int) -> list[list[int]]:
    """`n_tokens` tokens of consecutive verses, as one token list per verse (the last one cut to fit)."""
    out, total = [], 0
    verses: Iterator[str] = corpus.stream(seed)
    while total < n_tokens:
        ids = _encode(tokenizer, " " + next(verses))[: n_tokens - total]
        out.append(ids)
        total += len(ids)
    return out


def _haystack(tokenizer, length: int, intro: str, needles: Sequence[tuple[float, str]], question: str,
              seed: int) -> tuple[int, ...]:
    """`<bos> intro verses... question`, exactly `length` tokens, each needle placed between the verses at
    its depth (a fraction of the verse text)."""
    intro_ids = [tokenizer.bos_token_id, *_encode(tokenizer, intro)]
    needle_ids = [(depth, _encode(tokenizer, text)) for depth, text in needles]
    question_ids = _encode(tokenizer, question)
    room = length - len(intro_ids) - len(question_ids) - sum(len(ids) for _, ids in needle_ids)
    if room < 16:
        raise ValueError(f"length {length} leaves no room for text around the needles and the question")
    verses = _filler(tokenizer, room, seed)
    pending = sorted(needle_ids, key=lambda needle: needle[0])
    body: list[int] = []
    seen = 0
    for verse in verses:
        while pending and seen >= pending[0][0] * room:
            body += pending.pop(0)[1]
        body += verse
        seen += len(verse)
    for _, ids in pending:
        body += ids
    prompt = (*intro_ids, *body, *question_ids)
    assert len(prompt) == length, (len(prompt), length)
    return prompt


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{index}")


def passkey(tokenizer, length: int, n: int, seed: int) -> TaskSet:
    """Pass keys at depths (i + 0.5) / n of the text, so the samples sweep the whole context."""
    samples = []
    for i in range(n):
        rng = _rng(seed, "passkey", length, i)
        key = str(rng.randrange(10_000, 100_000))
        prompt = _haystack(tokenizer, length, PASSKEY_INTRO, [((i + 0.5) / n, PASSKEY_NEEDLE.format(key=key))],
                           PASSKEY_QUESTION, rng.randrange(2**31))
        samples.append(Sample(prompt, answer=key))
    return TaskSet("passkey", length, tuple(samples))


def _facts(rng: random.Random, words: Sequence[str]) -> tuple[list[str], list[str], list[tuple[float, str]]]:
    """`MULTIKEY_NEEDLES` distinct words from `words`, a distinct five-digit number for each, and the needles that
    state them at seeded depths (fractions of the haystack)."""
    chosen = rng.sample(words, MULTIKEY_NEEDLES)
    keys = [str(k) for k in rng.sample(range(10_000, 100_000), MULTIKEY_NEEDLES)]
    needles = [(rng.random(), MULTIKEY_NEEDLE.format(word=w, key=k)) for w, k in zip(chosen, keys, strict=True)]
    return chosen, keys, needles


def multikey(tokenizer, length: int, n: int, seed: int) -> TaskSet:
    """`MULTIKEY_NEEDLES` facts (distinct words, distinct numbers) at seeded depths; the question names one."""
    samples = []
    for i in range(n):
        rng = _rng(seed, "multikey", length, i)
        words, keys, needles = _facts(rng, MULTIKEY_WORDS)
        asked = rng.randrange(MULTIKEY_NEEDLES)
        prompt = _haystack(tokenizer, length, MULTIKEY_INTRO, needles,
                           MULTIKEY_QUESTION.format(word=words[asked]), rng.randrange(2**31))
        samples.append(Sample(prompt, answer=keys[asked]))
    return TaskSet("multikey", length, tuple(samples))


def _variable_names(rng: random.Random, count: int) -> list[str]:
    """`count` distinct five-letter upper-case names (RULER's variables)."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


def vartrack(tokenizer, length: int, n: int, seed: int) -> TaskSet:
    """`VARTRACK_CHAINS` chains, each a distinct five-digit number assigned to a variable and copied along
    `VARTRACK_HOPS` links, every assignment after the one it copies (sorted seeded depths); the question asks for
    the first chain's last variable."""
    samples = []
    for i in range(n):
        rng = _rng(seed, "vartrack", length, i)
        names = _variable_names(rng, VARTRACK_CHAINS * (VARTRACK_HOPS + 1))
        chains = [names[start:start + VARTRACK_HOPS + 1] for start in range(0, len(names), VARTRACK_HOPS + 1)]
        keys = [str(k) for k in rng.sample(range(10_000, 100_000), VARTRACK_CHAINS)]
        needles = []
        for chain_names, key in zip(chains, keys, strict=True):
            depths = sorted(rng.random() for _ in chain_names)
            needles.append((depths[0], VARTRACK_VALUE.format(name=chain_names[0], key=key)))
            needles += [(depth, VARTRACK_LINK.format(name=name, source=source))
                        for depth, source, name in zip(depths[1:], chain_names[:-1], chain_names[1:], strict=True)]
        prompt = _haystack(tokenizer, length, VARTRACK_INTRO, needles,
                           VARTRACK_QUESTION.format(name=chains[0][-1]), rng.randrange(2**31))
        samples.append(Sample(prompt, answer=keys[0]))
    return TaskSet("vartrack", length, tuple(samples))


def followup(tokenizer, length: int, n: int, seed: int) -> TaskSet:
    """`multikey`'s facts, `FOLLOWUP_TURNS` of them asked in turn (a seeded order). The words asked in a turn differ
    between samples, so they come from `MULTIKEY_WORDS`' one-token words: every sample's turn has one length, as
    one batch needs."""
    words = [w for w in MULTIKEY_WORDS if len(_encode(tokenizer, f" {w}")) == 1]
    samples = []
    for i in range(n):
        rng = _rng(seed, "followup", length, i)
        chosen, keys, needles = _facts(rng, words)
        asked = rng.sample(range(MULTIKEY_NEEDLES), FOLLOWUP_TURNS)
        prompt = _haystack(tokenizer, length, MULTIKEY_INTRO, needles,
                           MULTIKEY_QUESTION.format(word=chosen[asked[0]]), rng.randrange(2**31))
        later = tuple((tuple(_encode(tokenizer, MULTIKEY_QUESTION.format(word=chosen[a]))), keys[a]) for a in asked[1:])
        samples.append(Sample(prompt, answer=keys[asked[0]], follow_ups=later))
    return TaskSet("followup", length, tuple(samples))


def perplexity(tokenizer, length: int, n: int, seed: int, prefix: int = 32) -> TaskSet:
    """`length` tokens of text from a seeded verse: `<bos>` and `prefix - 1` tokens prompt, the rest targets."""
    samples = []
    for i in range(n):
        text = [tokenizer.bos_token_id, *(t for verse in _filler(tokenizer, length - 1,
                                                                  _rng(seed, "perplexity", length, i).randrange(2**31))
                                          for t in verse)]
        samples.append(Sample(tuple(text[:prefix]), targets=tuple(text[prefix:])))
    return TaskSet("perplexity", length, tuple(samples))


class ForcedTokens(LogitsProcessor):
    """Makes greedy decoding emit `targets` and records each target's log-probability under the raw logits.

    The model still computes every step from its own (evicting) cache: only the choice of the next token is
    forced, as when StreamingLLM feeds a text through its decode loop.
    """

    def __init__(self, targets: torch.Tensor, prompt_length: int) -> None:
        self.targets = targets  # [B, T]
        self.prompt_length = prompt_length
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        target = self.targets[:, step : step + 1].to(scores.device)
        self.logprobs.append(torch.log_softmax(scores.float(), dim=-1).gather(1, target)[:, 0])
        return torch.full_like(scores, -math.inf).scatter_(1, target, 0.0)


@dataclass
class Row:
    """One policy at one budget on one task set."""

    policy: str
    task: str
    budget: float
    capacity: int
    score: float  # retrieval: fraction correct (follow-ups: mean over turns); perplexity: exp(mean NLL)
    kv_bytes: int | None  # per sequence, as the cache allocated it; None for HF's own cache
    seconds: float
    turns: tuple[float, ...] = ()  # follow-ups: fraction correct per turn

    def as_dict(self) -> dict[str, object]:
        return {"task": self.task, "policy": self.policy, "budget": self.budget, "capacity": self.capacity,
                "score": round(self.score, 4), "turns": "/".join(f"{t:.4f}" for t in self.turns),
                "kv_bytes_per_sequence": self.kv_bytes, "seconds": round(self.seconds, 1)}


def run_taskset(model: torch.nn.Module, tokenizer, taskset: TaskSet,
                batch_size: int) -> tuple[float, int | None, tuple[float, ...]]:
    """Generate for every sample; returns `(score, KV bytes per sequence or None, per-turn scores)`: the score is
    the fraction correct (follow-ups: the mean over turns, each also returned) or the perplexity."""
    correct, nll, kv_bytes = [0] * (1 + len(taskset.samples[0].follow_ups)), [], None
    config = GenerationConfig(do_sample=False, max_new_tokens=taskset.max_new_tokens, min_new_tokens=0,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              return_dict_in_generate=True)
    for start in range(0, len(taskset.samples), batch_size):
        batch = taskset.samples[start : start + batch_size]
        input_ids = torch.tensor([s.prompt for s in batch])
        kwargs = {}
        if taskset.task == "perplexity":
            forced = ForcedTokens(torch.tensor([s.targets for s in batch]), input_ids.shape[1])
            kwargs["logits_processor"] = LogitsProcessorList([forced])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=config, **kwargs)
            answers = [(out.sequences[:, input_ids.shape[1]:], [s.answer for s in batch])]
            for turn in range(len(batch[0].follow_ups)):  # each question on the cache the last turn returned
                history = torch.cat([out.sequences, torch.tensor([s.follow_ups[turn][0] for s in batch])], dim=1)
                out = model.generate(input_ids=history, attention_mask=torch.ones_like(history),
                                     past_key_values=out.past_key_values, generation_config=config)
                answers.append((out.sequences[:, history.shape[1]:], [s.follow_ups[turn][1] for s in batch]))
        cache = out.past_key_values
        if isinstance(cache, hae_fx.HAECache):
            kv_bytes = cache.kv_nbytes // cache.batch
        if taskset.task == "perplexity":
            nll.append(-torch.stack(forced.logprobs, dim=1))
            continue
        for turn, (generated, expected) in enumerate(answers):
            for tokens, answer in zip(generated, expected, strict=True):
                correct[turn] += first_number(tokenizer.decode(tokens, skip_special_tokens=True)) == answer
    if taskset.task == "perplexity":
        return torch.cat(nll).mean().exp().item(), kv_bytes, ()
    turns = tuple(c / len(taskset.samples) for c in correct)
    return sum(turns) / len(turns), kv_bytes, turns if taskset.task == "followup" else ()


def first_number(text: str) -> str:
    """The first run of digits in `text` (RULER scores by the answer's presence; this is stricter)."""
    match = re.search(r"\d+", text)
    return match.group() if match else ""


def config_for(policy: str, capacity: int, kv_dtype: str | None = None,
               overrides: dict[str, object] | None = None) -> PolicyConfig:
    """`benchmarks/accuracy.py`'s rule: 4 sinks, a window of a quarter of the capacity (at most 16), a bin of an
    eighth (policies without a bin leave it out); `kv_dtype` stores the K/V slots in that 8-bit form; `overrides`
    replace fields after that (a tuned setting)."""
    config = sweep_config(policy, capacity=capacity, sinks=SINKS, window=max(1, min(16, capacity // 4)),
                          bin_size=max(1, capacity // 8), kv_dtype=kv_dtype)
    return replace(config, **overrides) if overrides else config


@dataclass(frozen=True)
class Run:
    """One policy setting at one budget: `label` names its rows."""

    label: str
    policy: str
    budget: float
    kv_dtype: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    def transformed(self, base: torch.nn.Module, taskset: TaskSet, options: dict) -> torch.nn.Module:
        config = config_for(self.policy, taskset.capacity(self.budget), self.kv_dtype, dict(self.overrides))
        return hae_fx.transform(copy.deepcopy(base), config, options=options)


def tune(base: torch.nn.Module, tokenizer, tasks: Sequence[TaskSet], *, batch_size: int,
         options: dict) -> tuple[dict[str, object], list[tuple[dict[str, object], float]]]:
    """The `TEXT_GRID` setting of `hae` with the best mean score over `tasks` (the tuning split) and `TUNE_BUDGETS`;
    returns it and every setting's score. The first of equals wins, so the defaults win ties."""
    results = []
    for overrides in tqdm(TEXT_GRID, desc="tune hae", unit="setting", leave=False):
        scores = [run_taskset(Run("hae", "hae", budget, overrides=tuple(overrides.items())).transformed(
                      base, taskset, options), tokenizer, taskset, batch_size)[0]
                  for taskset in tasks for budget in TUNE_BUDGETS]
        results.append((overrides, sum(scores) / len(scores)))
    return max(results, key=lambda item: item[1])[0], results


def _setting(overrides: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the defaults"


def build_tasks(tokenizer, args: argparse.Namespace, seed: int | None = None) -> list[TaskSet]:
    """The tasks `args` asks for, drawn from `seed` (default `args.seed`)."""
    seed = args.seed if seed is None else seed
    makers = {"passkey": passkey, "multikey": multikey, "vartrack": vartrack, "followup": followup}
    tasks = [makers[t](tokenizer, length, args.samples, seed) for t in args.tasks if t in makers
             for length in args.lengths]
    if "perplexity" in args.tasks:
        tasks.append(perplexity(tokenizer, args.ppl_length, args.ppl_samples, seed))
    return tasks


def markdown_table(rows: Sequence[Row], dropped: Sequence[str]) -> str:
    tasks = list(dict.fromkeys(r.task for r in rows))
    budgets = sorted({r.budget for r in rows}, reverse=True)
    lines = ["| task | policy | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for task in tasks:
        for policy in dict.fromkeys(r.policy for r in rows if r.task == task):
            cells = {r.budget: r for r in rows if r.task == task and r.policy == policy}
            lines.append(f"| {task} | {policy} | " + " | ".join(_cell(cells.get(b)) for b in budgets) + " |")
    lines += [f"\nDropped: {d}" for d in dropped]
    return "\n".join(lines)


def _cell(row: Row | None) -> str:
    if row is None:
        return ""
    if row.turns:
        return f"{100 * row.score:.0f} ({'/'.join(f'{100 * t:.0f}' for t in row.turns)})"
    return f"{row.score:.2f}" if row.task.startswith("perplexity") else f"{100 * row.score:.0f}"


def plot(rows: Sequence[Row], path: Path) -> None:
    """Score against budget, one panel per task that ran (none: no file)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows if r.policy != "hf"))  # a dropped task has only HF's row
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        ppl = task.startswith("perplexity")
        for policy in dict.fromkeys(r.policy for r in rows if r.task == task):
            points = sorted((r.budget, r.score if ppl else 100 * r.score)
                            for r in rows if r.task == task and r.policy == policy)
            if len(points) == 1:
                ax.axhline(points[0][1], color="grey" if policy == "hf" else "black", linestyle=":",
                           label=f"{policy} (full)")
            else:
                ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set_title(task)
        ax.set_xlabel("KV budget, fraction of the sequence")
        ax.set_ylabel("perplexity" if ppl else "accuracy (%)")
        if not ppl:
            ax.set_ylim(-2, 102)
        ax.set_xlim(1.03, 0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gemma 3 270M: score against KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: one 256-token passkey prompt, evicting policies at 50%%")
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=None,
                        help="comma-separated from passkey,multikey,vartrack,followup,perplexity (default: all; "
                             "quick: passkey)")
    parser.add_argument("--lengths", type=_ints, default=None, help="retrieval prompt tokens (default 1024,2048)")
    parser.add_argument("--samples", type=int, default=None, help="samples per retrieval task and length (8)")
    parser.add_argument("--ppl-length", type=int, default=256, help="perplexity text tokens, prefix included")
    parser.add_argument("--ppl-samples", type=int, default=2, help="perplexity texts")
    parser.add_argument("--budgets", type=lambda s: tuple(float(b) for b in s.split(",")), default=None,
                        help="comma-separated fractions of the sequence, for the evicting policies")
    parser.add_argument("--policies", type=lambda s: s.split(","), default=None, help="default: all registered")
    parser.add_argument("--kv-dtype", choices=sorted(KV_DTYPES), action="append", default=[],
                        help="also run every policy with its K/V slots in this 8-bit form (rows `policy+int8`)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true",
                        help="tune hae's text-prompt fields on the --seed + 1 split, add the chosen setting as "
                             "hae_tuned (retrieval tasks only)")
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="what runs the rewritten graphs: the ops' reference implementations, or Inductor")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/retrieval[_quick]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.tasks = args.tasks or (["passkey"] if args.quick else [*RETRIEVAL_TASKS, "perplexity"])
    args.lengths = args.lengths or ((256,) if args.quick else (1024, 2048))
    args.samples = args.samples or (1 if args.quick else 8)
    args.budgets = args.budgets or ((0.5,) if args.quick else BUDGETS)
    args.policies = args.policies or available()
    args.out = args.out or RESULTS / ("retrieval_quick" if args.quick else "retrieval")
    unknown = set(args.tasks) - {*RETRIEVAL_TASKS, "perplexity"}
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}")
    if args.tune and not set(args.tasks) & set(RETRIEVAL_TASKS):
        parser.error("--tune scores retrieval tasks: add one of " + ",".join(RETRIEVAL_TASKS) + " to --tasks")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load()
    tasks = build_tasks(tokenizer, args)
    options = {"hae.compiler": args.compiler}
    runs = [Run(f"{p}+{kv}" if kv else p, p, b, kv) for p in args.policies for kv in (None, *args.kv_dtype)
            for b in (args.budgets if get_policy(p).evicts else (1.0,))]
    start = time.perf_counter()
    tuning = ""
    if args.tune:
        tune_tasks = [t for t in build_tasks(tokenizer, args, args.seed + 1) if t.task in RETRIEVAL_TASKS]
        best, results = tune(base, tokenizer, tune_tasks, batch_size=args.batch_size, options=options)
        runs += [Run("hae_tuned", "hae", b, overrides=tuple(best.items())) for b in args.budgets]
        tuning = (f"Tuning split (seed {args.seed + 1}: {', '.join(t.name for t in tune_tasks)}), mean % correct at "
                  f"budgets {', '.join(f'{b:.0%}' for b in TUNE_BUDGETS)}; `hae_tuned` is "
                  f"{_setting(best)}:\n\n| setting | score |\n|---|---|\n"
                  + "".join(f"| {_setting(o)} | {100 * score:.1f} |\n" for o, score in results) + "\n")
        print(tuning)
    rows: list[Row] = []
    dropped: list[str] = []
    progress = tqdm(total=len(tasks) * (1 + len(runs)), desc="retrieval", unit="run")
    for taskset in tasks:
        progress.set_postfix_str(f"{taskset.name} hf")
        began = time.perf_counter()
        score, _, turns = run_taskset(base, tokenizer, taskset, args.batch_size)
        rows.append(Row("hf", taskset.name, 1.0, taskset.sequence, score, None, time.perf_counter() - began, turns))
        progress.update()
        if taskset.task in RETRIEVAL_TASKS and min(turns or (score,)) < KEEP_THRESHOLD:
            dropped.append(f"{taskset.name}: HF's full cache scores {_cell(rows[-1])}% < {100 * KEEP_THRESHOLD:.0f}%"
                           + (" on a turn" if turns else ""))
            progress.write(f"dropped {dropped[-1]}")
            progress.update(len(runs))
            continue
        for run in runs:
            progress.set_postfix_str(f"{taskset.name} {run.label} {run.budget:.0%}")
            began = time.perf_counter()
            model = run.transformed(base, taskset, options)
            score, kv_bytes, turns = run_taskset(model, tokenizer, taskset, args.batch_size)
            rows.append(Row(run.label, taskset.name, run.budget, taskset.capacity(run.budget), score, kv_bytes,
                            time.perf_counter() - began, turns))
            del model
            progress.update()
    progress.close()
    table = markdown_table(rows, dropped)
    print(table)
    command = " ".join(["python benchmarks/retrieval.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "retrieval.md").write_text(
        f"`{command}` (tasks {', '.join(t.name for t in tasks)}, seed {args.seed}, compiler {args.compiler}, "
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{time.perf_counter() - start:.0f} s)\n\nRetrieval: % correct (follow-ups: mean over turns, then each "
        f"turn); perplexity: exp(mean NLL).\n\n{tuning}{table}\n")
    with (args.out / "retrieval.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    plot(rows, args.out / "retrieval.png")
    print(f"wrote {args.out / 'retrieval.csv'}, {args.out / 'retrieval.md'} and, for the tasks that ran, "
          f"{args.out / 'retrieval.png'}")
    return rows


if __name__ == "__main__":
    main()
