"""A closed-vocabulary word tokenizer for the synthetic scene task, stored as plain JSON.

Why not a BPE tokenizer: the task family produces a few dozen words, so one id per word keeps sequences short,
makes token counts equal word counts (easy to reason about KV-cache budgets), and `build_vocab` enumerates every
word the generator can emit, so generated text never maps to `<unk>`. No dependency beyond the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from hae_fx.models.synthvlm.scenes import task_words

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, IMAGE, UNK)  # ids 0..4, in this order

_PUNCTUATION = re.compile(r"([?.])")


def normalise(text: str) -> str:
    """Lower-case, "?" and "." as separate tokens, single spaces: the form `decode(encode(text))` returns."""
    return " ".join(_PUNCTUATION.sub(r" \1 ", text.lower()).split())


def build_vocab(max_grid_size: int = 9) -> list[str]:
    """Special tokens first (so `<pad>`=0, `<bos>`=1, `<eos>`=2), then every word the task family can produce."""
    return [*SPECIAL_TOKENS, *(w for w in task_words(max_grid_size) if w not in SPECIAL_TOKENS)]


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; unknown words map to `<unk>`."""

    def __init__(self, vocab: Sequence[str] | None = None) -> None:
        vocab = list(build_vocab() if vocab is None else vocab)
        if vocab[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with {SPECIAL_TOKENS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        self.vocab: list[str] = vocab
        self.ids: dict[str, int] = {word: i for i, word in enumerate(vocab)}

    pad_id, bos_id, eos_id, image_id, unk_id = range(len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        return normalise(text).split()

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [self.ids.get(word, self.unk_id) for word in self.tokenize(text)]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Words joined by single spaces; `<pad>`, `<bos>` and `<eos>` are dropped when `skip_special`."""
        drop = {self.pad_id, self.bos_id, self.eos_id} if skip_special else set()
        return " ".join(self.vocab[i] for i in ids if i not in drop)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        return cls(json.loads(Path(path).read_text())["vocab"])
