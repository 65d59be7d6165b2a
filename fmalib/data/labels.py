"""Label maps as VOC-palette PNGs (0 = background, 1..C = classes, 255 = ignore), written atomically."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.cache import atomic_write_bytes
from ..core.errors import FmalibError


def _voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (bit-interleaved class index), 256 × RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE = _voc_palette()


def label_to_png_bytes(label: np.ndarray) -> bytes:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label.shape}")
    if label.dtype != np.uint8:
        if label.min() < 0 or label.max() > 255:
            raise ValueError("label values must lie in 0..255")
        label = label.astype(np.uint8)
    img = Image.fromarray(label, mode="P")
    img.putpalette(VOC_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_label_png(path: str | os.PathLike, label: np.ndarray) -> Path:
    """Palette PNG whose pixel values are the class ids (what VOC tools and Detectron2 read)."""
    return atomic_write_bytes(path, label_to_png_bytes(label))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Class ids of a palette (or grayscale) label PNG as uint8 (H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"label file {path} does not exist (expected a palette PNG of class ids)")
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise FmalibError(f"label file {path} has mode {img.mode}; expected a palette (P) or grayscale (L) PNG")
        return np.array(img, dtype=np.uint8)
