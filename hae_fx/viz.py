"""`kept_patches`: see at a glance which image patches Dual-Attention Pruning kept; `kept_patches_figure`: the
state after prefill and at the end of generation side by side, scaled up, with a legend.

LLaVA turns an image into a `grid x grid` raster of patches, one visual token each, in row-major order, so a
keep mask over an image's visual tokens maps straight onto the picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hae_fx.cache import HAECache, kept_positions


def kept_patch_mask(cache: HAECache, *, sequence: int = 0, image_index: int = 0, grid: int | None = None,
                    after_prefill: bool = True) -> torch.Tensor:
    """`[grid, grid]` bool mask of the patches of one prompt image that the cache keeps.

    Args:
        cache: a cache that has run a prefill.
        sequence: which sequence of the batch.
        image_index: which image of that sequence's prompt (images are `grid * grid` consecutive visual tokens).
        grid: patches per side; inferred when the prompt holds a single image.
        after_prefill: the set DAP kept (True) or the set the cache holds now, after decoding (False).
    """
    visual = cache.prompt_visual_positions[sequence]
    if not visual:
        raise ValueError(f"sequence {sequence} of this cache's prompt has no visual tokens: nothing to draw")
    if grid is None:
        grid = math.isqrt(len(visual))
        if grid * grid != len(visual):
            raise ValueError(f"the prompt has {len(visual)} visual tokens, not one square image; pass grid=")
    per_image = grid * grid
    if len(visual) < (image_index + 1) * per_image:
        raise ValueError(f"sequence {sequence} has {len(visual) // per_image} image(s) of {grid}x{grid} patches; "
                         f"image_index={image_index} does not exist")
    kept = set(cache.prefill_kept[sequence] if after_prefill else kept_positions(cache)[sequence])
    image_positions = visual[image_index * per_image:(image_index + 1) * per_image]
    return torch.tensor([p in kept for p in image_positions]).view(grid, grid)


def kept_patches(image: Image.Image | torch.Tensor | np.ndarray, cache_or_mask: HAECache | torch.Tensor,
                 path: str | Path | None = None, *, dim: float = 0.25, **mask_options) -> Image.Image:
    """Draw `image` with the patches the cache evicted dimmed to `dim` of their brightness; save it to `path`
    (PNG) when given, and return it.

    Args:
        image: a PIL image, or an `[3, H, W]` / `[H, W, 3]` array (any range: it is rescaled to 0-255, so
            normalised `pixel_values` work).
        cache_or_mask: an `HAECache` after prefill, or a `[grid, grid]` bool mask (True = kept).
        mask_options: passed to `kept_patch_mask` (`sequence`, `image_index`, `grid`, `after_prefill`).
    """
    mask = cache_or_mask if isinstance(cache_or_mask, torch.Tensor) else kept_patch_mask(cache_or_mask,
                                                                                          **mask_options)
    pixels = _as_rgb(image).astype(np.float32)
    height, width = pixels.shape[:2]
    grid_rows, grid_cols = mask.shape
    rows = np.minimum(np.arange(height) * grid_rows // height, grid_rows - 1)
    cols = np.minimum(np.arange(width) * grid_cols // width, grid_cols - 1)
    kept = mask.bool().numpy()[rows[:, None], cols[None, :]]
    pixels = np.where(kept[..., None], pixels, pixels * dim).round().astype(np.uint8)
    picture = Image.fromarray(pixels, mode="RGB")
    if path is not None:
        picture.save(Path(path), format="PNG")
    return picture


#: pixel size (width, height) of the PNG `kept_patches_figure` writes
FIGURE_PIXELS = (1200, 660)
_DPI = 100
_DIM = 0.25


def kept_patches_figure(image: Image.Image | torch.Tensor | np.ndarray, cache: HAECache, path: str | Path, *,
                        sequence: int = 0, image_index: int = 0, grid: int | None = None,
                        marks: Sequence[tuple[float, float, float, float]] = (), marks_label: str = "marked",
                        title: str | None = None) -> None:
    """Save a `FIGURE_PIXELS` PNG: `image` twice, scaled up, with the patches the cache evicted dimmed; left the
    set Dual-Attention Pruning kept after prefill, right the set the cache holds at the end of generation (decode
    eviction takes more). Each panel's title counts its kept patches; a legend says what dimmed means.

    Args:
        cache: the cache a `generate` call returned (after its last token).
        sequence, image_index, grid: which image, as in `kept_patch_mask`.
        marks: pixel boxes `(x0, y0, x1, y1)` in `image`'s coordinates outlined in red on both panels (e.g. where
            an answer is wrong), named `marks_label` in the legend.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    options = {"sequence": sequence, "image_index": image_index, "grid": grid}
    states = {"after prefill (Dual-Attention Pruning)": kept_patch_mask(cache, after_prefill=True, **options),
              "end of generation (after decode eviction)": kept_patch_mask(cache, after_prefill=False, **options)}
    width, height = FIGURE_PIXELS
    figure, axes = plt.subplots(1, 2, figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    for axis, (state, mask) in zip(axes, states.items(), strict=True):
        picture = kept_patches(image, mask, dim=_DIM)
        axis.imshow(picture, interpolation="nearest")  # nearest: each pixel becomes a sharp block
        axis.set_title(f"{state}\n{int(mask.sum())} of {mask.numel()} patches kept", fontsize=11)
        axis.set_xticks([])
        axis.set_yticks([])
        for x0, y0, x1, y1 in marks:
            axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red",
                                     linewidth=2.5))
    legend = [Patch(facecolor="white", edgecolor="black", label="kept patch: shown as the model saw it"),
              Patch(facecolor=str(_DIM * 0.5), edgecolor="black",
                    label=f"evicted patch: dimmed to {_DIM:.0%} brightness")]
    if marks:
        legend.append(Patch(fill=False, edgecolor="red", linewidth=2.5, label=marks_label))
    figure.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=10, frameon=False)
    if title:
        figure.suptitle(title, fontsize=12)
    figure.subplots_adjust(left=0.02, right=0.98, top=0.86 if title else 0.9, bottom=0.1, wspace=0.05)
    figure.savefig(Path(path), format="png", dpi=_DPI)
    plt.close(figure)


def _as_rgb(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, float)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected an image of shape [3, H, W] or [H, W, 3], got {tuple(array.shape)}")
    if array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    low, high = float(array.min()), float(array.max())
    return ((array - low) / max(high - low, 1e-12) * 255).round().astype(np.uint8)
