"""Images with image-level tags only — what a practitioner of weak supervision has: a folder of photos and a
tags file, or one folder per class (single-label data). Masks are optional (an evaluation split may carry them).

Tags files (paths relative to ``data.root``, per split under ``data.tags``):

* CSV ``image,labels``: the image's path relative to the split's ``images`` folder, its labels separated by
  ``;``; a header row is optional, UTF-8 with or without BOM;
* JSON Lines: ``{"image": "a.jpg", "labels": ["dog", "cat"]}`` per line;
* no tags file: ``images`` holds one sub-folder per class, each image of a folder tagged with that class only.

An image's id is its path below ``images`` without the extension, ``/`` written ``_`` (seeds are saved as
``<id>.png``). Labels are matched to ``classes.names`` ignoring case and surrounding spaces (noted where that
normalises one). Every problem of a split is collected (``TagsDataset.problems``): the constructor raises one
error listing them all (``strict``), ``python -m fmalib data`` adds each image's decode check.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from .check import Problem, problems_error
from .labels import read_label_png
from .voc import read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNTAGGED = ("refuse", "background")

TAGS_LAYOUT = """expected (data.kind tags), per split under data.tags, paths relative to data.root:
  data.tags.<split>.images   folder of the split's images (.jpg, .png, ...)
  data.tags.<split>.tags     tags.csv (image,labels — labels separated by ';') or tags.jsonl
                             ({"image": ..., "labels": [...]}); leave it out for one sub-folder per class
  data.tags.<split>.masks    optional: <id>.png masks (VOC palette or grayscale class ids) for evaluation"""


@dataclass(frozen=True)
class Row:
    """One tagged image as the tags file states it: where (file and line), which image, which raw labels."""

    where: str
    image: str
    labels: tuple[str, ...]


def image_id(relative: str) -> str:
    """``a/b.jpg`` -> ``a_b``: an id that names one file (seeds are saved as ``<id>.png``)."""
    path = Path(relative)
    return "_".join([*path.parent.parts, path.stem])


def _split_labels(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(";") if part.strip())


def read_csv_rows(path: Path) -> tuple[list[Row], list[Problem]]:
    """Rows of a ``image,labels`` CSV (header optional, BOM tolerated); malformed lines as problems."""
    rows, problems = [], []
    text = path.read_text(encoding="utf-8-sig")
    for n, fields in enumerate(csv.reader(io.StringIO(text)), 1):
        if not fields or not any(f.strip() for f in fields):
            continue
        if n == 1 and fields[0].strip().lower() in ("image", "file", "filename") and len(fields) <= 2:
            continue  # the header
        if len(fields) > 2:
            problems.append(Problem(f"{path}:{n}", f"{len(fields)} fields; expected 2 (image,labels) — quote a "
                                                   f"label list holding commas, or separate labels with ';'"))
            continue
        rows.append(Row(f"{path}:{n}", fields[0].strip(), _split_labels(fields[1] if len(fields) > 1 else "")))
    return rows, problems


def read_jsonl_rows(path: Path) -> tuple[list[Row], list[Problem]]:
    """Rows of a JSON Lines tags file (``{"image": str, "labels": [str, ...]}`` per line)."""
    rows, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(where, f"not JSON ({exc.msg}); expected {{\"image\": ..., \"labels\": [...]}}"))
            continue
        labels = obj.get("labels") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not (
                isinstance(labels, list) and all(isinstance(v, str) for v in labels)):
            problems.append(Problem(where, "expected an object with \"image\" (a path) and \"labels\" (a list of "
                                           "class names)"))
            continue
        rows.append(Row(where, obj["image"].strip(), tuple(v for v in labels if v.strip())))
    return rows, problems


def class_folder_rows(images: Path) -> tuple[list[Row], list[Problem]]:
    """One row per image of ``images/<class>/``, tagged with the folder's name."""
    rows, problems = [], []
    folders = sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        problems.append(Problem(str(images), "no tags file and no class sub-folders; expected one sub-folder per "
                                             "class (or data.tags.<split>.tags)"))
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                rows.append(Row(str(f), f"{folder.name}/{f.name}", (folder.name,)))
    return rows, problems


def read_rows(images: Path, tags: Path | None) -> tuple[list[Row], list[Problem]]:
    """The rows of a split from its tags file (by suffix) or, without one, from its class folders."""
    if tags is None:
        return class_folder_rows(images)
    if not tags.is_file():
        return [], [Problem(str(tags), "tags file does not exist")]
    if tags.suffix.lower() == ".csv":
        return read_csv_rows(tags)
    if tags.suffix.lower() in (".jsonl", ".ndjson"):
        return read_jsonl_rows(tags)
    return [], [Problem(str(tags), "unknown tags format; expected a .csv (image,labels) or .jsonl file")]


def normalise(label: str) -> str:
    return " ".join(label.split()).casefold()


def names_from_rows(rows: Iterable[Row]) -> list[str]:
    """The class list the tags imply: each distinct label (case and spaces normalised), its first spelling,
    sorted case-insensitively."""
    first: dict[str, str] = {}
    for row in rows:
        for label in row.labels:
            first.setdefault(normalise(label), " ".join(label.split()))
    return [first[k] for k in sorted(first)]


def resolve_rows(rows: Sequence[Row], class_names: Sequence[str], images: Path, untagged: str
                 ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], list[Problem]]:
    """{image path: (where, label ids)} of the rows, and every problem: unknown classes (with the closest known
    names), missing images, untagged images (``untagged``), repeated rows that disagree, normalised spellings."""
    lookup = {normalise(n): i + 1 for i, n in enumerate(class_names)}
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    problems: list[Problem] = []
    for row in rows:
        ids, bad = [], False
        for label in row.labels:
            key = normalise(label)
            if key not in lookup:
                close = difflib.get_close_matches(key, list(lookup), n=3, cutoff=0.5)
                hint = f"; closest known: {', '.join(class_names[lookup[c] - 1] for c in close)}" if close else ""
                problems.append(Problem(row.where, f"unknown class {label.strip()!r} (classes: "
                                                   f"{', '.join(class_names[:8])}{', ...' if len(class_names) > 8 else ''}){hint}"))
                bad = True
                continue
            if label != class_names[lookup[key] - 1]:
                problems.append(Problem(row.where, f"label {label!r} read as {class_names[lookup[key] - 1]!r} "
                                                   f"(case / spaces normalised)", error=False))
            ids.append(lookup[key])
        if not (images / row.image).is_file():
            problems.append(Problem(row.where, f"image {images / row.image} does not exist"))
            bad = True
        if not row.labels:
            if untagged == "refuse":
                problems.append(Problem(row.where, f"image {row.image!r} has no tags; tag it, remove the row, or "
                                                   f"set data.untagged: background to keep it as background only"))
                bad = True
            else:
                problems.append(Problem(row.where, f"image {row.image!r} has no tags: kept as background only "
                                                   f"(data.untagged: background)", error=False))
        if bad:
            continue
        labels = tuple(sorted(set(ids)))
        if row.image in out:
            where, before = out[row.image]
            if before != labels:
                problems.append(Problem(row.where, f"image {row.image!r} repeated with other tags than at {where} "
                                                   f"({_names(labels, class_names)} vs {_names(before, class_names)})"))
            else:
                problems.append(Problem(row.where, f"image {row.image!r} repeats {where} with the same tags: read "
                                                   f"once", error=False))
            continue
        out[row.image] = (row.where, labels)
    return out, problems


def _names(ids: Sequence[int], class_names: Sequence[str]) -> list[str]:
    return [class_names[i - 1] for i in ids]


def split_paths(root: Path, split: str, spec: Mapping | None) -> tuple[Path, Path | None, Path | None]:
    """(images, tags or None, masks or None) of ``data.tags.<split>``."""
    if not spec or not spec.get("images"):
        raise FmalibError(f"params data.tags.{split}: no images folder for split {split!r}\n{TAGS_LAYOUT}")
    images = root / spec["images"]
    if not images.is_dir():
        raise FmalibError(f"params data.tags.{split}.images: folder {images} does not exist\n{TAGS_LAYOUT}")
    tags = root / spec["tags"] if spec.get("tags") else None
    masks = root / spec["masks"] if spec.get("masks") else None
    if masks is not None and not masks.is_dir():
        raise FmalibError(f"params data.tags.{split}.masks: folder {masks} does not exist\n{TAGS_LAYOUT}")
    return images, tags, masks


def tag_class_names(root: str | os.PathLike, tags: Mapping[str, Mapping]) -> list[str]:
    """The class list of a tags dataset without ``classes.names``: every split's labels, sorted."""
    rows: list[Row] = []
    for split, spec in tags.items():
        images, tags_file, _ = split_paths(Path(root), split, spec)
        rows += read_rows(images, tags_file)[0]
    names = names_from_rows(rows)
    if not names:
        raise FmalibError(f"tags dataset {root}: no labels in any split's tags; expected at least one class")
    return names


class TagsDataset:
    """One split of a tags dataset: ``ds[i] -> {id, image, labels, gt}`` (``gt`` None without masks).

    Images are listed in the tags file's order (class folders: sorted). ``problems`` holds every error and note
    found while reading; with ``strict`` the errors raise one FmalibError listing them all.
    """

    def __init__(self, root: str | os.PathLike, split: str, spec: Mapping, class_names: Sequence[str],
                 untagged: str = "refuse", strict: bool = True):
        if untagged not in UNTAGGED:
            raise FmalibError(f"data.untagged={untagged!r}; expected one of {UNTAGGED}")
        self.root, self.split = Path(root), split
        self.class_names = tuple(class_names)
        self.image_dir, self.ann_file, self.mask_dir = split_paths(self.root, split, spec)
        rows, self.problems = read_rows(self.image_dir, self.ann_file)
        resolved, problems = resolve_rows(rows, self.class_names, self.image_dir, untagged)
        self.problems += problems
        self._files = list(resolved)
        self._labels = [np.array(labels, np.int64) for _, labels in resolved.values()]
        self.ids = [image_id(f) for f in self._files]
        seen: dict[str, str] = {}
        for f, i in zip(self._files, self.ids):
            if i in seen:
                self.problems.append(Problem(str(self.image_dir / f), f"its id {i!r} equals that of {seen[i]}; "
                                                                      f"rename one (ids name the seed files)"))
            seen.setdefault(i, f)
        listed = {str((self.image_dir / r.image).resolve()) for r in rows}
        unlisted = [p for p in sorted(self.image_dir.rglob("*")) if p.is_file() and p.suffix.lower() in
                    IMAGE_SUFFIXES and not p.name.startswith(".") and str(p.resolve()) not in listed]
        if unlisted and self.ann_file is not None:
            self.problems.append(Problem(str(self.image_dir), f"{len(unlisted)} image(s) have no row in "
                                                              f"{self.ann_file.name} and are not used (e.g. "
                                                              f"{unlisted[0].name})", error=False))
        if not self.ids and not any(p.error for p in self.problems):
            self.problems.append(Problem(str(self.ann_file or self.image_dir), "no tagged image"))
        error = problems_error(self.problems, f"tags split {split!r} ({self.ann_file or self.image_dir})")
        if strict and error is not None:
            raise error

    @property
    def has_masks(self) -> bool:
        return self.mask_dir is not None

    def data_folders(self) -> list[Path]:
        return [self.image_dir, *([self.mask_dir] if self.mask_dir else [])]

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.image_dir / self._files[i]

    def gt_path(self, i: int) -> Path:
        if self.mask_dir is None:
            raise FmalibError(f"tags split {self.split!r} has no masks (params data.tags.{self.split}.masks): "
                              f"nothing to evaluate against; its diagnostics are GT-free")
        path = self.mask_dir / f"{self.ids[i]}.png"
        if not path.is_file():
            raise FmalibError(f"mask {path} not found for image {self.ids[i]!r} of tags split {self.split!r}")
        return path

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def load_gt(self, i: int) -> np.ndarray:
        gt = read_label_png(self.gt_path(i))
        bad = sorted(int(v) for v in np.unique(gt) if len(self.class_names) < v < IGNORE)
        if bad:
            raise FmalibError(f"mask {self.gt_path(i)} holds class ids {bad} outside 1..{len(self.class_names)} "
                              f"(255 = ignore)")
        return gt

    def image_labels(self, i: int) -> np.ndarray:
        """The image's class ids (1..C, sorted) from its tags."""
        return self._labels[i]

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        image = self.load_image(i)
        gt = self.load_gt(i) if self.has_masks else None
        if gt is not None and gt.shape != image.shape[:2]:
            raise FmalibError(f"image {self.image_path(i)} is {image.shape[:2]} but its mask {self.gt_path(i)} is "
                              f"{gt.shape}; expected equal sizes")
        return {"id": self.ids[i], "image": image, "labels": self.image_labels(i), "gt": gt}

    def __repr__(self) -> str:
        masks = "with masks" if self.has_masks else "no masks"
        return f"TagsDataset({self.split!r}, {len(self)} images, {len(self.class_names)} classes, {masks})"
