"""The synthetic scene task is deterministic and every answer is correct by construction.

Answers are checked against a pixel parser of the rendered image plus an oracle that reads the question text,
so a generator bug, a renderer bug and a parser bug would each have to coincide to pass unnoticed.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from hae_fx.models.synthvlm import (
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    WordTokenizer,
    answer_from_scene,
    build_vocab,
    make_question,
    parse,
    random_scene,
    render,
)
from hae_fx.models.synthvlm.scenes import EMPTY_ANSWER, asked_cell, number_word
from hae_fx.models.synthvlm.tokenizer import normalise


def _questions(n_scenes: int, per_kind: int = 1) -> list[tuple[Scene, str, str]]:
    out = []
    for seed in range(n_scenes):
        scene = random_scene(seed)
        rng = np.random.default_rng(10_000 + seed)
        for kind in QUESTION_KINDS:
            for _ in range(per_kind):
                out.append((scene, *make_question(scene, kind, rng)))
    return out


def test_generator_is_deterministic() -> None:
    a, b, c = random_scene(7), random_scene(7), random_scene(8)
    assert a == b and a.texture_seed == b.texture_seed
    assert render(a).tobytes() == render(b).tobytes()
    assert a != c and render(a).tobytes() != render(c).tobytes()
    assert make_question(a, "count", 3) == make_question(b, "count", 3)


def test_render_geometry_and_palette() -> None:
    image = render(random_scene(0))
    assert image.size == (96, 96) and image.mode == "RGB"
    assert render(random_scene(0, grid_size=3), image_size=96).size == (96, 96)
    palette = np.array(list(COLOURS.values()))
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1) + np.eye(len(palette)) * 1e9
    assert distances.min() > 60  # palette colours are well separated
    with pytest.raises(ValueError):
        render(random_scene(0, grid_size=5), image_size=96)


def test_empty_cells_are_textured() -> None:
    scene = Scene(4, {})
    cell = np.asarray(render(scene))[1:24, 1:24, 0]
    assert cell.std() > 5  # noise, not a flat colour
    assert parse(render(scene)) == scene


@pytest.mark.parametrize("grid_size", [4, 3, 6])
def test_parser_recovers_scene(grid_size: int) -> None:
    n = 300 if grid_size == 4 else 50
    image_size = 24 * grid_size
    for seed in range(n):
        scene = random_scene(seed, grid_size=grid_size)
        assert parse(render(scene, image_size), grid_size) == scene, seed


def test_every_object_kind_parses() -> None:
    objects = {divmod(i, 5): (c, s) for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)}
    scene = Scene(5, objects)
    assert parse(render(scene, 120), 5) == scene


def test_answers_correct_by_construction() -> None:
    items = _questions(200)
    assert len(items) >= 1000
    kinds = collections.Counter()
    for scene, question, answer in items:
        parsed = parse(render(scene))
        assert answer_from_scene(parsed, question) == answer, question
        kinds[question.split()[0]] += 1
    assert set(kinds) >= {"what", "where", "how", "is", "describe"}


def test_answer_distributions_are_not_degenerate() -> None:
    answers = collections.defaultdict(collections.Counter)
    for seed in range(200):
        scene = random_scene(seed)
        for kind in QUESTION_KINDS:
            answers[kind][make_question(scene, kind, seed)[1]] += 1
    assert 0.3 < answers["exists"]["yes"] / 200 < 0.7
    assert answers["colour_at"]["nothing"] < 100 and len(answers["colour_at"]) == len(COLOURS) + 1
    assert len(answers["shape_at"]) == len(SHAPES) + 1
    assert len(answers["count"]) >= 4
    assert len(answers["locate"]) >= 12


def test_locate_only_asks_about_unique_objects() -> None:
    for scene, question, _ in _questions(200):
        if question.startswith("where"):
            colour, shape = question.split()[3:5]
            assert list(scene.objects.values()).count((colour, shape)) == 1


@pytest.mark.parametrize("grid_size", [3, 4, 5])
def test_asked_cell_is_the_only_cell_the_answer_depends_on(grid_size: int) -> None:
    for seed in range(100):
        scene = random_scene(seed, grid_size=grid_size)
        for kind in QUESTION_KINDS:
            question, answer = make_question(scene, kind, seed)
            cell = asked_cell(scene, question)
            if kind in ("count", "exists", "describe"):
                assert cell is None, question
                continue
            assert 0 <= min(cell) and max(cell) < grid_size
            # the answer survives removing every other object, and not removing the asked cell's
            alone = Scene(grid_size, {cell: scene.objects[cell]} if cell in scene.objects else {})
            assert answer_from_scene(alone, question) == answer, question
            without = Scene(grid_size, {c: obj for c, obj in scene.objects.items() if c != cell})
            if question.startswith("where"):
                assert answer == f"row {cell[0] + 1} column {cell[1] + 1}"
                with pytest.raises(ValueError, match="0 matching objects"):
                    answer_from_scene(without, question)
            else:
                assert answer_from_scene(without, question) == EMPTY_ANSWER


def test_describe_length_in_range() -> None:
    tokenizer = WordTokenizer()
    lengths = [len(tokenizer.encode(make_question(random_scene(s), "describe", s)[1])) for s in range(200)]
    in_range = sum(40 <= n <= 120 for n in lengths)
    assert in_range / len(lengths) >= 0.95, (min(lengths), max(lengths))


def test_number_words() -> None:
    assert [number_word(n) for n in (0, 7, 13, 20, 21, 99)] == [
        "zero", "seven", "thirteen", "twenty", "twenty one", "ninety nine"
    ]  # fmt: skip


def test_tokenizer_round_trips_without_unk(tmp_path) -> None:
    tokenizer = WordTokenizer()
    assert tokenizer.vocab[:5] == ["<pad>", "<bos>", "<eos>", "<image>", "<unk>"]
    assert tokenizer.vocab == build_vocab()
    for _, question, answer in _questions(200):
        for text in (question, answer):
            ids = tokenizer.encode(text)
            assert tokenizer.unk_id not in ids, text
            assert tokenizer.decode(ids) == normalise(text) == text
    prompt = "<image> What colour is the shape at row 2 column 3?"
    ids = tokenizer.encode(prompt, add_bos=True, add_eos=True)
    assert ids[:2] == [1, 3] and ids[-1] == 2
    assert tokenizer.decode(ids) == "<image> what colour is the shape at row 2 column 3 ?"
    assert tokenizer.encode("zebra") == [tokenizer.unk_id]
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.vocab == tokenizer.vocab and loaded.encode(prompt) == tokenizer.encode(prompt)
