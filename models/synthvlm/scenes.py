"""Grid-of-shapes scenes, their rendering, a pixel parser, and question/answer generation.

Why this shape of task: every question is answerable only from the image, answers are short closed-vocabulary
strings, and the "describe" question produces a long answer (40-120 tokens) that stresses a KV cache the way
captioning does. Everything is seeded and deterministic, and the renderer is built so that a simple pixel parser
recovers the scene exactly (solid palette colours without anti-aliasing, shapes well inside their cell, a grey
zero-saturation texture behind them). Tests use that parser, plus `answer_from_scene`, which re-derives answers
from the question text alone, to check that every generated answer is correct by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
QUESTION_KINDS: tuple[str, ...] = ("colour_at", "shape_at", "locate", "count", "exists", "describe")

DEFAULT_GRID_SIZE = 4
DEFAULT_IMAGE_SIZE = 96
DEFAULT_MAX_OBJECTS = 12
DESCRIBE_QUESTION = "describe every shape in reading order ."
WORDS_PER_DESCRIBED_OBJECT = 7  # "row R column C <colour> <shape> ."
LONGEST_SHORT_ANSWER = 4  # "row R column C"; every other short answer is one word
EMPTY_ANSWER = "nothing"

# Parser thresholds: palette colours have max-min channel spread >= 130, the texture has spread 0.
_SATURATION_THRESHOLD = 60
_MIN_SHAPE_PIXELS = 10

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

Obj = tuple[str, str]  # (colour, shape)
Cell = tuple[int, int]  # (row, col), 0-based


@dataclass(frozen=True)
class Scene:
    """A grid of cells, some holding a (colour, shape) object; cells are 0-based (row, col).

    `texture_seed` only drives the background noise, so it is left out of equality: a parsed scene equals the
    scene it was rendered from.
    """

    grid_size: int
    objects: Mapping[Cell, Obj]
    texture_seed: int = field(default=0, compare=False)

    def cells(self) -> list[Cell]:
        """Occupied cells in reading (row-major) order."""
        return sorted(self.objects)


# ---------------------------------------------------------------------------------------------------- generation


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_scene(
    rng: np.random.Generator | int,
    grid_size: int = DEFAULT_GRID_SIZE,
    fill_prob: float = 0.55,
    min_objects: int = 6,
    max_objects: int = DEFAULT_MAX_OBJECTS,
) -> Scene:
    """A seeded random scene: object count ~ Binomial(cells, fill_prob) clipped to [min_objects, max_objects].

    The clip keeps the "describe" answer within 40-120 tokens (7 tokens per object) on the default 4x4 grid.
    """
    rng = _as_rng(rng)
    n_cells = grid_size * grid_size
    low, high = min(min_objects, n_cells), min(max_objects, n_cells)
    count = int(np.clip(rng.binomial(n_cells, fill_prob), low, high))
    flat = sorted(rng.choice(n_cells, size=count, replace=False).tolist())
    colours, shapes = list(COLOURS), SHAPES
    objects = {
        divmod(i, grid_size): (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]) for i in flat
    }
    return Scene(grid_size, objects, texture_seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------------------------------- rendering


def _shape_box(cell_px: int) -> tuple[int, int]:
    """Offset and side of the square a shape occupies inside its cell (a margin keeps it clear of grid lines)."""
    margin = max(2, cell_px // 6)
    return margin, cell_px - 2 * margin


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int, rgb: tuple[int, int, int]) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1
    if shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "cross":
        bar = max(2, side // 3)
        lo = x0 + (side - bar) // 2
        top = y0 + (side - bar) // 2
        draw.rectangle((lo, y0, lo + bar - 1, y1), fill=rgb)
        draw.rectangle((x0, top, x1, top + bar - 1), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, image_size: int) -> np.ndarray:
    """Grey per-pixel noise (zero saturation, so never a palette colour) with darker grey grid lines."""
    rng = np.random.default_rng(scene.texture_seed)
    grey = rng.integers(175, 236, size=(image_size, image_size), dtype=np.uint8)
    cell_px = image_size // scene.grid_size
    grey[::cell_px, :] = 140
    grey[:, ::cell_px] = 140
    return np.repeat(grey[:, :, None], 3, axis=2)


def render(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image; deterministic given the scene (including its texture seed)."""
    if image_size % scene.grid_size:
        raise ValueError(f"image_size {image_size} must be a multiple of grid_size {scene.grid_size}")
    cell_px = image_size // scene.grid_size
    image = Image.fromarray(_background(scene, image_size), mode="RGB")
    draw = ImageDraw.Draw(image)
    offset, side = _shape_box(cell_px)
    for (row, col), (colour, shape) in scene.objects.items():
        _draw_shape(draw, shape, col * cell_px + offset, row * cell_px + offset, side, COLOURS[colour])
    return image


# ------------------------------------------------------------------------------------------------------- parsing


def _classify_mask(mask: np.ndarray) -> str:
    """Shape from a boolean mask: fill ratio of its bounding box, then top/bottom mass balance."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.mean()
    if fill > 0.92:
        return "square"
    if fill > 0.7:
        return "circle"
    half = box.shape[0] // 2
    top, bottom = box[:half].sum(), box[box.shape[0] - half :].sum()
    return "triangle" if top < 0.6 * bottom else "cross"


def _nearest_colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).mean(axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - mean) ** 2)))


def _parse_cell(cell: np.ndarray) -> Obj | None:
    rgb = cell.astype(np.int16)
    mask = (rgb.max(axis=2) - rgb.min(axis=2)) > _SATURATION_THRESHOLD
    if mask.sum() < _MIN_SHAPE_PIXELS:
        return None
    return _nearest_colour(cell[mask]), _classify_mask(mask)


def parse(image: Image.Image, grid_size: int = DEFAULT_GRID_SIZE) -> Scene:
    """Read a scene back from its rendered image alone (per cell: saturated pixels = shape)."""
    pixels = np.asarray(image.convert("RGB"))
    cell_px = pixels.shape[0] // grid_size
    objects: dict[Cell, Obj] = {}
    for row in range(grid_size):
        for col in range(grid_size):
            obj = _parse_cell(pixels[row * cell_px : (row + 1) * cell_px, col * cell_px : (col + 1) * cell_px])
            if obj is not None:
                objects[(row, col)] = obj
    return Scene(grid_size, objects)


# ----------------------------------------------------------------------------------------------------- questions


def number_word(n: int) -> str:
    """0..99 as words; 21 -> "twenty one" (two tokens, so the vocabulary stays small)."""
    if not 0 <= n < 100:
        raise ValueError(f"number_word supports 0..99, got {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + ("" if ones == 0 else " " + _ONES[ones])


def _location(cell: Cell) -> str:
    return f"row {cell[0] + 1} column {cell[1] + 1}"


def _count(scene: Scene, colour: str | None, shape: str | None) -> int:
    return sum((colour in (None, c)) and (shape in (None, s)) for c, s in scene.objects.values())


def _describe(scene: Scene) -> str:
    clauses = [f"{_location(cell)} {c} {s} ." for cell, (c, s) in sorted(scene.objects.items())]
    return " ".join(clauses) if clauses else f"{EMPTY_ANSWER} ."


def _pick(rng: np.random.Generator, items: list) -> object:
    return items[int(rng.integers(len(items)))]


def _random_obj(rng: np.random.Generator) -> Obj:
    return _pick(rng, list(COLOURS)), _pick(rng, list(SHAPES))


def _pick_cell(scene: Scene, rng: np.random.Generator) -> Cell:
    """An occupied cell 80% of the time (so "nothing" is not the dominant answer), else any cell."""
    if scene.objects and rng.random() < 0.8:
        return _pick(rng, scene.cells())
    return divmod(int(rng.integers(scene.grid_size**2)), scene.grid_size)


def question_about(scene: Scene, cell: Cell, kind: str) -> tuple[str, str]:
    """The `colour_at` or `shape_at` question about `cell`, and its answer ("nothing" for an empty cell)."""
    obj = scene.objects.get(cell)
    if kind == "colour_at":
        return f"what colour is the shape at {_location(cell)} ?", obj[0] if obj else EMPTY_ANSWER
    if kind == "shape_at":
        return f"what shape is at {_location(cell)} ?", obj[1] if obj else EMPTY_ANSWER
    raise ValueError(f"question_about asks colour_at or shape_at, not {kind!r}")




def cells_named(question: str) -> list[Cell]:
    """The cells a question or answer names ("row R column C"), 0-based, in order."""
    return [_cell_from_text(r, c) for r, c in re.findall(r"row (\d+) column (\d+)", question)]


def asked_cell(scene: Scene, question: str) -> Cell | None:
    """The one cell a question is about, 0-based: the cell a `colour_at` or `shape_at` question names, or the cell
    holding the object a `locate` question asks for; None for a question about the whole scene (`count`, `exists`,
    `describe`). Which image patches a policy must keep to answer it (`model.cell_patches`)."""
    named = cells_named(question)
    if named:
        return named[0]
    if m := re.fullmatch(_LOCATE, " ".join(question.lower().split())):
        return _located_cell(scene, question, m.groups())
    return None


def _q_attribute_at(scene: Scene, rng: np.random.Generator, kind: str) -> tuple[str, str]:
    return question_about(scene, _pick_cell(scene, rng), kind)


def _q_locate(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    unique = [cell for cell, obj in sorted(scene.objects.items()) if list(scene.objects.values()).count(obj) == 1]
    if not unique:  # every object is duplicated (rare): fall back to a question that is always well defined
        return _q_attribute_at(scene, rng, "colour_at")
    cell = _pick(rng, unique)
    colour, shape = scene.objects[cell]
    return f"where is the {colour} {shape} ?", _location(cell)


def _q_count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    # Ask about a present object 60% of the time, so "zero" does not dominate the answers.
    if scene.objects and rng.random() < 0.6:
        colour, shape = scene.objects[_pick(rng, scene.cells())]
    else:
        colour, shape = _random_obj(rng)
    variant = int(rng.integers(3))
    if variant == 0:
        question, n = f"how many {colour} {PLURALS[shape]} ?", _count(scene, colour, shape)
    elif variant == 1:
        question, n = f"how many {colour} shapes ?", _count(scene, colour, None)
    else:
        question, n = f"how many {PLURALS[shape]} ?", _count(scene, None, shape)
    return question, number_word(n)


def _q_exists(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    present = set(scene.objects.values())
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    want_yes = bool(present) and (not absent or rng.random() < 0.5)
    colour, shape = _pick(rng, sorted(present)) if want_yes else _pick(rng, absent)
    return f"is there a {colour} {shape} ?", "yes" if want_yes else "no"


def make_question(scene: Scene, kind: str, rng: np.random.Generator | int) -> tuple[str, str]:
    """A seeded (question, answer) pair of the given kind (one of `QUESTION_KINDS`)."""
    rng = _as_rng(rng)
    if kind in ("colour_at", "shape_at"):
        return _q_attribute_at(scene, rng, kind)
    if kind == "locate":
        return _q_locate(scene, rng)
    if kind == "count":
        return _q_count(scene, rng)
    if kind == "exists":
        return _q_exists(scene, rng)
    if kind == "describe":
        return DESCRIBE_QUESTION, _describe(scene)
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


# ------------------------------------------------------------------------------------- independent answer oracle

_SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _cell_from_text(row: str, col: str) -> Cell:
    return int(row) - 1, int(col) - 1


#: a `locate` question: the colour and shape it asks for
_LOCATE = r"where is the (\w+) (\w+) \?"


def _located_cell(scene: Scene, question: str, obj: tuple[str, str]) -> Cell:
    """The one cell holding `obj` (colour, shape), which `locate` question `question` asks for."""
    cells = [cell for cell, held in scene.objects.items() if held == obj]
    if len(cells) != 1:
        raise ValueError(f"{question!r} has {len(cells)} matching objects; locate needs exactly one")
    return cells[0]


def answer_from_scene(scene: Scene, question: str) -> str:
    """Re-derive the answer to `question` from `scene` by parsing the question text (independent of generation)."""
    q = " ".join(question.lower().split())
    if m := re.fullmatch(r"what colour is the shape at row (\d+) column (\d+) \?", q):
        obj = scene.objects.get(_cell_from_text(*m.groups()))
        return obj[0] if obj else EMPTY_ANSWER
    if m := re.fullmatch(r"what shape is at row (\d+) column (\d+) \?", q):
        obj = scene.objects.get(_cell_from_text(*m.groups()))
        return obj[1] if obj else EMPTY_ANSWER
    if m := re.fullmatch(_LOCATE, q):
        return _location(_located_cell(scene, question, m.groups()))
    if m := re.fullmatch(r"how many (\w+) (\w+) \?", q):
        colour, noun = m.groups()
        return number_word(_count(scene, colour, None if noun == "shapes" else _SINGULAR[noun]))
    if m := re.fullmatch(r"how many (\w+) \?", q):
        return number_word(_count(scene, None, _SINGULAR[m.group(1)]))
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", q):
        return "yes" if tuple(m.groups()) in set(scene.objects.values()) else "no"
    if q == DESCRIBE_QUESTION:
        return _describe(scene)
    raise ValueError(f"unrecognised question {question!r}")


def task_words(max_grid_size: int = 9) -> list[str]:
    """Every word any question or answer can contain, for grids up to `max_grid_size` (<= 9 so indices are digits)."""
    if not 1 <= max_grid_size <= 9:
        raise ValueError("max_grid_size must be in 1..9")
    templates = [
        "what colour is the shape at row column ?",
        "what shape is at row column ?",
        "where is the ?",
        "how many shapes ?",
        "is there a ? yes no",
        DESCRIBE_QUESTION,
        EMPTY_ANSWER,
    ]
    words = [w for t in templates for w in t.split()]
    words += list(COLOURS) + list(SHAPES) + list(PLURALS.values())
    words += [str(i) for i in range(1, max_grid_size + 1)]
    words += _ONES + _TENS
    return list(dict.fromkeys(words))
