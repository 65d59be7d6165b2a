"""COCO 2014 instance annotations as WSSS data: 80 classes -> ids 1..80, semantic maps painted from instances.

Semantic map: non-crowd instances painted largest first, so a smaller object lying on a larger one (a cup
on a table) stays visible; pixels only a crowd region covers become 255 (ignore). Image-level labels are
the categories of the non-crowd instances. Images without any non-crowd instance are left out unless
``include_empty`` (the usual WSSS lists: 82,081 train / 40,137 val).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from .voc import read_image

COCO_LAYOUT = """expected layout (COCO 2014):
  <root>/annotations/instances_train2014.json
  <root>/annotations/instances_val2014.json
  <root>/train2014/COCO_train2014_<12 digits>.jpg
  <root>/val2014/COCO_val2014_<12 digits>.jpg"""


def _layout_error(what: str) -> FmalibError:
    return FmalibError(f"{what}\n{COCO_LAYOUT}")


class COCODataset:
    """One split of COCO 2014: ``ds[i] -> {id, image, labels, gt}`` with ids 1..80 in category-id order.

    ``ann_file`` / ``image_dir`` override the standard paths (any COCO-format instances file works, e.g.
    the synthetic benchmark's ``annotations/instances_val.json`` with ``image_dir=root/JPEGImages``).
    """

    def __init__(self, root: str | os.PathLike, split: str, ann_file: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None, include_empty: bool = False):

        self.root = Path(root)
        self.split = split
        year = split if split.endswith("2014") else f"{split}2014"
        if ann_file is None and year not in ("train2014", "val2014"):
            raise FmalibError(f"COCO split {split!r} unknown; expected 'train' or 'val'")
        if not self.root.is_dir():
            raise _layout_error(f"COCO root {self.root} does not exist")
        self.ann_file = Path(ann_file) if ann_file else self.root / "annotations" / f"instances_{year}.json"
        self.image_dir = Path(image_dir) if image_dir else self.root / year
        if not self.ann_file.is_file():
            raise _layout_error(f"annotation file {self.ann_file} does not exist")
        if not self.image_dir.is_dir():
            raise _layout_error(f"image folder {self.image_dir} does not exist")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(str(self.ann_file))
        except Exception as exc:
            raise FmalibError(f"{self.ann_file} is not a COCO instances file ({exc})") from exc
        cats = sorted(self.coco.loadCats(self.coco.getCatIds()), key=lambda c: c["id"])
        self.class_names = tuple(c["name"] for c in cats)
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self._image_ids = []
        for img_id in sorted(self.coco.getImgIds()):
            if include_empty or self._anns(img_id, crowd=False):
                self._image_ids.append(img_id)
        self.ids = [Path(self.coco.imgs[k]["file_name"]).stem for k in self._image_ids]

    def _anns(self, img_id: int, crowd: bool | None = None) -> list[dict]:
        anns = self.coco.imgToAnns.get(img_id, [])
        return [a for a in anns if crowd is None or bool(a.get("iscrowd", 0)) == crowd]

    has_masks = True  # instance masks, painted into semantic maps

    def data_folders(self) -> list[Path]:
        """The folders this split reads: its images (the annotations are one file)."""
        return [self.image_dir]

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        p = self.image_dir / self.coco.imgs[self._image_ids[i]]["file_name"]
        if not p.is_file():
            raise _layout_error(f"image {p} listed in {self.ann_file} does not exist")
        return p

    def load_image(self, i: int) -> np.ndarray:
        return read_image(self.image_path(i))

    def image_labels(self, i: int) -> np.ndarray:
        """Label ids (1..80) of the image's non-crowd instances, sorted (no pixels decoded)."""
        cats = {self.cat_to_label[a["category_id"]] for a in self._anns(self._image_ids[i], crowd=False)}
        return np.array(sorted(cats), np.int64)

    def load_gt(self, i: int) -> np.ndarray:
        info = self.coco.imgs[self._image_ids[i]]
        gt = np.zeros((info["height"], info["width"]), np.uint8)
        anns = self._anns(self._image_ids[i])
        for a in sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"]):
            gt[self.coco.annToMask(a).astype(bool)] = self.cat_to_label[a["category_id"]]
        for a in anns:
            if a.get("iscrowd", 0):
                gt[self.coco.annToMask(a).astype(bool) & (gt == 0)] = IGNORE
        return gt

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        image = self.load_image(i)
        if image.shape[:2] != self.image_size(i):
            raise FmalibError(f"image {self.image_path(i)} is {image.shape[:2]} but {self.ann_file} gives it "
                              f"height x width {self.image_size(i)}; expected equal sizes")
        return {"id": self.ids[i], "image": image, "labels": self.image_labels(i), "gt": self.load_gt(i)}

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i as the annotation file gives it (the size of its ``load_gt`` map)."""
        info = self.coco.imgs[self._image_ids[i]]
        return int(info["height"]), int(info["width"])

    def __repr__(self) -> str:
        return f"COCODataset({str(self.ann_file)!r}, {len(self)} images, {len(self.class_names)} classes)"
