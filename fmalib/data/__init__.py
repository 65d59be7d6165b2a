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
    settings) and reads it through the VOC loader; voc: ``VOCDataset`` (train / train_aug / val) of any
    VOC-layout dataset, its classes ``classes.names`` (mask ids 1..C, 255 ignore); coco: ``COCODataset``
    (train / val), ``classes.names`` must be the annotation file's categories.
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
    if kind == "voc":  # any VOC-layout dataset: its classes are classes.names, ids 1..C (VOC's 20 in voc.yaml)
        return VOCDataset(root, split, list(params.get("classes", {}).get("names", VOC_CLASSES)))
    ds = COCODataset(root, split)
    # COCO's classes come from its annotation file; prompts are built from classes.names: the same list
    names = list(params.get("classes", {}).get("names", ds.class_names))
    if names != list(ds.class_names):
        raise FmalibError(f"params classes.names in {getattr(params, 'path', None)} ({len(names)} names) must "
                          f"match the annotation file's {len(ds.class_names)} categories in category-id order "
                          f"({ds.ann_file}): first difference "
                          f"{next(((a, b) for a, b in zip(names, ds.class_names) if a != b), 'in length')}")
    return ds
