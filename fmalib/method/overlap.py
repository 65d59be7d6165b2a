"""The overlap filter (the original's ``rock_sand_water``; docs/method.md §5), level by level, each level as one batch:
every whole mask is kept; all part masks are then tested at once against the kept wholes, and all subpart
masks against the wholes + kept parts; a candidate stays if the largest fraction of it covered by any single
kept mask, |m ∩ k| / |m|, is below ``overlap_thresh`` (0.3). Masks of one level are never tested against
each other, so two overlapping parts can both stay."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..core.errors import FmalibError
from .masks import WHOLE


def overlap_filter(rles: Sequence[Mapping[str, Any]], levels: np.ndarray, thresh: float) -> np.ndarray:
    """Indices (ascending) of the masks kept by the level-by-level overlap filter (module doc, docs/method.md §5).

    ``rles``: pycocotools RLE dicts of the image's (non-empty) masks; ``levels`` (N,) 0/1/2. Every whole is
    kept; then the parts, as one batch, are kept where max over kept k of |m ∩ k| / |m| < ``thresh``; then
    the subparts, as one batch, against wholes + kept parts. pycocotools' ``iou`` with every "ground truth"
    marked crowd computes exactly |dt ∩ gt| / |dt| (the candidate's own area)."""
    levels = np.asarray(levels)
    if len(levels) != len(rles):
        raise FmalibError(f"overlap_filter: {len(rles)} masks but {len(levels)} levels")
    kept = levels == WHOLE
    for level in (1, 0):
        cand = np.flatnonzero(levels == level)
        ref = np.flatnonzero(kept)
        if len(cand) == 0 or len(ref) == 0:  # nothing to be covered by: the whole level stays
            kept[cand] = True
            continue
        covered = np.asarray(mask_utils.iou([rles[i] for i in cand], [rles[i] for i in ref],
                                            [1] * len(ref))).reshape(len(cand), len(ref))
        kept[cand[covered.max(axis=1) < thresh]] = True  # decided together: parts never test parts
    return np.flatnonzero(kept)

