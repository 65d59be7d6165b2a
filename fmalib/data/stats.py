"""Dataset statistics for notebook 00: label counts, objects per image, class/background co-occurrence."""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.label_ids import IGNORE


def _gt(dataset, i: int) -> np.ndarray | None:
    return dataset.load_gt(i) if hasattr(dataset, "load_gt") else dataset[i]["gt"]


def label_statistics(dataset) -> pd.DataFrame:
    """Per class (background first): images containing it, their share, and its share of valid GT pixels
    (a split without masks: images from the tags, pixel shares NaN — background counts every image)."""
    n_cls = len(dataset.class_names)
    images = np.zeros(n_cls + 1, np.int64)
    pixels = np.zeros(n_cls + 1, np.int64)
    if not dataset.has_masks:
        for i in range(len(dataset)):
            images[np.asarray(dataset.image_labels(i), int)] += 1
        images[0] = len(dataset)
        return pd.DataFrame({"images": images, "image_share": images / max(len(dataset), 1),
                             "pixel_share": np.nan},
                            index=pd.Index(("background",) + tuple(dataset.class_names), name="class"))
    for i in tqdm(range(len(dataset)), desc="label statistics"):
        gt = _gt(dataset, i)
        counts = np.bincount(gt[gt != IGNORE].ravel(), minlength=n_cls + 1)[: n_cls + 1]
        pixels += counts
        images += counts > 0
    return pd.DataFrame({"images": images, "image_share": images / max(len(dataset), 1),
                         "pixel_share": pixels / max(pixels.sum(), 1)},
                        index=pd.Index(("background",) + tuple(dataset.class_names), name="class"))


def labels_per_image(dataset) -> pd.Series:
    """How many images carry 1, 2, ... foreground labels."""
    n = Counter(len(dataset.image_labels(i)) if hasattr(dataset, "image_labels") else len(dataset[i]["labels"])
                for i in range(len(dataset)))
    return pd.Series(dict(sorted(n.items())), name="images").rename_axis("labels per image")


def _images(annotations: dict, split: str | None) -> Iterable[dict]:
    return (a for a in annotations["images"].values() if split is None or a["split"] == split)


def objects_per_image(annotations: dict, split: str | None = None) -> pd.Series:
    """Synthetic benchmark: how many images hold 1, 2, 3 ... object instances."""
    n = Counter(len(a["instances"]) for a in _images(annotations, split))
    return pd.Series(dict(sorted(n.items())), name="images").rename_axis("objects per image")


def cooccurrence_table(annotations: dict, split: str | None = None) -> pd.DataFrame:
    """Synthetic benchmark: P(stuff in image | class in image), one row per class, plus its image count.

    Each class has one favourite stuff (boat-water, kite-sky, car-road, ...): that column stands out.
    """
    classes, stuffs = annotations["class_names"], annotations["stuff_names"]
    counts = pd.DataFrame(0, index=pd.Index(classes, name="class"), columns=stuffs, dtype=np.int64)
    n_img = pd.Series(0, index=counts.index, dtype=np.int64)
    for a in _images(annotations, split):
        present = {s["name"] for s in a["stuff"]}
        for c in a["labels"]:
            n_img.iloc[c - 1] += 1
            for s in present:
                counts.loc[classes[c - 1], s] += 1
    table = counts.div(n_img.clip(lower=1), axis=0)
    table["images"] = n_img
    return table


def class_cooccurrence(dataset) -> pd.DataFrame:
    """Any dataset: images in which both classes appear (diagonal: images with the class)."""
    n = len(dataset.class_names)
    m = np.zeros((n, n), np.int64)
    for i in range(len(dataset)):
        labs = dataset.image_labels(i) if hasattr(dataset, "image_labels") else dataset[i]["labels"]
        idx = np.asarray(labs, int) - 1
        m[np.ix_(idx, idx)] += 1
    return pd.DataFrame(m, index=dataset.class_names, columns=dataset.class_names)
