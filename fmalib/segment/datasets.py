"""Stage-2 data for Detectron2: pseudo-label and ground-truth sets as registered datasets, and the mapper.

A registered set is a list of records ``{file_name, sem_seg_file_name, image_id}`` in
``DatasetCatalog`` plus ``MetadataCatalog`` entries (``stuff_classes`` with background first,
``stuff_colors`` from the VOC palette, ``ignore_label=255``, ``evaluator_type="sem_seg"``), which is what
Detectron2's ``SemSegEvaluator`` reads. Labels are palette PNGs of class ids; fmalib reads them itself,
because Detectron2's ``DatasetMapper`` converts label PNGs to luminance ("L"), which turns palette indices
into colour brightness.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.cache import stable_hash
from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from ..data import open_dataset, with_classes
from ..data.labels import VOC_PALETTE, read_label_png, write_label_png
from ..data.voc import read_image
from .compat import ensure_detectron2

log = logging.getLogger(__name__)



def class_names_with_background(params) -> list[str]:
    return ["background", *with_classes(params)["classes"]["names"]]


def semseg_records(image_paths: Sequence[Path], label_paths: Sequence[Path], ids: Sequence[str]) -> list[dict]:
    """Detectron2 records for images and their label PNGs (every label file must exist)."""
    missing = [str(p) for p in label_paths if not Path(p).is_file()]
    if missing:
        raise FmalibError(f"{len(missing)} of {len(label_paths)} label PNGs are missing, e.g. {missing[0]} "
                          f"(expected one palette PNG of class ids per image id)")
    return [{"file_name": str(img), "sem_seg_file_name": str(lab), "image_id": i}
            for img, lab, i in zip(image_paths, label_paths, ids)]


def register_semseg(name: str, records: list[dict], class_names: Sequence[str], **extra_metadata) -> str:
    """Register ``records`` under ``name`` (replacing an earlier registration of that name); returns name."""
    ensure_detectron2()
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    frozen = copy.deepcopy(records)
    DatasetCatalog.register(name, lambda: copy.deepcopy(frozen))
    palette = np.array(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)
    MetadataCatalog.get(name).set(
        stuff_classes=list(class_names),
        stuff_colors=[tuple(int(c) for c in palette[k]) for k in range(len(class_names))],
        ignore_label=IGNORE,
        evaluator_type="sem_seg",
        **extra_metadata,
    )
    return name


def _gt_label_paths(params, ds, split: str) -> list[Path]:
    """The ground-truth PNG of every image; datasets without PNGs (COCO) get theirs rendered once."""
    if hasattr(ds, "gt_path"):
        return [ds.gt_path(i) for i in range(len(ds))]
    out = params.resolve_path("workdir") / "stage2" / "gt_png" / f"{params['data']['kind']}_{split}"
    paths = [out / f"{i}.png" for i in ds.ids]
    todo = [k for k, p in enumerate(paths) if not p.is_file()]
    if todo:
        log.info("rendering %d ground-truth PNGs of %s into %s", len(todo), split, out)
        for k in tqdm(todo, desc=f"gt PNGs {split}"):
            write_label_png(paths[k], ds.load_gt(k))
    return paths


def register_gt(params, split: str | None = None) -> str:
    """Register the ground-truth set of ``split`` (default: the val split); returns the dataset name."""

    split = split or params["data"]["val_split"]
    ds = open_dataset(params, split)
    records = semseg_records([ds.image_path(i) for i in range(len(ds))], _gt_label_paths(params, ds, split), ds.ids)
    return register_semseg(f"fmalib_{params['name']}_{split}_gt", records, class_names_with_background(params),
                           label_dir="ground truth")


def register_pseudo(params, label_dir: str | os.PathLike, split: str | None = None) -> str:
    """Register ``label_dir/<id>.png`` for every image of ``split`` (default: train); returns the name."""

    label_dir = Path(label_dir).resolve()
    if not label_dir.is_dir():
        raise FmalibError(f"pseudo-label folder {label_dir} does not exist (expected <id>.png per training image)")
    split = split or params["data"]["train_split"]
    ds = open_dataset(params, split)
    records = semseg_records([ds.image_path(i) for i in range(len(ds))],
                             [label_dir / f"{i}.png" for i in ds.ids], ds.ids)
    name = f"fmalib_{params['name']}_{split}_labels_{stable_hash(str(label_dir), 8)}"
    return register_semseg(name, records, class_names_with_background(params), label_dir=str(label_dir))


def _pad_to_crop(crop: int):
    """``T.FixedSizeCrop`` padding to ``crop`` x ``crop`` at the bottom/right: image 0, label 255 (ignore)."""
    from detectron2.data import transforms as T

    if "seg_pad_value" in inspect.signature(T.FixedSizeCrop).parameters:  # Detectron2 after 0.6
        return T.FixedSizeCrop((crop, crop), pad=True, pad_value=0, seg_pad_value=IGNORE)

    class FixedSizeCropIgnorePad(T.FixedSizeCrop):
        # own: Detectron2 0.6's FixedSizeCrop has no seg_pad_value and pads labels with 0 (= background)
        def _get_pad(self, image):
            pad = super()._get_pad(image)
            pad.seg_pad_value = IGNORE
            return pad

    return FixedSizeCropIgnorePad((crop, crop), pad=True, pad_value=0)


def train_augmentations(height: int, width: int, scale_range: Sequence[float], crop: int, flip: bool):
    """The training augmentation of an ``height`` x ``width`` image, as a Detectron2 ``AugmentationList``.

    Rescale by s ~ U(scale_range) of the image's own size, a random ``crop`` x ``crop`` window (padded at the
    bottom/right with image 0, label 255 where the rescaled image is smaller; ``crop`` 0: no crop), horizontal
    flip with p = 0.5. Apply it to ``T.AugInput(image, sem_seg=label)``: labels follow the image (nearest).
    Draws from NumPy's global RNG, which Detectron2 seeds per data-loader worker.
    """
    ensure_detectron2()
    from detectron2.data import transforms as T

    # target = the image's own size makes ResizeScale's factor exactly s (DeepLab's jitter of the image itself)
    augs = [T.ResizeScale(float(scale_range[0]), float(scale_range[1]), height, width)]
    if crop > 0:
        # RandomCrop draws y and x offsets independently; FixedSizeCrop's one draw for both would tie them to
        # the diagonal, so here it only pads (its crop is a no-op on an image no larger than the crop)
        augs += [T.RandomCrop("absolute", (crop, crop)), _pad_to_crop(crop)]
    if flip:
        augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    return T.AugmentationList(augs)


def augment(image: np.ndarray, label: np.ndarray, scale_range: Sequence[float], crop: int,
            flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`train_augmentations` applied to an RGB uint8 image and its uint8 label map of the same size."""
    ensure_detectron2()
    from detectron2.data import transforms as T

    aug_input = T.AugInput(image, sem_seg=label)
    train_augmentations(*label.shape, scale_range, crop, flip)(aug_input)
    return np.ascontiguousarray(aug_input.image), np.ascontiguousarray(aug_input.sem_seg)


class SemSegMapper:
    """Record -> model input ``{image (3,H,W) uint8 in the model's channel order, height, width[, sem_seg]}``.

    Training (``is_train``): reads the label PNG and applies :func:`train_augmentations` (Detectron2's
    transforms, drawing from NumPy's global RNG, which Detectron2 seeds per data-loader worker). Testing: the
    image at its own size; evaluation reads the labels from the files itself.
    """

    def __init__(self, is_train: bool, input_format: str = "RGB", scale_range: Sequence[float] = (1.0, 1.0),
                 crop: int = 0, flip: bool = False):
        self.is_train = is_train
        self.input_format = input_format
        self.scale_range = tuple(scale_range)
        self.crop = crop
        self.flip = flip

    @classmethod
    def from_config(cls, cfg, is_train: bool) -> "SemSegMapper":
        f = cfg.FMALIB
        return cls(is_train, cfg.INPUT.FORMAT, f.SCALE_RANGE, f.CROP_SIZE, f.FLIP)

    def __call__(self, record: dict) -> dict:

        out = dict(record)
        image = read_image(Path(record["file_name"]))
        out["height"], out["width"] = image.shape[:2]
        if self.is_train:
            # own reader: Detectron2's DatasetMapper reads label PNGs as "L", which turns palette ids into brightness
            label = read_label_png(record["sem_seg_file_name"])
            if label.shape != image.shape[:2]:
                raise FmalibError(f"label {record['sem_seg_file_name']} is {label.shape} but image "
                                  f"{record['file_name']} is {image.shape[:2]}; expected equal sizes")
            image, label = augment(image, label, self.scale_range, self.crop, self.flip)
            out["sem_seg"] = torch.as_tensor(label.astype(np.int64))
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return out
