"""Datasets: the embedded synthetic benchmark, PASCAL VOC 2012 (+SBD), COCO 2014 — one item format.

``ds[i] -> {"id": str, "image": uint8 (H, W, 3), "labels": int64 fg ids (1..C), "gt": uint8 (H, W) or None}``;
``ds.ids``, ``ds.class_names`` (fg only, id = index + 1), ``len(ds)``.
"""
from __future__ import annotations

import logging

from ..core.errors import FmalibError
from .coco import COCODataset
from .synthetic import CLASS_NAMES, write_benchmark
from .voc import VOC_CLASSES, VOCDataset

log = logging.getLogger(__name__)

KINDS = ("synthetic", "voc", "coco")


def open_dataset(params, split: str):
    """The dataset of ``params.data`` for ``split`` (e.g. ``params.data.train_split``).

    synthetic: writes the benchmark to ``data.root`` once (skipped when already there with the same
    settings) and reads it through the VOC loader; voc: ``VOCDataset`` (train / train_aug / val);
    coco: ``COCODataset`` (train / val).
    """

    data = params["data"]
    kind = data["kind"]
    if kind not in KINDS:
        raise FmalibError(f"params data.kind={kind!r} in {getattr(params, 'path', None)}; expected one of {KINDS}")
    root = params.resolve_path("data.root")
    if kind == "synthetic":
        syn = data["synthetic"]
        names = list(params.get("classes", {}).get("names", CLASS_NAMES))
        if names != list(CLASS_NAMES):
            raise FmalibError(f"params classes.names={names} in {getattr(params, 'path', None)} must equal the "
                              f"synthetic benchmark's classes {list(CLASS_NAMES)} (ids 1..{len(CLASS_NAMES)})")
        write_benchmark(root, syn["n_train"], syn["n_val"], syn["seed"], (syn["size_min"], syn["size_max"]))
        return VOCDataset(root, split, CLASS_NAMES)
    if kind == "voc":
        ds = VOCDataset(root, split, VOC_CLASSES)
    else:

        ds = COCODataset(root, split)
    # prompts are built from classes.names and labels from the dataset's ids: they must be the same list
    names = list(params.get("classes", {}).get("names", ds.class_names))
    if names != list(ds.class_names):
        source = getattr(ds, "ann_file", None) or f"fmalib.data.voc.VOC_CLASSES"
        raise FmalibError(f"params classes.names in {getattr(params, 'path', None)} ({len(names)} names) differ "
                          f"from the dataset's classes ({len(ds.class_names)}, from {source}): first difference "
                          f"{next(((a, b) for a, b in zip(names, ds.class_names) if a != b), 'in length')}")
    return ds
