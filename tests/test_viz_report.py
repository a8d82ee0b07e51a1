"""`hae_fx.report` and `hae_fx.viz` after a real `hae` generation on a left-padded batch of two images.

The expected numbers come from the inputs (where the image placeholders are, how many real tokens each prompt has)
and from the cache's slot buffers, never from the report or viz code itself.
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

import hae_fx
from hae_fx.cache import binned_positions, kept_positions
from hae_fx.viz import kept_patch_mask, kept_patches
from tests.conftest import llava_inputs
from tests.test_hae import OVERFLOW, model_for

SEED = 5
NEW_TOKENS = 48
CONFIG = OVERFLOW.replace(capacity=64, bin_size=8)
GRID = 4  # tiny LLaVA: 32 px image, 8 px patches
PATCH = 8


class RecordReports(LogitsProcessor):
    """`hae_fx.report` and the kept positions each time generate scores a token (after prefill, then after every
    decode step)."""

    def __init__(self, cache):
        self.cache = cache
        self.reports, self.kept = [], []

    def __call__(self, input_ids, scores):
        self.reports.append(hae_fx.report(self.cache))
        self.kept.append(kept_positions(self.cache))
        return scores


@pytest.fixture(scope="module")
def run():
    model = hae_fx.transform(model_for(SEED), CONFIG, options={"hae.compiler": "eager"})
    inputs = llava_inputs(model, 2, seed=SEED)
    recorder = RecordReports(hae_fx.HAECache.for_model(model, CONFIG, batch=2))
    out = model.generate(**inputs, past_key_values=recorder.cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                         return_dict_in_generate=True, logits_processor=LogitsProcessorList([recorder]))
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    assert out.past_key_values is recorder.cache
    return model, inputs, recorder


def prompt_visual_positions(model, inputs, row):
    """Logical positions of the image placeholders among the real (unpadded) tokens of prompt `row`."""
    real_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
    return (real_ids == model.config.image_token_id).nonzero().flatten().tolist()


def real_tokens(inputs, row):
    return int(inputs["attention_mask"][row].sum())


def test_the_generation_evicts_visual_tokens_at_prefill_and_decode(run):
    """Preconditions of the other tests: DAP evicts some but not all visual tokens of each sequence, and DDES
    evicts more of them afterwards (so the prefill set and the current set differ)."""
    model, inputs, recorder = run
    cache = recorder.cache
    for row in range(2):
        visual = set(prompt_visual_positions(model, inputs, row))
        assert len(visual) == GRID * GRID
        at_prefill = visual & set(cache.prefill_kept[row])
        now = visual & set(kept_positions(cache)[row])
        assert 0 < len(at_prefill) < len(visual), "DAP must keep some visual tokens and evict others"
        assert now < at_prefill, "DDES must evict visual tokens after prefill, and none may come back once freed"
    assert sum(map(len, binned_positions(cache))) > 0, "the bin must hold tokens at the end"


def test_report_counts_match_the_cache_and_the_inputs(run):
    model, inputs, recorder = run
    cache = recorder.cache
    report = hae_fx.report(cache)
    assert (report.policy, report.capacity, report.bin_size) == ("hae", 64, 8)
    assert len(report.sequences) == 2
    kept, binned = kept_positions(cache), binned_positions(cache)
    for row, seq in enumerate(report.sequences):
        visual = set(prompt_visual_positions(model, inputs, row))
        assert seq.prompt_visual == 16
        assert seq.kept_visual == len(visual & set(kept[row]))
        assert seq.kept_text == len(set(kept[row]) - visual)
        assert seq.kept_visual + seq.kept_text == seq.kept == len(kept[row])
        assert seq.binned == len(binned[row])
        # the last generated token is sampled from the last step's logits and never fed back
        assert seq.tokens_seen == real_tokens(inputs, row) + NEW_TOKENS - 1
        assert seq.kept < seq.tokens_seen <= max(kept[row]) + 1
    assert report.sequences[0].tokens_seen != report.sequences[1].tokens_seen  # the prompts differ in length


def test_report_bytes_and_saving(run):
    model, inputs, recorder = run
    cache = recorder.cache
    text = model.config.text_config
    kv_heads, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    # K and V, every layer, both sequences, float32
    bytes_per_position = 2 * text.num_hidden_layers * 2 * kv_heads * head_dim * 4
    longest = max(real_tokens(inputs, row) for row in range(2)) + NEW_TOKENS - 1

    report = hae_fx.report(cache)
    assert report.kv_bytes == cache.kv_nbytes == bytes_per_position * CONFIG.capacity
    assert report.full_kv_bytes == bytes_per_position * longest
    assert longest > CONFIG.capacity
    assert report.kv_saving == pytest.approx(1 - CONFIG.capacity / longest)
    assert report.kv_saving > 0

    # over the generation: fixed bytes, a full cache growing by one position per step, the saving rising with it
    # from negative (the prompt is shorter than the capacity) through zero to positive
    assert {r.kv_bytes for r in recorder.reports} == {cache.kv_nbytes}
    longest_seen = [max(seq.tokens_seen for seq in r.sequences) for r in recorder.reports]
    assert longest_seen == list(range(longest - NEW_TOKENS + 1, longest + 1))
    for r, seen in zip(recorder.reports, longest_seen, strict=True):
        assert r.full_kv_bytes == bytes_per_position * seen
        assert np.sign(r.kv_saving) == np.sign(seen - CONFIG.capacity)
    savings = [r.kv_saving for r in recorder.reports]
    assert savings == sorted(savings) and savings[0] < 0 < savings[-1]
    # and each step's report agrees with the positions the cache held then
    for r, kept in zip(recorder.reports, recorder.kept, strict=True):
        assert [seq.kept for seq in r.sequences] == [len(k) for k in kept]


def test_report_prints_one_line_per_sequence(run):
    _, _, recorder = run
    report = hae_fx.report(recorder.cache)
    text = str(report)
    lines = text.splitlines()
    assert "policy='hae'" in lines[0] and "capacity 64" in lines[0] and "bin 8" in lines[0]
    for index, seq in enumerate(report.sequences):
        row = re.compile(rf"^\s+{index}\s+{seq.tokens_seen}\s+{seq.kept}\s+{seq.kept_visual}\s+\(\s*16\)\s+"
                         rf"{seq.kept_text}\s+{seq.binned}$")
        assert sum(bool(row.match(line)) for line in lines) == 1, text
    assert f"KV bytes {report.kv_bytes:,} vs full cache {report.full_kv_bytes:,}" in text
    assert f"({report.kv_saving:.1%} saved)" in text
    assert len(lines) == 2 + len(report.sequences) + 1


@pytest.mark.parametrize("sequence", [0, 1])
def test_kept_patch_mask_is_the_prefill_keep_set_on_the_patch_grid(run, sequence):
    model, inputs, recorder = run
    cache = recorder.cache
    visual = prompt_visual_positions(model, inputs, sequence)

    mask = kept_patch_mask(cache, sequence=sequence)
    assert mask.shape == (GRID, GRID) and mask.dtype == torch.bool
    prefill = set(cache.prefill_kept[sequence])
    assert int(mask.sum()) == len(prefill & set(visual))
    assert mask.flatten().tolist() == [p in prefill for p in visual]  # row-major patch order

    now = kept_patch_mask(cache, sequence=sequence, after_prefill=False)
    current = set(kept_positions(cache)[sequence])
    assert now.shape == (GRID, GRID) and now.dtype == torch.bool
    assert int(now.sum()) == len(current & set(visual))
    assert now.flatten().tolist() == [p in current for p in visual]
    assert not bool((now & ~mask).any())  # freed visual tokens never come back


def test_kept_patch_masks_differ_where_the_caches_differ(run):
    _, _, recorder = run
    cache = recorder.cache
    masks = [kept_patch_mask(cache, sequence=s) for s in range(2)]
    assert not torch.equal(masks[0], masks[1])
    assert any(not torch.equal(kept_patch_mask(cache, sequence=s, after_prefill=False), masks[s]) for s in range(2))


def _patch(array, row, col):
    return array[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].astype(np.int64)


@pytest.mark.parametrize("sequence", [0, 1])
def test_kept_patches_dims_the_evicted_patches_only(run, tmp_path, sequence):
    model, inputs, recorder = run
    cache = recorder.cache
    image = inputs["pixel_values"][sequence]
    path = tmp_path / "kept.png"

    picture = kept_patches(image, cache, path, sequence=sequence)
    reopened = Image.open(path)
    assert reopened.format == "PNG" and reopened.mode == "RGB" and reopened.size == (32, 32)
    drawn = np.asarray(reopened)
    assert np.array_equal(drawn, np.asarray(picture))

    # the undimmed rendering is the min-max rescale of the normalised pixel values to 0..255
    plain = np.asarray(kept_patches(image, torch.ones(GRID, GRID, dtype=torch.bool)))
    hwc = image.permute(1, 2, 0).double().numpy()
    rescaled = np.round((hwc - hwc.min()) / (hwc.max() - hwc.min()) * 255)
    assert np.abs(plain.astype(np.int64) - rescaled).max() <= 1

    mask = kept_patch_mask(cache, sequence=sequence)
    assert 0 < int(mask.sum()) < GRID * GRID
    for row in range(GRID):
        for col in range(GRID):
            got, undimmed = _patch(drawn, row, col), _patch(plain, row, col)
            if mask[row, col]:
                assert np.array_equal(got, undimmed), (row, col)
            else:
                assert (got <= undimmed).all() and got.sum() < undimmed.sum(), (row, col)
                assert np.abs(got - np.round(undimmed * 0.25)).max() <= 1, (row, col)


def test_kept_patches_of_the_current_set_dims_more(run, tmp_path):
    model, inputs, recorder = run
    cache = recorder.cache
    for sequence in range(2):
        image = inputs["pixel_values"][sequence]
        at_prefill = np.asarray(kept_patches(image, cache, sequence=sequence)).astype(np.int64)
        now = np.asarray(kept_patches(image, cache, sequence=sequence, after_prefill=False)).astype(np.int64)
        assert (now <= at_prefill).all()
        dimmed_later = kept_patch_mask(cache, sequence=sequence) & ~kept_patch_mask(cache, sequence=sequence,
                                                                                       after_prefill=False)
        for row, col in dimmed_later.nonzero().tolist():
            assert _patch(now, row, col).sum() < _patch(at_prefill, row, col).sum()


def test_a_prompt_without_visual_tokens_has_nothing_to_draw(run, tmp_path):
    model, _, _ = run
    input_ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=input_ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.prompt_visual_positions == [[]]
    with pytest.raises(ValueError, match="sequence 0 of this cache's prompt has no visual tokens: nothing to draw"):
        kept_patch_mask(cache)
    with pytest.raises(ValueError, match="no visual tokens"):
        kept_patches(torch.zeros(3, 32, 32), cache, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_an_image_index_beyond_the_prompt_images_is_refused(run, tmp_path):
    _, inputs, recorder = run
    with pytest.raises(ValueError, match=r"sequence 1 has 1 image\(s\) of 4x4 patches; image_index=1 does not exist"):
        kept_patch_mask(recorder.cache, sequence=1, image_index=1)
    with pytest.raises(ValueError, match=r"image_index=1 does not exist"):
        kept_patches(inputs["pixel_values"][1], recorder.cache, tmp_path / "x.png", sequence=1, image_index=1)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("shape", [(32, 32), (2, 3, 32, 32), (3,)])
def test_an_image_of_the_wrong_rank_is_refused(shape, tmp_path):
    mask = torch.ones(GRID, GRID, dtype=torch.bool)
    with pytest.raises(ValueError, match=re.escape(f"expected an image of shape [3, H, W] or [H, W, 3], got {shape}")):
        kept_patches(torch.zeros(shape), mask, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_batched_single_image_and_channels_last_arrays_are_accepted(run):
    """The documented layouts: `[1, 3, H, W]` is squeezed, `[H, W, 3]` is taken as is."""
    _, inputs, recorder = run
    image = inputs["pixel_values"][0]
    mask = kept_patch_mask(recorder.cache, sequence=0)
    reference = np.asarray(kept_patches(image, mask))
    assert np.array_equal(np.asarray(kept_patches(image.unsqueeze(0), mask)), reference)
    assert np.array_equal(np.asarray(kept_patches(image.permute(1, 2, 0).numpy(), mask)), reference)
