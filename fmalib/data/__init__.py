"""Datasets: the embedded synthetic benchmark, PASCAL VOC 2012 (+SBD), COCO 2014, photos with tags only — one
item format.

``ds[i] -> {"id": str, "image": uint8 (H, W, 3), "labels": int64 fg ids (1..C), "gt": uint8 (H, W) or None}``;
``ds.ids``, ``ds.class_names`` (fg only, id = index + 1), ``ds.has_masks`` (False: ``gt`` is None, no mIoU),
``len(ds)``.
"""
from __future__ import annotations

import logging

from ..core.errors import FmalibError
from ..core.params import load_params
from .coco import COCODataset
from .synthetic import CLASS_NAMES, write_benchmark
from .tags import TagsDataset, tag_class_names
from .voc import VOC_CLASSES, VOCDataset

log = logging.getLogger(__name__)

KINDS = ("synthetic", "voc", "coco", "tags")


def open_dataset(params, split: str, strict: bool = True):
    """The dataset of ``params.data`` for ``split`` (e.g. ``params.data.train_split``).

    synthetic: writes the benchmark to ``data.root`` once (skipped when already there with the same
    settings) and reads it through the VOC loader; voc: ``VOCDataset`` (train / train_aug / val) of any
    VOC-layout dataset, its classes ``classes.names`` (mask ids 1..C, 255 ignore); coco: ``COCODataset``
    (train / val), ``classes.names`` must be the annotation file's categories; tags: ``TagsDataset`` of
    ``data.tags.<split>`` (images + tags, masks optional), its classes ``classes.names`` or, when absent, the tags'.
    ``strict`` False (tags only) keeps the problems found in ``ds.problems`` instead of raising them.
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
    if kind == "tags":
        tags = data["tags"]
        if split not in tags:
            raise FmalibError(f"params data.tags in {getattr(params, 'path', None)} has no split {split!r} "
                              f"(given: {', '.join(tags) or 'none'}); expected data.tags.{split}: {{images: ..., "
                              f"tags: ...}}")
        names = params["classes"]["names"] or derived_class_names(params)
        return TagsDataset(root, split, tags[split], names, data["untagged"], strict=strict)
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


def derived_class_names(params) -> list[str]:
    """A tags dataset's classes when ``classes.names`` is left out: the tags' names, sorted (logged)."""
    tags = params["data"]["tags"]
    with_masks = [s for s, spec in tags.items() if spec.get("masks")]
    if with_masks:  # a mask's ids mean classes in an order the tags alone cannot give
        raise FmalibError(f"params data.tags.{with_masks[0]}.masks is set but classes.names is not in "
                          f"{getattr(params, 'path', None)}; expected classes.names in the order of the masks' "
                          f"class ids (1..C)")
    names = tag_class_names(params.resolve_path("data.root"), tags)
    log.info("classes from the tags (classes.names not given), sorted: %s", ", ".join(names))
    return names


def with_classes(params):
    """``params`` with ``classes.names`` (and synonyms) stated: unchanged unless a tags dataset leaves them out,
    then the tags' class names, sorted (what ``fmalib.study.setup`` loads, so every cache key names the classes)."""
    if params["classes"]["names"] is not None:
        return params
    out = load_params(params.to_dict(), {"classes.names": derived_class_names(params)})
    out.path = params.path
    return out
