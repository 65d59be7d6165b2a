"""Check a whole split up front and list every bad file at once (``python -m fmalib data``).

Per image: the file decodes (PIL ``verify``, then a full ``load``: truncated and corrupt files fail here),
its mode is 8-bit RGB or converts to it (``voc.IMAGE_MODES``: grayscale, palette, RGBA, CMYK … — noted, not
an error). Per label PNG (VOC layout): it exists, decodes, is a palette (P) or grayscale (L) PNG of class ids
(an RGB PNG is an error: convert it to a palette/index PNG), has the image's size and only ids 0..C or 255.
COCO: every image decodes and has the size its annotation file gives. Notes (not errors): converted modes,
images smaller than ``min_side`` px on a side, labels without a foreground class, an EXIF orientation other than
1 (images are read as displayed), hidden or temporary files in the data folders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.cache import stray_files
from ..core.errors import FmalibError
from ..core.label_ids import BACKGROUND, IGNORE
from .labels import LABEL_MODES, label_mode_problem
from .voc import IMAGE_MODES, TRANSPOSING, exif_hint, exif_orientation, unsupported_mode


@dataclass(frozen=True)
class Problem:
    """One file's problem: ``error`` False is a note (the file is usable as it is)."""

    path: str
    message: str
    error: bool = True

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _decode_error(exc: Exception) -> str:
    return f"cannot be decoded ({type(exc).__name__}: {exc}); a truncated or corrupt file? Re-download or re-save it"


def check_image(path: str | Path, min_side: int = 16) -> tuple[tuple[int, int] | None, list[Problem]]:
    """((height, width) or None when unusable, problems) of one image file."""
    path = Path(path)
    if not path.is_file():
        return None, [Problem(str(path), "image file does not exist")]
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
            mode, (w, h), orientation = img.mode, img.size, exif_orientation(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return None, [Problem(str(path), _decode_error(exc))]
    if mode not in IMAGE_MODES:
        return None, [Problem(str(path), unsupported_mode(mode))]
    out = []
    if orientation != 1:
        turned = "rotated" if orientation in TRANSPOSING else "flipped/rotated"
        out.append(Problem(str(path), f"EXIF orientation {orientation}: read {turned} as viewers show it (as "
                                      f"Detectron2 reads it); its label must be drawn on the displayed image",
                           error=False))
        if orientation in TRANSPOSING:
            h, w = w, h
    if IMAGE_MODES[mode]:
        out.append(Problem(str(path), f"mode {mode}: {IMAGE_MODES[mode]}", error=False))
    if min(h, w) < min_side:
        out.append(Problem(str(path), f"only {h}x{w} px (under {min_side} on a side): CLIP and SAM see it "
                                      f"upsampled; expect all-background seeds", error=False))
    return (h, w), out


def check_label(path: str | Path, size: tuple[int, int] | None, num_classes: int,
                image_path: Path | None = None) -> list[Problem]:
    """Problems of one label PNG: mode, size (``size`` = the image's (H, W) as displayed, None: not compared;
    ``image_path`` lets a size mismatch name an EXIF rotation as its cause), class ids."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in LABEL_MODES:
                return [Problem(str(path), label_mode_problem(mode))]
            label = np.array(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        return [Problem(str(path), _decode_error(exc))]
    out = []
    if size is not None and label.shape != tuple(size):
        why = exif_hint(image_path, label.shape) if image_path is not None else ""
        out.append(Problem(str(path), f"label is {label.shape[0]}x{label.shape[1]} but its image is "
                                      f"{size[0]}x{size[1]}; expected equal sizes{why}"))
    ids = np.unique(label)
    bad = [int(v) for v in ids if num_classes < v < IGNORE]
    if bad:
        out.append(Problem(str(path), f"class id(s) {bad} outside 0..{num_classes} and 255 (ignore): "
                                      f"{num_classes} classes in params classes.names"))
    elif not ((ids != BACKGROUND) & (ids != IGNORE)).any():
        note = "only 0 and 255 (ignore) — a binary 0/255 mask? write class ids 1..C" if IGNORE in ids else \
            "only background (0)"
        out.append(Problem(str(path), f"no foreground class: {note}; its seeds are all background", error=False))
    return out


def check_split(ds, min_side: int = 16, progress: bool = False) -> list[Problem]:
    """Every problem of every file of the dataset ``ds`` (a ``VOCDataset``, ``COCODataset`` or ``TagsDataset``,
    whose tag problems come first), in item order; errors and notes (``Problem.error``)."""
    out: list[Problem] = []
    num_classes = len(ds.class_names)
    out += list(getattr(ds, "problems", []))  # a tags split's own (unknown classes, missing images, ...)
    for folder in (f for f in ds.data_folders() if Path(f).is_dir()):
        out += [Problem(str(p), "hidden or temporary file (left by an interrupted copy or write?): not read, not "
                                "part of any fingerprint; delete it", error=False) for p in stray_files(folder)]
    for i in tqdm(range(len(ds)), desc=f"checking {getattr(ds, 'split', '')}", disable=not progress):
        try:
            path = ds.image_path(i)
        except FmalibError as exc:
            out.append(Problem(str(ds.ids[i]), str(exc).splitlines()[0]))
            size = None
        else:
            size, problems = check_image(path, min_side)
            out += problems
        if hasattr(ds, "gt_path") and ds.has_masks:  # a label PNG per image
            try:
                gt_path = ds.gt_path(i)
            except FmalibError as exc:
                out.append(Problem(str(ds.ids[i]), str(exc).splitlines()[0]))
            else:
                out += check_label(gt_path, size, num_classes, path if size is not None else None)
        elif hasattr(ds, "image_size") and size is not None and size != ds.image_size(i):
            out.append(Problem(str(path), f"image is {size[0]}x{size[1]} but {ds.ann_file} gives it "
                                          f"{ds.image_size(i)[0]}x{ds.image_size(i)[1]}; expected equal sizes"))
    return out


def problems_error(problems: Sequence[Problem], what: str, show: int = 20) -> FmalibError | None:
    """An FmalibError listing the errors among ``problems`` (the first ``show``, then how many more), or None."""
    errors = [p for p in problems if p.error]
    if not errors:
        return None
    files = len({p.path for p in errors})
    lines = [f"  {p}" for p in errors[:show]]
    if len(errors) > show:
        lines.append(f"  ... and {len(errors) - show} more")
    return FmalibError(f"{what}: {len(errors)} problem(s) in {files} file(s):\n" + "\n".join(lines))


def require_valid_split(ds, what: str | None = None, min_side: int = 16, show: int = 20,
                        progress: bool = False) -> list[Problem]:
    """``check_split``, raising one FmalibError that lists the errors; returns the notes."""
    problems = check_split(ds, min_side, progress)
    error = problems_error(problems, what or repr(ds), show)
    if error is not None:
        raise error
    return [p for p in problems if not p.error]
