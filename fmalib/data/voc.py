"""PASCAL VOC 2012 (+ SBD train_aug) segmentation data, and anything else laid out the same way.

Image-level labels are derived from the masks (ids present minus 0 and 255), which is how WSSS work on
VOC defines them. The synthetic benchmark is written in this layout and loads unchanged (pass its
``CLASS_NAMES``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from ..core.errors import FmalibError
from ..core.label_ids import BACKGROUND, IGNORE
from .labels import read_label_png

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

VOC_LAYOUT = """expected layout (VOCdevkit/VOC2012 with the SBD-augmented masks added):
  <root>/JPEGImages/<id>.jpg                     images (.jpg or .png)
  <root>/SegmentationClass/<id>.png              VOC 2012 masks (palette or grayscale, 255 = ignore)
  <root>/SegmentationClassAug/<id>.png           SBD-augmented masks, needed for split train_aug only
  <root>/ImageSets/Segmentation/train.txt        1,464 ids (VOC 2012 train)
  <root>/ImageSets/Segmentation/train_aug.txt    10,582 ids (VOC train + SBD, minus VOC val); one id a line
                                                 or two columns: /JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png
  <root>/ImageSets/Segmentation/val.txt          1,449 ids (VOC 2012 val)
SegmentationClassAug and train_aug.txt are the usual 'SegmentationClassAug' release (e.g. the one
DeepLab/CLIP-ES use); copy train_aug.txt into ImageSets/Segmentation/."""

# split -> (id list, mask folders tried in order)
_SPLITS = {
    "train": ("train.txt", ("SegmentationClass",)),
    "val": ("val.txt", ("SegmentationClass",)),
    "train_aug": ("train_aug.txt", ("SegmentationClassAug", "SegmentationClass")),
}


def _layout_error(what: str) -> FmalibError:
    return FmalibError(f"{what}\n{VOC_LAYOUT}")


def _is_path_field(field: str) -> bool:
    return "/" in field or Path(field).suffix.lower() in (".jpg", ".jpeg", ".png")


def split_line_id(line: str) -> str:
    """The image id of one split-list line, in either common form: ``2007_000032`` (VOC's own lists) or
    ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png`` (the usual train_aug.txt).

    Fields are separated by whitespace, so an id cannot hold a space: a line that is neither one field nor
    two path fields is an error (a file named ``s bus.jpg`` must be renamed, not read as ``s``)."""
    fields = line.split()
    if len(fields) == 1 or (len(fields) == 2 and all(map(_is_path_field, fields))):
        return Path(fields[0]).stem if _is_path_field(fields[0]) else fields[0]
    if len(fields) == 2 and fields[1].lstrip("-").isdigit():  # "id flag", as VOC's per-class lists
        return fields[0]
    raise ValueError(f"{line.strip()!r} is neither one id, an id and a flag, nor two paths (image, mask); "
                     f"ids cannot hold spaces "
                     f"(fields are separated by whitespace): rename the files without spaces")


def read_split_list(path: Path) -> list[str]:
    """The ids of a split list, in its order; a malformed line or a repeated id is one error naming the file
    and every offending line (a repeat would be computed twice and weigh twice in training)."""
    ids, lines, bad = [], {}, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.append(split_line_id(line))
        except ValueError as exc:
            bad.append(f"line {n}: {exc}")
            continue
        lines.setdefault(ids[-1], []).append(n)
    repeats = {i: ns for i, ns in lines.items() if len(ns) > 1}
    bad += [f"id {i!r} repeated on lines {', '.join(map(str, ns))}" for i, ns in repeats.items()]
    if bad:
        raise FmalibError(f"split list {path}: {len(bad)} problem(s): " + "; ".join(bad[:20])
                          + (f"; … and {len(bad) - 20} more" if len(bad) > 20 else ""))
    return ids


# PIL modes of 8-bit images read_image accepts -> what converting them to RGB does (None: nothing to convert)
IMAGE_MODES: dict[str, str | None] = {
    "RGB": None,
    "L": "grayscale, converted to RGB (gray copied to the three channels)",
    "1": "1-bit, converted to RGB",
    "P": "palette, converted to RGB through its palette",
    "PA": "palette + alpha, converted to RGB (alpha dropped)",
    "LA": "grayscale + alpha, converted to RGB (alpha dropped)",
    "RGBA": "RGBA, converted to RGB (alpha dropped, the colour under transparent pixels kept)",
    "RGBX": "RGBX, converted to RGB (padding channel dropped)",
    "CMYK": "CMYK, converted to RGB (PIL's plain formula, no colour profile)",
    "YCbCr": "YCbCr, converted to RGB",
}


def unsupported_mode(mode: str) -> str:
    """Why an image of PIL mode ``mode`` (not in IMAGE_MODES) is refused."""
    return (f"has PIL mode {mode} (16-bit / 32-bit / float pixels, which RGB conversion would clip); "
            f"save it as an 8-bit RGB JPEG or PNG")


EXIF_ORIENTATION = 0x0112
TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap height and width


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an open image (1 = as stored; 2..8 = flipped / rotated for display)."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (ValueError, TypeError, OSError):  # a malformed EXIF block: read as stored
        return 1


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an 8-bit image file, as viewers show it: its EXIF orientation applied (as
    Detectron2's ``read_image`` does), so labels drawn on the displayed photo line up. Grayscale, palette,
    RGBA / LA (alpha dropped), CMYK and YCbCr images are converted to RGB (``IMAGE_MODES``). A file PIL cannot
    decode (truncated or corrupt, not an image) or a 16-bit / float image is an FmalibError naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode not in IMAGE_MODES:
                raise FmalibError(f"image {path} {unsupported_mode(img.mode)}")
            return np.array(ImageOps.exif_transpose(img).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError and 'image file is truncated' are OSErrors
        raise FmalibError(f"image {path} cannot be read ({type(exc).__name__}: {exc}); a truncated or corrupt "
                          f"file, or not an image? Re-download or re-save it") from exc


def exif_hint(path: Path, label_shape: tuple[int, int]) -> str:
    """Why an image and its label differ in size when the EXIF orientation is the cause, else ''."""
    with Image.open(path) as img:
        orientation, (w, h) = exif_orientation(img), img.size
    if orientation in TRANSPOSING and tuple(label_shape) == (h, w):
        return (f" — the image carries EXIF orientation {orientation}: fmalib reads it rotated as viewers show it "
                f"({w}x{h}, H x W), its label has the stored size ({h}x{w}); draw the label on the displayed image, "
                f"or re-save the image upright without the tag")
    return ""


class VOCDataset:
    """One split of a VOC-layout dataset: ``ds[i] -> {id, image, labels, gt}``.

    ``train`` and ``val`` read ``SegmentationClass``; ``train_aug`` reads ``SegmentationClassAug``
    (falling back to ``SegmentationClass`` for an id missing there). ``labels`` are the foreground ids
    1..C present in the mask.
    """

    def __init__(self, root: str | os.PathLike, split: str, class_names: Sequence[str] = VOC_CLASSES):
        self.root = Path(root)
        self.split = split
        self.class_names = tuple(class_names)
        if split not in _SPLITS:
            raise FmalibError(f"VOC split {split!r} unknown; expected one of {sorted(_SPLITS)}")
        list_name, self._mask_dirs = _SPLITS[split]
        if not self.root.is_dir():
            raise _layout_error(f"VOC root {self.root} does not exist")
        if not (self.root / "JPEGImages").is_dir():
            raise _layout_error(f"{self.root / 'JPEGImages'} does not exist")
        list_path = self.root / "ImageSets" / "Segmentation" / list_name
        if not list_path.is_file():
            raise _layout_error(f"split list {list_path} does not exist (split {split!r})")
        if not any((self.root / d).is_dir() for d in self._mask_dirs):
            raise _layout_error(f"none of the mask folders {[str(self.root / d) for d in self._mask_dirs]} exists")
        self.ids = read_split_list(list_path)
        self._labels: dict[int, np.ndarray] = {}

    has_masks = True  # the layout's masks are its labels

    def data_folders(self) -> list[Path]:
        """The folders this split reads: images and the mask folders."""
        return [self.root / "JPEGImages", *(self.root / d for d in self._mask_dirs)]

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        stem = self.root / "JPEGImages" / self.ids[i]
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            if stem.with_suffix(ext).is_file():
                return stem.with_suffix(ext)
        raise _layout_error(f"image {stem}.jpg (or .png) not found for id {self.ids[i]!r} of split {self.split!r}")

    def gt_path(self, i: int) -> Path:
        for d in self._mask_dirs:
            p = self.root / d / f"{self.ids[i]}.png"
            if p.is_file():
                return p
        raise _layout_error(f"mask {self.root / self._mask_dirs[0] / (self.ids[i] + '.png')} not found "
                            f"for id {self.ids[i]!r} of split {self.split!r}")

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def load_gt(self, i: int) -> np.ndarray:
        gt = read_label_png(self.gt_path(i))
        top = int(gt[gt != IGNORE].max(initial=0))
        if top > len(self.class_names):
            bad = sorted(int(v) for v in np.unique(gt) if len(self.class_names) < v < IGNORE)
            raise FmalibError(f"mask {self.gt_path(i)} holds class id{'s' * (len(bad) > 1)} "
                              f"{', '.join(map(str, bad))} but only {len(self.class_names)} "
                              f"foreground classes were given (ids 1..{len(self.class_names)}, 255 = ignore: "
                              f"params classes.names {list(self.class_names[:3])}...)")
        return gt

    def image_labels(self, i: int, gt: np.ndarray | None = None) -> np.ndarray:
        """Foreground ids present in the mask (cached; reads only the mask)."""
        if i not in self._labels:
            gt = self.load_gt(i) if gt is None else gt
            u = np.unique(gt)
            self._labels[i] = u[(u != BACKGROUND) & (u != IGNORE)].astype(np.int64)
        return self._labels[i]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        image, gt = self.load_image(i), self.load_gt(i)
        if image.shape[:2] != gt.shape:
            raise FmalibError(f"image {self.image_path(i)} is {image.shape[:2]} but its mask {self.gt_path(i)} "
                              f"is {gt.shape}; expected equal sizes{exif_hint(self.image_path(i), gt.shape)}")
        return {"id": self.ids[i], "image": image, "labels": self.image_labels(i, gt), "gt": gt}

    def __repr__(self) -> str:
        return f"VOCDataset({str(self.root)!r}, {self.split!r}, {len(self)} images, {len(self.class_names)} classes)"
