"""Train SynthVLM on freshly generated scene questions: `python -m hae_fx.models.synthvlm.train`.

Runs on CPU or GPU (bf16 autocast on CUDA). Scenes are rendered once into an in-memory pool from the `TRAIN`
seed stream (in parallel); every step draws new questions about pool scenes, so the model rarely sees the
same (scene, question) pair twice. Progress, loss and held-out accuracy are logged; the result is saved with
`save_pretrained` (safetensors) plus the tokenizer and `training.json` (arguments, loss curve, evaluations).
A share of the sequences (`--follow-up-share`) are conversations: after the first answer, one or more further
short questions about the same scene, each appended to the history, so the model answers follow-ups on the cache
of the earlier turns as a chat UI asks them. The shipped checkpoint was trained on one H100 in three runs and
fine-tuned on an H200 in a fourth, each continuing the last (`--init`); docs/benchmarks.md lists the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hae_fx.models.synthvlm.data import (
    IGNORE_INDEX,
    SHORT_KINDS,
    TRAIN,
    conversations,
    held_out,
    scene_for,
    training_batch,
)
from hae_fx.models.synthvlm.evaluate import answer_conversations, conversation_accuracy, evaluate
from hae_fx.models.synthvlm.model import CHECKPOINT_DIR, load, new_model, pixel_values, save
from hae_fx.models.synthvlm.scenes import QUESTION_KINDS, make_question, render
from hae_fx.models.synthvlm.tokenizer import WordTokenizer


def _render_train_scene(index: int) -> np.ndarray:
    return np.asarray(render(scene_for(TRAIN, index)))


def render_pool(size: int, workers: int) -> np.ndarray:
    """`[size, 96, 96, 3]` uint8 renders of training scenes `0..size-1`."""
    if workers <= 1:
        return np.stack([_render_train_scene(i) for i in tqdm(range(size), desc="render", unit="scene")])
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        rendered = pool.imap(_render_train_scene, range(size), chunksize=256)
        return np.stack(list(tqdm(rendered, total=size, desc="render", unit="scene")))


class QuestionStream(torch.utils.data.IterableDataset):
    """Endless training batches: random pool scenes, random question kinds, tokenised and padded.

    Runs in DataLoader worker processes (question generation is Python-bound), each on its own seed stream.
    Yields the batch tensors plus `indices`, the pool rows whose images the batch shows, and `position_ids`
    (every token keeps its position, also when patch dropout hides some visual tokens). A `follow_up_share` of the
    rows get 1 to `max_follow_ups` further short questions (kinds drawn by the same weights) after the first answer.
    """

    def __init__(self, pool_size: int, batch_size: int, seed: int, kind_weights: Sequence[float],
                 patch_dropout: float = 0.0, follow_up_share: float = 0.0, max_follow_ups: int = 2) -> None:
        self.pool_size, self.batch_size, self.seed = pool_size, batch_size, seed
        self.patch_dropout = patch_dropout
        self.follow_up_share, self.max_follow_ups = follow_up_share, max_follow_ups
        self.kind_probabilities = np.asarray(kind_weights, dtype=float) / sum(kind_weights)
        short = np.asarray([w for k, w in zip(QUESTION_KINDS, kind_weights, strict=True) if k in SHORT_KINDS])
        self.short_probabilities = short / short.sum()
        self.tokenizer = WordTokenizer()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([TRAIN, self.seed, 1, 0 if info is None else info.id])
        while True:
            indices = rng.integers(self.pool_size, size=self.batch_size)
            kinds = rng.choice(len(QUESTION_KINDS), size=self.batch_size, p=self.kind_probabilities)
            questions = [make_question(scene_for(TRAIN, int(i)), QUESTION_KINDS[k], rng)
                         for i, k in zip(indices, kinds, strict=True)]
            follow_ups = [self._follow_ups(scene_for(TRAIN, int(i)), rng) for i in indices]
            batch = training_batch(self.tokenizer, questions, follow_ups)
            hide_visual_tokens(batch["attention_mask"], batch["input_ids"] == self.tokenizer.image_id,
                               self.patch_dropout, rng)
            positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
            yield {**batch, "position_ids": positions, "indices": torch.from_numpy(indices)}

    def _follow_ups(self, scene, rng: np.random.Generator) -> list[tuple[str, str]]:
        if rng.random() >= self.follow_up_share:
            return []
        kinds = rng.choice(len(SHORT_KINDS), size=int(rng.integers(1, self.max_follow_ups + 1)),
                           p=self.short_probabilities)
        return [make_question(scene, SHORT_KINDS[k], rng) for k in kinds]


def hide_visual_tokens(attention_mask: torch.Tensor, visual: torch.Tensor, max_fraction: float,
                       rng: np.random.Generator) -> None:
    """Patch dropout, in place: in 3 of 4 sequences, mask a random `U(0, max_fraction)` share of visual tokens.

    Why: a small model trained on every patch learns computations that break when any visual token is missing
    (counting by how thin attention spreads, reading order by walking past empty cells). Large VLMs are robust
    to dropping redundant visual tokens, which is what every KV eviction policy relies on; random, policy-blind
    dropout gives the yardstick model that robustness without favouring any policy's choice of tokens.
    """
    if max_fraction <= 0:
        return
    for row in range(attention_mask.shape[0]):
        if rng.random() < 0.25:
            continue
        positions = visual[row].nonzero().flatten().numpy()
        hidden = rng.choice(positions, size=int(rng.uniform(0, max_fraction) * len(positions)), replace=False)
        attention_mask[row, torch.from_numpy(hidden)] = 0


def per_question_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each question's answer tokens, then over questions.

    A plain token mean would let the 85-token descriptions outweigh the one-word answers about 60 to 1; this
    weighs every question the same, so counting and search questions are learned as fast as reading.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                                   reduction="none")
    answer_tokens = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / answer_tokens).mean()


def learning_rate(step: int, progress: float, *, peak: float, warmup: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak / 20` as `progress` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


#: search questions (locate, count, exists) take longest to learn, so they are drawn more often
DEFAULT_KIND_WEIGHTS = (1.0, 1.0, 2.0, 3.0, 2.0, 1.0)


def _weights(text: str) -> tuple[float, ...]:
    weights = tuple(float(w) for w in text.split(","))
    if len(weights) != len(QUESTION_KINDS) or min(weights) < 0 or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"expected {len(QUESTION_KINDS)} non-negative weights, got {text!r}")
    return weights


def training_parser(description: str, out_default: Path) -> argparse.ArgumentParser:
    """The options every scene-task training run takes (schedule, data, evaluation, device); a model's own
    training script adds its options to this parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out_default, help="checkpoint directory to write")
    parser.add_argument("--init", type=Path, default=None, help="continue from this checkpoint instead of scratch")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--pool", type=int, default=40_000, help="training scenes rendered up front")
    parser.add_argument("--kind-weights", type=_weights, default=DEFAULT_KIND_WEIGHTS,
                        help=f"sampling weights of {','.join(QUESTION_KINDS)}, comma-separated")
    parser.add_argument("--patch-dropout", type=float, default=0.6,
                        help="most visual tokens hidden from a training sequence (hide_visual_tokens); 0 turns it off")
    parser.add_argument("--follow-up-share", type=float, default=0.5,
                        help="share of training sequences that are conversations (follow-up questions after the first)")
    parser.add_argument("--max-follow-ups", type=int, default=2, help="most follow-up questions in a conversation")
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-questions", type=int, default=300, help="held-out questions per periodic check")
    parser.add_argument("--final-eval-questions", type=int, default=1200)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds of training after which to stop (the learning-rate schedule then follows time "
                             "when time runs out before steps); the model is still evaluated and saved")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=max(1, (multiprocessing.cpu_count() or 1) - 1),
                        help="processes that render the pool and generate questions")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser(__doc__.split("\n\n")[0], CHECKPOINT_DIR).parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tokenizer = WordTokenizer()
    model = new_model(args.seed) if args.init is None else load(args.init)[0]
    return fit(model, args, model.parameters(), lambda: save(model, tokenizer, args.out))


def fit(model: torch.nn.Module, args: argparse.Namespace, parameters: Iterable[torch.nn.Parameter],
        save_checkpoint: Callable[[], None]) -> dict:
    """Train `parameters` of `model` (a SynthVLM-geometry LLaVA over `WordTokenizer` ids) on fresh scene questions
    as `args` (`training_parser`) says; evaluates on held-out questions every `--eval-every` steps and at the end,
    calls `save_checkpoint` after each evaluation, and writes `training.json` into `--out`. Returns that log."""
    device = torch.device(args.device)
    tokenizer = WordTokenizer()
    model.to(device).train()
    parameters = [p for p in parameters if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({sum(p.numel() for p in parameters) / 1e6:.2f} M trained) on {device}")

    pool = torch.from_numpy(render_pool(args.pool, args.workers)).to(device)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    stream = QuestionStream(args.pool, args.batch_size, args.seed, args.kind_weights, args.patch_dropout,
                            args.follow_up_share, args.max_follow_ups)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                               prefetch_factor=4 if args.workers else None,
                                               persistent_workers=args.workers > 0))
    eval_set = held_out(args.eval_questions), conversations(args.eval_questions)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "loss": [], "evals": []}
    start, losses = time.perf_counter(), []
    progress = tqdm(range(args.steps), desc="train", unit="step")
    for step in progress:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        labels = batch.pop("labels")
        batch["pixel_values"] = pixel_values(pool[batch.pop("indices")])
        elapsed = time.perf_counter() - start
        # With a time limit the schedule follows whichever runs out first, steps or time, so it always completes.
        progress_done = max(step / args.steps, elapsed / args.time_limit if args.time_limit else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress_done, peak=args.lr, warmup=args.warmup)
        with autocast:
            loss = per_question_loss(model(**batch).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            log["loss"].append((step, float(np.mean(losses[-50:]))))
        timed_out = progress_done >= 1.0
        if (step + 1) % args.eval_every == 0 and not timed_out:
            log["evals"].append({"step": step + 1, **_evaluate(model, tokenizer, eval_set)})
            tqdm.write(f"step {step + 1}: loss {np.mean(losses[-50:]):.4f}, held-out {_fmt(log['evals'][-1])}")
            save_checkpoint()
        if timed_out:
            tqdm.write(f"time limit reached after {step + 1} steps")
            break
    log["train_seconds"] = time.perf_counter() - start
    log["steps_done"] = len(losses)
    final = _evaluate(model, tokenizer,
                      (held_out(args.final_eval_questions), conversations(args.final_eval_questions)))
    log["final_eval"] = {"questions": args.final_eval_questions, **final}
    print(f"final held-out accuracy ({args.final_eval_questions} questions): {_fmt(final)}")
    save_checkpoint()
    (args.out / "training.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def _evaluate(model: torch.nn.Module, tokenizer: WordTokenizer, sets) -> dict[str, float]:
    """Held-out accuracy per kind, and per turn of held-out conversations (`turn1`, `turn2`, ...)."""
    examples, chats = sets
    model.eval()
    try:
        result = evaluate(model, tokenizer, examples, batch_size=min(100, len(examples)))
        answers = answer_conversations(model, tokenizer, chats, batch_size=min(100, len(chats)))
        result.update({f"turn{t + 1}": a for t, a in enumerate(conversation_accuracy(chats, answers))})
        return result
    finally:
        model.train()


def _fmt(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items() if k != "step")


if __name__ == "__main__":
    main()
