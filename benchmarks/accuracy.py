"""Accuracy against KV budget for every eviction policy, on the trained SynthVLM.

    python benchmarks/accuracy.py            # default sweep (600 held-out questions, 6 budgets)
    python benchmarks/accuracy.py --quick    # CI-sized: 60 questions, 3 budgets
    python benchmarks/accuracy.py --kv-dtype int8   # every variant also with int8 K/V slots (rows `name+int8`)

Every policy registered in `hae_fx.policies` runs through `hae_fx.transform` (Dynamo capture and the hae graph
passes; the rewritten graphs run on the ops' reference implementations unless `--compiler inductor`, which
tests show keeps the same tokens) (a policy with a `prune_hidden` field
runs twice: KV-only and with it). A policy that never evicts (`full`) runs at 100% only;
the others run at each budget, where a budget is a fraction of the full cache: `capacity = round(budget *
(prompt width + max_new_tokens))`, per question group (short questions and descriptions are generated as two
groups with their own prompt width and answer length). Sinks, window and bin scale with the capacity
(`config_for`), the same rule for every policy. With `--kv-dtype`, each variant runs a second time with its K/V
slots stored in that 8-bit form (`PolicyConfig.kv_dtype`); its "KV vs full" compares the real bytes (8-bit values
and scales) with a full cache in the model's dtype, so it shows the two savings multiplied.

Writes `accuracy.csv`, `accuracy.md` (the table) and `accuracy.png` (accuracy against KV budget, one line per
policy) under `--out`. Scoring is `hae_fx.models.synthvlm.evaluate`'s: exact match for short questions, the
share of shapes described correctly for descriptions, overall = mean over question kinds.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import dataclasses
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import hae_fx
from hae_fx.config import PolicyConfig
from hae_fx.models.synthvlm import QUESTION_KINDS, WordTokenizer
from hae_fx.models.synthvlm.data import Example, held_out, max_answer_tokens
from hae_fx.models.synthvlm.evaluate import accuracy_by_kind, generate_answers, prompt_width, question_groups
from hae_fx.models.synthvlm.model import load
from hae_fx.policies import available, config_class, get_policy, sweep_config

BUDGETS = (1.0, 0.8, 0.59, 0.4, 0.2, 0.1)
QUICK_BUDGETS = (1.0, 0.59, 0.2)
SINKS = 4
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    """A policy under test, whether `prune_hidden` is on, how its K/V slots are stored (None: model dtype), and
    fields set from the command line (`--set`, for ablations) where its config has them."""

    policy: str
    prune_hidden: bool = False
    kv_dtype: str | None = None
    settings: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        name = f"{self.policy}_prune" if self.prune_hidden else self.policy
        name = f"{name}+{self.kv_dtype}" if self.kv_dtype else name
        return name + "".join(f"[{field}={value}]" for field, value in self.settings)

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


def config_for(variant: Variant, capacity: int) -> PolicyConfig:
    """The configuration a variant runs with at `capacity` slots.

    One rule for every policy: 4 sinks, a recent window of a quarter of the capacity (at most 16), and, for
    policies with a recycle bin, a bin of an eighth (at least 1). Every other field keeps its default (the
    papers' values: DAP thresholds, SnapKV's pooling, ...).
    """
    return sweep_config(variant.policy, **{
        "capacity": capacity, "sinks": SINKS, "window": max(1, min(16, capacity // 4)),
        "bin_size": max(1, capacity // 8), "prune_hidden": variant.prune_hidden, "kv_dtype": variant.kv_dtype,
        **dict(variant.settings)})


@dataclass
class Group:
    """Questions generated together: one prompt width and one `max_new_tokens` (so one compiled shape)."""

    name: str
    examples: list[Example]
    width: int
    max_new_tokens: int

    @property
    def full_length(self) -> int:
        return self.width + self.max_new_tokens

    def capacity(self, budget: float) -> int:
        return max(1, round(budget * self.full_length))


def groups_of(tokenizer: WordTokenizer, examples: Sequence[Example]) -> list[Group]:
    """`question_groups`, each with the prompt width and answer length its full cache is sized for."""
    return [Group(name, group, prompt_width(tokenizer, group), max_answer_tokens({e.kind for e in group}))
            for name, group in question_groups(examples).items()]


@dataclass
class Row:
    """One variant at one budget, over every group."""

    variant: str
    budget: float
    accuracy: dict[str, float] = field(default_factory=dict)
    kv_bytes: float = 0.0  # per question, mean
    full_kv_bytes: float = 0.0  # what a full cache of the same groups holds, per question
    visual_kept_prefill: float = 0.0  # fraction of the prompt's visual tokens left after prefill
    visual_kept_end: float = 0.0  # ... and after the last generated token
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        row = {"policy": self.variant, "budget": self.budget,
               "kv_fraction": round(self.kv_bytes / self.full_kv_bytes, 4),
               "kv_bytes_per_question": round(self.kv_bytes),
               "visual_kept_prefill": round(self.visual_kept_prefill, 4),
               "visual_kept_end": round(self.visual_kept_end, 4)}
        kinds = (*QUESTION_KINDS, "overall")
        row.update({kind: round(self.accuracy[kind], 4) for kind in kinds if kind in self.accuracy})
        row["seconds"] = round(self.seconds, 1)
        return row


class _CacheStats:
    """Collects, per generated question, the cache's KV bytes and how many of its visual tokens survived."""

    def __init__(self) -> None:
        self.kv_bytes: list[float] = []
        self.visual_prefill: list[float] = []
        self.visual_end: list[float] = []

    def __call__(self, examples: Sequence[Example], out) -> None:
        cache = out.past_key_values
        per_sequence = cache.kv_nbytes / cache.batch
        summary = hae_fx.report(cache)
        for row in range(len(examples)):
            visual = set(cache.prompt_visual_positions[row])
            sequence = summary.sequences[row]
            self.kv_bytes.append(per_sequence)
            self.visual_prefill.append(len(visual.intersection(cache.prefill_kept[row])) / len(visual))
            self.visual_end.append(sequence.kept_visual / sequence.prompt_visual)


def run(base: torch.nn.Module, tokenizer: WordTokenizer, variant: Variant, budget: float, groups: Sequence[Group], *,
        batch_size: int, options: dict) -> Row:
    """Answer every group's questions with a fresh copy of `base` transformed for `variant` at `budget`."""
    row, stats, answers, examples = Row(variant.name, budget), _CacheStats(), [], []
    start = time.perf_counter()
    for group in groups:
        model = hae_fx.transform(copy.deepcopy(base), config_for(variant, group.capacity(budget)), options=options)
        answers += generate_answers(model, tokenizer, group.examples, batch_size=batch_size,
                                    max_new_tokens=group.max_new_tokens, width=group.width, on_batch=stats)
        examples += group.examples
        if variant.kv_dtype is None:
            row.full_kv_bytes += len(group.examples) * stats.kv_bytes[-1] * group.full_length / group.capacity(budget)
        else:  # against a full cache in the model's dtype, whatever this variant stores
            unquantized = hae_fx.HAECache.for_model(model, hae_fx.HAEConfig(policy="full", capacity=1), batch=1)
            row.full_kv_bytes += len(group.examples) * unquantized.kv_bytes_per_token * group.full_length
    row.seconds = time.perf_counter() - start
    row.accuracy = accuracy_by_kind(examples, answers)
    row.kv_bytes = sum(stats.kv_bytes) / len(examples)
    row.full_kv_bytes /= len(examples)
    row.visual_kept_prefill = sum(stats.visual_prefill) / len(examples)
    row.visual_kept_end = sum(stats.visual_end) / len(examples)
    return row


def markdown_table(rows: Sequence[Row]) -> str:
    kinds = [k for k in QUESTION_KINDS if k in rows[0].accuracy]
    header = ["policy", "budget", "KV vs full", "visual kept (prefill / end)", *kinds, "overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.variant, f"{row.budget:.0%}", f"{row.kv_bytes / row.full_kv_bytes:.2f}x",
                 f"{row.visual_kept_prefill:.0%} / {row.visual_kept_end:.0%}",
                 *(f"{100 * row.accuracy[k]:.1f}" for k in kinds), f"**{100 * row.accuracy['overall']:.1f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.variant for r in rows):
        points = sorted((r.kv_bytes / r.full_kv_bytes, 100 * r.accuracy["overall"]) for r in rows if r.variant == name)
        if len(points) == 1:
            ax.axhline(points[0][1], color="grey", linestyle=":", label=f"{name} (100% KV)")
        else:
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_ylim(0, 102)
    ax.set_xlabel("KV cache, fraction of a full cache")
    ax.set_ylabel("accuracy, mean over question kinds (%)")
    ax.set_title("SynthVLM: accuracy against KV budget")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    return name, ast.literal_eval(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 questions and 3 budgets (CI)")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions (default 600; quick 60)")
    parser.add_argument("--budgets", type=lambda s: tuple(float(b) for b in s.split(",")), default=None,
                        help="comma-separated fractions of the full cache")
    parser.add_argument("--policies", type=lambda s: s.split(","), default=None,
                        help="variants to run, e.g. full,streaming,hae,hae_prune,hae+int8 (default: all)")
    parser.add_argument("--kv-dtype", choices=("int8", "float8_e4m3fn"), action="append", default=[],
                        help="also run every variant with its K/V slots in this 8-bit form (repeatable)")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field for every variant whose config has it, e.g. compensate=False (an "
                             "ablation; a Python literal; repeatable)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--compiler", choices=("eager", "inductor"), default="eager",
                        help="what runs the rewritten graphs: the ops' reference implementations (default: the "
                             "sweep compiles 38 models, and Inductor would spend most of 15 minutes compiling), "
                             "or Inductor")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/accuracy[_quick]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = args.questions or (60 if args.quick else 600)
    budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    out = args.out or RESULTS / ("accuracy_quick" if args.quick else "accuracy")
    out.mkdir(parents=True, exist_ok=True)
    every = variants(args.kv_dtype)
    chosen = [v for v in every if args.policies is None or v.name in args.policies]
    if args.set:
        chosen = [dataclasses.replace(v, settings=tuple((name, value) for name, value in args.set
                                                        if name in config_fields(v.policy))) for v in chosen]
    if not chosen:
        raise SystemExit(f"--policies matched none of {[v.name for v in every]}")

    base, tokenizer = load()
    groups = groups_of(tokenizer, held_out(questions))
    options = {"hae.compiler": args.compiler}
    print(f"{questions} held-out questions in groups "
          + ", ".join(f"{g.name} ({len(g.examples)}, full cache {g.full_length} slots)" for g in groups))
    rows: list[Row] = []
    start = time.perf_counter()
    runs = [(variant, budget) for variant in chosen for budget in (budgets if variant.evicts else (1.0,))]
    progress = tqdm(runs, desc="accuracy", unit="run")
    for variant, budget in progress:
        progress.set_postfix_str(f"{variant.name} {budget:.0%}")
        rows.append(run(base, tokenizer, variant, budget, groups, batch_size=args.batch_size, options=options))
        row = rows[-1]
        progress.write(f"{row.variant:>10} {row.budget:>5.0%}  KV {row.kv_bytes / row.full_kv_bytes:.2f}x  "
                       f"visual kept {row.visual_kept_prefill:.0%}/{row.visual_kept_end:.0%}  "
                       f"overall {100 * row.accuracy['overall']:.1f}  ({row.seconds:.0f} s)")
    table = markdown_table(rows)
    print(table)
    command = "python benchmarks/accuracy.py" + (" --quick" if args.quick else "") + \
        "".join(f" --kv-dtype {kv_dtype}" for kv_dtype in args.kv_dtype) + \
        "".join(f" --set {name}={value!r}" for name, value in args.set)
    (out / "accuracy.md").write_text(
        f"`{command}` ({questions} questions, compiler {args.compiler}, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s)\n\n"
        f"{table}\n")
    with (out / "accuracy.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    plot(rows, out / "accuracy.png")
    print(f"wrote {out / 'accuracy.csv'}, {out / 'accuracy.md'}, {out / 'accuracy.png'}")
    return rows


if __name__ == "__main__":
    main()
