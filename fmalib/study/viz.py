"""Figures for the notebooks: label overlays, CAM heat maps, SAM mask mosaics, per-class bars."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib.patches import Patch
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
               size: float = 1.6, class_names: Sequence[str] | None = None):
    """A figure showing images in a grid, axes off; with ``class_names`` (background first), a key of the
    label colours below it."""
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
    if class_names is not None:
        handles = [Patch(facecolor=_PALETTE[i] / 255, edgecolor="k", linewidth=0.3, label=name)
                   for i, name in enumerate(class_names)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 8),
                   fontsize=8, frameon=False, title="label colours")
    return fig


def per_class_bars(table, value: str = "iou", by: str = "class", hue: str | None = None, title: str = "",
                   ylabel: str | None = None, palette: dict | None = None):
    """Bar chart of a per-class table (e.g. fmalib.method.metrics.iou_table), optionally split by `hue` (legend
    beside the axes, off the bars)."""

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * table[by].nunique() + 2), 3))
    sns.barplot(data=table, x=by, y=value, hue=hue, ax=ax, palette=palette)
    ax.set_title(title)
    ax.set_xlabel(by)
    ax.set_ylabel(ylabel or value)
    plt.setp(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")  # no overlapping names
    if hue is not None:
        ax.legend(title=hue, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


# One colour per seed kind, in every figure that compares them.
SEED_COLORS = {"CAM argmax": "#8c8c8c", "CAM argmax + CAA": "#4c72b0", "SAMS, p without GT": "#dd8452",
               "SAMS, p best on GT": "#c44e52", "SAMS, whole masks only": "#55a868", "SAMS, whole + part": "#8172b3",
               "SAMS coarse seeds": "#dd8452", "SAMS fine seeds": "#da8bc3"}


def seed_color(name: str) -> str:
    """The colour of a seed set by its name (a "CAM argmax (…)" row is the CAM argmax's)."""
    return SEED_COLORS.get(name) or (SEED_COLORS["CAM argmax"] if name.startswith("CAM argmax") else "#64b5cd")


def grouped_hbars(table, group: str, variant: str, value: str, title: str, xlabel: str, ax=None,
                  colors: dict | None = None):
    """Horizontal bars: one block per ``group`` value (top to bottom in table order) holding a bar per row,
    coloured by its ``variant`` (``colors``; legend beside the axis), the value printed at each bar's end."""
    colors = colors or SEED_COLORS
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.4 * len(table) + 1.2))
    y, ticks, labels, seen = 0.0, [], [], set()
    for g, rows in table.groupby(group, sort=False):
        ys = [y + i for i in range(len(rows))]
        for yy, (_, row) in zip(ys, rows.iterrows()):
            v = row[variant]
            ax.barh(yy, row[value], height=0.85, color=colors.get(v), label=None if v in seen else v)
            seen.add(v)
            ax.text(row[value] + 0.8, yy, f"{row[value]:.1f}", va="center", fontsize=8)
        ticks.append(sum(ys) / len(ys))
        labels.append(g)
        y += len(rows) + 0.8
    ax.set_yticks(ticks, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="seeds")
    return ax


def savefig(fig, out_dir: str | os.PathLike, name: str) -> Path:
    """Save under out_dir/figures/<name>.png (atomic) and return the path; the figure stays open for display."""

    path = Path(out_dir) / "figures" / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path
