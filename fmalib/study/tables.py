"""Tables the notebooks show about cached stages (DataFrames)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.cache import StageCache
from ..method.generator import MultiLevelMaskGenerator
from ..method.masks import LEVELS
from ..method.metrics import region_recall
from ..method.overlap import overlap_filter
from ..models.checkpoints import load_sam_from_params
from ..stages.mask_generators import mask_arguments
from ..stages.masks import load_masks


def mask_table(cache: StageCache, dataset, limit: int | None = None):
    """Per image: masks per level and GT-region recall at IoU 0.5 (a DataFrame)."""
    rows = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for j in tqdm(range(n), desc="mask stats", leave=False):
        image_id = dataset.ids[j]
        ms = load_masks(cache, image_id)
        counts = np.bincount(ms.levels, minlength=3)[:3]
        row = {"id": image_id, **{name: int(c) for name, c in zip(LEVELS, counts)}, "masks": len(ms),
               "cache_bytes": cache.path(image_id).stat().st_size}
        gt = dataset.load_gt(j) if hasattr(dataset, "load_gt") else None
        if gt is not None:
            row["regions_matched"], row["regions"] = region_recall(ms, gt)
        rows.append(row)
    return pd.DataFrame(rows)


def filter_effect(params, images: Sequence[np.ndarray], model=None):
    """Masks per level before and after the overlap filter on a few images (recomputes SAM on them)."""
    generator = MultiLevelMaskGenerator(model if model is not None else load_sam_from_params(params),
                                        **mask_arguments(params))
    rows = []
    for i, image in enumerate(tqdm(images, desc="overlap filter effect", leave=False)):
        raw = generator.generate_unfiltered(image)
        keep = overlap_filter(raw.rles(), raw.levels, generator.overlap_thresh)
        for stage, levels in (("before", raw.levels), ("after", raw.levels[keep])):
            counts = np.bincount(levels, minlength=3)[:3]
            rows.append({"image": i, "filter": stage, **{n: int(c) for n, c in zip(LEVELS, counts)}})
    return pd.DataFrame(rows)
