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
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MODES:
                raise FmalibError(f"label file {path} {label_mode_problem(img.mode)}")
            return np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError, truncated files: OSError
        raise FmalibError(f"label file {path} cannot be read ({type(exc).__name__}: {exc}); a truncated or corrupt "
                          f"PNG? Re-save it as a palette PNG of class ids") from exc


LABEL_MODES = ("P", "L")  # pixel values are the class ids


def label_mode_problem(mode: str) -> str:
    """Why a label PNG of PIL mode ``mode`` (not P / L) is refused, and what to do."""
    if mode in ("RGB", "RGBA"):
        return (f"is an {mode} PNG (colours, not class ids); convert it to a palette/index PNG whose pixel values "
                f"are the class ids (0 background, 1..C classes, 255 ignore): mode P or L, e.g. "
                f"fmalib.data.labels.write_label_png")
    return (f"has mode {mode}; expected a palette (P) or grayscale (L) PNG whose pixel values are the class ids "
            f"(0 background, 1..C classes, 255 ignore)")
