"""Figures for the notebooks: label overlays, CAM heat maps, SAM mask mosaics, per-class bars."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from ..core.cache import atomic_path
from ..data.labels import VOC_PALETTE

_PALETTE = np.array(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)


def colorize(label: np.ndarray) -> np.ndarray:
    """Class-id map (H, W) -> RGB uint8 with the VOC palette (255 = ignore in cream)."""
    return _PALETTE[np.asarray(label, dtype=np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured label map over the image; background (0) stays the image."""
    color = colorize(label).astype(np.float32)
    img = np.asarray(image, dtype=np.float32)
    a = np.where(np.asarray(label)[..., None] == 0, 0.0, alpha)
    return (img * (1 - a) + color * a).astype(np.uint8)


def heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] CAM of the image's size as a jet heat map over the image."""
    cmap = plt.get_cmap("jet")
    heat = cmap(np.clip(cam, 0, 1))[..., :3] * 255
    return (np.asarray(image, np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def mask_mosaic(image: np.ndarray, masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each boolean mask (N, H, W) painted in a random colour over the image (later masks on top)."""
    rng = np.random.default_rng(seed)
    out = np.asarray(image, np.float32).copy()
    for m in np.asarray(masks, bool):
        out[m] = 0.4 * out[m] + 0.6 * rng.integers(40, 256, 3)
    return out.astype(np.uint8)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 4,
               size: float = 1.6):
    """A figure showing images in a grid, axes off."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(img, interpolation="nearest")  # the pixels as they are, and smaller files
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def per_class_bars(table, value: str = "iou", by: str = "class", hue: str | None = None, title: str = ""):
    """Bar chart of a per-class table (e.g. fmalib.method.metrics.iou_table), optionally split by `hue`."""

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * table[by].nunique() + 2), 3))
    sns.barplot(data=table, x=by, y=value, hue=hue, ax=ax)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def savefig(fig, out_dir: str | os.PathLike, name: str) -> Path:
    """Save under out_dir/figures/<name>.png (atomic) and return the path; the figure stays open for display."""

    path = Path(out_dir) / "figures" / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path
