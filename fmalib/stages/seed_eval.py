"""Seeds against the ground truth: a seed folder's confusion matrix, and the sweep of SAMS's background power
(for the ablation only: the method chooses p without ground truth)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.labels import read_label_png
from ..method.metrics import ConfusionMeter
from ..method.sams import bg_power_sweep
from .masks import load_masks, mask_cache
from .seeds import cam_loader, prepare


def evaluate_seeds(dataset, seed_dir: str | Path, limit: int | None = None) -> np.ndarray:
    """Confusion matrix (K + 1, K + 1) of the seed PNGs against the split's ground truth."""
    seed_dir = Path(seed_dir)
    meter = ConfusionMeter(len(dataset.class_names) + 1)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for j in tqdm(range(n), desc="seeds vs GT", leave=False):
        path = seed_dir / f"{dataset.ids[j]}.png"
        if not path.is_file():
            raise FmalibError(f"seed map {path} missing for image {dataset.ids[j]!r}")
        meter.add(read_label_png(path), dataset.load_gt(j))
    return meter.matrix


def seed_power_sweep(params, split: str, cam_source, powers: Sequence[float] | None = None,
                     limit: int | None = None):
    """Seed mIoU against ground truth for every p (the ablation; ``make_seeds`` never uses it)."""
    dataset = open_dataset(params, split)
    masks_cache = mask_cache(params, split)
    load_cam, _ = cam_loader(params, cam_source)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images, gts = [], []
    for j in tqdm(range(n), desc="bg power sweep (GT)", leave=False):
        cams, labels = load_cam(dataset.ids[j])
        images.append(prepare(load_masks(masks_cache, dataset.ids[j]), cams, labels, params["sams"]["levels"]))
        gts.append(dataset.load_gt(j))
    return bg_power_sweep(images, gts, powers or params["sams"]["power_grid"], len(dataset.class_names) + 1)
