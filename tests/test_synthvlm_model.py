"""SynthVLM, the trained yardstick model: the shipped checkpoint, its accuracy, its data, scoring and training.

Every KV-eviction accuracy number is measured against this model, so these tests pin what that number rests on:
the checkpoint loads offline as a real HF LLaVA of the documented shape, it answers the fixed held-out sample
almost perfectly with a full cache (so an accuracy drop under eviction is the policy's doing), hae_fx's compiled
full-cache path gives exactly HF's answers, the scorer means what evaluate.py says, and the training script still
runs end to end and writes a checkpoint `load` reads back.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

import hae_fx
from hae_fx.models.synthvlm import data, evaluate, train
from hae_fx.models.synthvlm import model as synthvlm
from hae_fx.models.synthvlm.scenes import (
    DESCRIBE_QUESTION,
    QUESTION_KINDS,
    Scene,
    answer_from_scene,
    cells_named,
    make_question,
    random_scene,
    render,
)
from hae_fx.models.synthvlm.tokenizer import WordTokenizer

Loaded = tuple[LlavaForConditionalGeneration, WordTokenizer]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for this file: the model is too small to gain from more, and OpenMP threads that share
    their cores with another busy process run many times slower (on a shared 2-core machine this file took
    about 20 s with one thread and 160 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped() -> Loaded:
    """The shipped checkpoint, loaded once with the Hub switched off (any download attempt would raise)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the env var is only read at import
        return synthvlm.load()


# ----------------------------------------------------------------------------------------------- the checkpoint


def test_shipped_checkpoint_is_a_small_gqa_llava(shipped: Loaded) -> None:
    model, tokenizer = shipped
    assert type(model) is LlavaForConditionalGeneration and not model.training
    text, vision = model.config.text_config, model.config.vision_config
    assert synthvlm.VISUAL_TOKENS == 144 == (vision.image_size // vision.patch_size) ** 2
    assert model.config.image_seq_length == synthvlm.VISUAL_TOKENS
    assert synthvlm.prompt_ids(tokenizer, "is there a red circle ?").count(tokenizer.image_id) == 144
    assert text.num_key_value_heads < text.num_attention_heads
    assert text.num_hidden_layers == 4
    assert (synthvlm.CHECKPOINT_DIR / "model.safetensors").stat().st_size < 16 * 2**20
    assert tokenizer.ids["<image>"] == tokenizer.image_id == model.config.image_token_id


def test_load_without_checkpoint_names_the_train_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="python -m hae_fx.models.synthvlm.train"):
        synthvlm.load(tmp_path)


def test_full_cache_accuracy_on_held_out_sample(shipped: Loaded) -> None:
    model, tokenizer = shipped
    accuracy = evaluate.evaluate(model, tokenizer, data.held_out(200), batch_size=50)
    assert set(accuracy) == {*QUESTION_KINDS, "overall"}
    assert all(accuracy[kind] >= 0.95 for kind in data.SHORT_KINDS), accuracy
    assert accuracy["describe"] >= 0.90, accuracy


@pytest.mark.parametrize("describe", [False, True], ids=["short", "describe"])
def test_compiled_full_cache_reproduces_hf_answers(shipped: Loaded, describe: bool) -> None:
    model, tokenizer = shipped
    examples = data.held_out(4, kinds=("describe",)) if describe else data.held_out(12, kinds=data.SHORT_KINDS)
    width = evaluate.prompt_width(tokenizer, examples)
    max_new_tokens = data.max_answer_tokens({e.kind for e in examples})
    settings = {"batch_size": 2 if describe else 4, "width": width, "max_new_tokens": max_new_tokens}
    expected = evaluate.generate_answers(model, tokenizer, examples, **settings)

    config = hae_fx.HAEConfig(policy="full", capacity=width + max_new_tokens)
    compiled = hae_fx.transform(copy.deepcopy(model), config, options={"hae.compiler": "eager"})
    caches: list[object] = []
    answers = evaluate.generate_answers(compiled, tokenizer, examples,
                                        on_batch=lambda _, out: caches.append(out.past_key_values), **settings)
    assert answers == expected
    assert caches and all(isinstance(cache, hae_fx.HAECache) for cache in caches)


# ------------------------------------------------------------------------------------------------------ scoring

SCENE = Scene(4, {(0, 0): ("red", "circle"), (1, 2): ("blue", "square"), (3, 3): ("green", "cross")})
DESCRIPTION = "row 1 column 1 red circle . row 2 column 3 blue square . row 4 column 4 green cross ."


def _example(kind: str, answer: str) -> data.Example:
    return data.Example(SCENE, kind, "a question ?", answer)


def test_short_answers_score_exact_match_after_normalising() -> None:
    colour = _example("colour_at", "red")
    assert evaluate.score(colour, "red") == evaluate.score(colour, "  RED ") == 1.0
    assert evaluate.score(colour, "blue") == evaluate.score(colour, "red red") == evaluate.score(colour, "") == 0.0
    locate = _example("locate", "row 2 column 3")
    assert evaluate.score(locate, "Row 2  column 3") == 1.0
    assert evaluate.score(locate, "row 2 column 4") == 0.0


def test_describe_scores_share_of_objects_described_correctly() -> None:
    describe = data.Example(SCENE, "describe", DESCRIBE_QUESTION, DESCRIPTION)
    assert make_question(SCENE, "describe", 0) == (DESCRIBE_QUESTION, DESCRIPTION)
    assert evaluate.score(describe, DESCRIPTION) == 1.0
    assert evaluate.score(describe, DESCRIPTION.upper().replace(" .", ".")) == 1.0
    missing = DESCRIPTION.replace("row 2 column 3 blue square . ", "")
    assert evaluate.score(describe, missing) == pytest.approx(2 / 3)
    invented = DESCRIPTION + " row 4 column 1 yellow triangle ."
    assert evaluate.score(describe, invented) == pytest.approx(3 / 4)
    wrong_colour = DESCRIPTION.replace("blue square", "red square")
    assert evaluate.score(describe, wrong_colour) == pytest.approx(2 / 3)
    assert evaluate.score(describe, "nothing .") == evaluate.score(describe, "square square row row") == 0.0


def test_overall_accuracy_weighs_every_kind_the_same() -> None:
    examples = [_example("colour_at", "red")] * 3 + [_example("exists", "yes")]
    accuracy = evaluate.accuracy_by_kind(examples, ["red", "red", "blue", "yes"])
    assert accuracy == pytest.approx({"colour_at": 2 / 3, "exists": 1.0, "overall": 5 / 6})


# --------------------------------------------------------------------------------------------------------- data


def test_held_out_is_fixed_and_kind_balanced() -> None:
    first = data.held_out(12)
    assert first == data.held_out(12) and first[:6] == data.held_out(6)
    assert np.array_equal(data.images(first), data.images(data.held_out(12)))  # texture seeds too
    assert [e.kind for e in first] == list(QUESTION_KINDS) * 2
    assert [e.kind for e in data.held_out(4, kinds=("count", "exists"))] == ["count", "exists"] * 2


def test_held_out_scenes_are_not_training_scenes() -> None:
    training = [data.scene_for(data.TRAIN, i) for i in range(50)]
    assert not any(data.scene_for(data.HELD_OUT, i) in training for i in range(50))


def test_training_batch_labels_only_answer_and_eos() -> None:
    tokenizer = WordTokenizer()
    questions = [("what colour is the shape at row 1 column 1 ?", "red"), (DESCRIBE_QUESTION, DESCRIPTION)]
    batch = data.training_batch(tokenizer, questions)
    rows = [(synthvlm.prompt_ids(tokenizer, q), tokenizer.encode(a) + [tokenizer.eos_id]) for q, a in questions]
    width = max(len(prompt) + len(target) for prompt, target in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    for row, (prompt, target) in enumerate(rows):
        pad = width - len(prompt) - len(target)
        assert batch["input_ids"][row].tolist() == prompt + target + [tokenizer.pad_id] * pad
        assert batch["attention_mask"][row].tolist() == [1] * (len(prompt) + len(target)) + [0] * pad
        assert batch["labels"][row].tolist() == [data.IGNORE_INDEX] * len(prompt) + target + [data.IGNORE_INDEX] * pad


def test_prompt_batch_left_pads_to_width() -> None:
    tokenizer = WordTokenizer()
    examples = data.held_out(6)
    prompts = [synthvlm.prompt_ids(tokenizer, e.question) for e in examples]
    longest = evaluate.prompt_width(tokenizer, examples)
    assert len({len(p) for p in prompts}) > 1 and longest == max(map(len, prompts))
    assert data.prompt_batch(tokenizer, examples)["input_ids"].shape == (6, longest)

    batch = data.prompt_batch(tokenizer, examples, width=longest + 3)
    for row, prompt in enumerate(prompts):
        pad = longest + 3 - len(prompt)
        assert batch["input_ids"][row].tolist() == [tokenizer.pad_id] * pad + prompt
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(prompt)
    pixels = batch["pixel_values"]
    assert pixels.shape == (6, 3, 96, 96) and pixels.min() >= -1.0 and pixels.max() <= 1.0
    with pytest.raises(ValueError, match="longer than width"):
        data.prompt_batch(tokenizer, examples, width=longest - 1)


@pytest.mark.parametrize("grid_size", [3, 4, 5, 6, 7])
def test_cell_patches_partition_the_image(grid_size: int) -> None:
    side = synthvlm.IMAGE_SIZE // synthvlm.PATCH_SIZE
    cells = [(r, c) for r in range(grid_size) for c in range(grid_size)]
    patches = [synthvlm.cell_patches(cell, grid_size) for cell in cells]
    assert sorted(p for ps in patches for p in ps) == list(range(synthvlm.VISUAL_TOKENS))  # each patch in one cell
    assert all((side // grid_size) ** 2 <= len(ps) <= math.ceil(side / grid_size) ** 2 for ps in patches)


@pytest.mark.parametrize("grid_size", [3, 4, 6])
def test_cell_patches_hold_every_pixel_of_the_cells_shape(grid_size: int) -> None:
    """On grids whose cells are whole patches, a rendered object's saturated pixels fall in its cell's patches
    (patch index: pixel row // patch size, column // patch size, row-major), and those patches lie inside the cell."""
    patch, side = synthvlm.PATCH_SIZE, synthvlm.IMAGE_SIZE // synthvlm.PATCH_SIZE
    cell_px = synthvlm.IMAGE_SIZE // grid_size
    for seed in range(5):
        scene = random_scene(seed, grid_size=grid_size)
        pixels = np.asarray(render(scene)).astype(int)
        saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
        for (row, col) in scene.objects:
            ys, xs = np.nonzero(saturated[row * cell_px:(row + 1) * cell_px, col * cell_px:(col + 1) * cell_px])
            touched = {((row * cell_px + y) // patch) * side + (col * cell_px + x) // patch
                       for y, x in zip(ys, xs, strict=True)}
            cell = synthvlm.cell_patches((row, col), grid_size)
            assert touched and touched <= set(cell)
            assert len(cell) == (cell_px // patch) ** 2
            assert all(row * cell_px <= (p // side) * patch < (row + 1) * cell_px and
                       col * cell_px <= (p % side) * patch < (col + 1) * cell_px for p in cell)


# ----------------------------------------------------------------------------------------------------- training


def _mixed_training_batch(rows: int) -> dict[str, torch.Tensor]:
    examples = data.held_out(rows)
    return data.training_batch(WordTokenizer(), [(e.question, e.answer) for e in examples])


def test_patch_dropout_hides_only_visual_tokens_within_budget() -> None:
    batch = _mixed_training_batch(64)
    visual = batch["input_ids"] == WordTokenizer.image_id
    before = batch["attention_mask"].clone()
    mask = batch["attention_mask"]
    train.hide_visual_tokens(mask, visual, 0.6, np.random.default_rng(0))

    hidden = before.bool() & ~mask.bool()
    assert torch.equal(mask, before * mask), "only ever sets the mask to 0"
    assert not (hidden & ~visual).any(), "only visual positions are hidden"
    share = hidden.sum(dim=1) / visual.sum(dim=1)
    assert share.max() <= 0.6
    assert 32 <= (share > 0).sum() < 64 and share.max() > 0.4  # about 3 rows in 4, up to nearly the maximum

    untouched = before.clone()
    train.hide_visual_tokens(untouched, visual, 0.0, np.random.default_rng(0))
    assert torch.equal(untouched, before)


def test_per_question_loss_weighs_questions_equally() -> None:
    logits = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.full((2, 12), data.IGNORE_INDEX)
    labels[0, 11] = 3  # a one-token answer
    labels[1, 2:] = torch.arange(10) % 5  # a ten-token answer
    log_probs = logits.log_softmax(dim=-1)

    def question_loss(row: int) -> float:
        answer = [t for t in range(1, 12) if labels[row, t] != data.IGNORE_INDEX]
        return -sum(log_probs[row, t - 1, labels[row, t]].item() for t in answer) / len(answer)

    expected = (question_loss(0) + question_loss(1)) / 2
    assert train.per_question_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    token_mean = (question_loss(0) + 10 * question_loss(1)) / 11
    assert not math.isclose(expected, token_mean, rel_tol=1e-2), "the example must tell the two weightings apart"


def test_kind_weights_argument() -> None:
    assert train.parse_args(["--kind-weights", "1,1,1,1,1,0"]).kind_weights == (1.0, 1.0, 1.0, 1.0, 1.0, 0.0)
    for bad in ("1,2", "1,1,1,1,1,-1", "0,0,0,0,0,0"):
        with pytest.raises(SystemExit):
            train.parse_args(["--kind-weights", bad])


def test_training_smoke_run_writes_loadable_checkpoint(tmp_path: Path) -> None:
    log = train.main(["--steps", "3", "--batch-size", "4", "--pool", "8", "--workers", "0", "--eval-every", "100",
                      "--eval-questions", "6", "--final-eval-questions", "6", "--device", "cpu",
                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "training.json").read_text())
    assert log["steps_done"] == saved["steps_done"] == 3
    assert saved["final_eval"]["questions"] == 6 and set(saved["final_eval"]) >= set(QUESTION_KINDS)
    assert saved["loss"] and all(math.isfinite(loss) for _, loss in saved["loss"])

    model, tokenizer = synthvlm.load(tmp_path)
    assert isinstance(model, LlavaForConditionalGeneration) and tokenizer.vocab == WordTokenizer().vocab
    initial = synthvlm.new_model(0).state_dict()
    trained = model.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[name], initial[name]) for name in initial), "the saved weights are trained"


def test_conversations_ask_about_other_cells_with_correct_answers() -> None:
    chats = data.conversations(12)
    assert chats == data.conversations(12) and chats != data.conversations(12, data.TUNE)
    for index, chat in enumerate(chats):
        first, *follow_ups = chat.turns
        assert first.kind == data.ONE_WORD_KINDS[index % len(data.ONE_WORD_KINDS)]
        assert [t.kind for t in follow_ups] == list(data.FOLLOW_UP_KINDS)
        cells = [cell for turn in chat.turns for cell in cells_named(turn.question)]
        assert len(cells) == len(set(cells)) and all(cell in chat.scene.objects for cell in cells[-2:])
        for turn in chat.turns:
            assert turn.scene is chat.scene and answer_from_scene(chat.scene, turn.question) == turn.answer


def test_training_batch_follow_ups_label_every_answer() -> None:
    tokenizer = WordTokenizer()
    first = ("how many red shapes ?", "two")
    later = [("what shape is at row 1 column 1 ?", "circle"), ("is there a blue cross ?", "no")]
    batch = data.training_batch(tokenizer, [first, first], [later, []])
    expected = synthvlm.prompt_ids(tokenizer, first[0]) + tokenizer.encode("two", add_eos=True)
    labels = [data.IGNORE_INDEX] * (len(expected) - 2) + expected[-2:]
    for question, answer in later:
        asked, said = tokenizer.encode(question), tokenizer.encode(answer, add_eos=True)
        expected, labels = expected + asked + said, labels + [data.IGNORE_INDEX] * len(asked) + said
    assert batch["input_ids"][0].tolist() == expected and batch["labels"][0].tolist() == labels
    short = len(expected) - sum(len(tokenizer.encode(q)) + len(tokenizer.encode(a)) + 1 for q, a in later)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (len(expected) - short)
