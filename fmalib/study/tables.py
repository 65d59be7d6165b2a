"""Tables the notebooks show (DataFrames): cached stages, and the committed benchmark of the tiny CLIP."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.cache import StageCache
from ..core.params import repo_root
from ..method.generator import MultiLevelMaskGenerator
from ..method.masks import LEVELS
from ..method.metrics import region_recall
from ..method.overlap import overlap_filter
from ..models.checkpoints import load_sam_from_params
from ..stages.mask_generators import mask_arguments
from ..stages.masks import load_masks


def mask_table(cache: StageCache, dataset, limit: int | None = None):
    """Per image: masks per level and, where the split has masks, GT-region recall at IoU 0.5 (a DataFrame)."""
    rows = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for j in tqdm(range(n), desc="mask stats", leave=False):
        image_id = dataset.ids[j]
        ms = load_masks(cache, image_id)
        counts = np.bincount(ms.levels, minlength=3)[:3]
        row = {"id": image_id, **{name: int(c) for name, c in zip(LEVELS, counts)}, "masks": len(ms),
               "cache_bytes": cache.path(image_id).stat().st_size}
        gt = dataset.load_gt(j) if dataset.has_masks else None
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


def clip_bench_table() -> pd.DataFrame:
    """The pretrained CLIPs' measurements before any prompt learning (``bench/foundation.py`` →
    reports/bench/foundation.json): zero-shot mAP, hand-prompt CAM peak inside the object, and hand-prompt
    CAM-argmax seeds without / with CAA, at both Grad-CAM targets; one row per CLIP."""
    bench = json.loads((repo_root() / "reports/bench/foundation.json").read_text())
    cols = {"vision_layers": "blocks", "zero_shot_map": "zero-shot mAP",
            "cam_hit_rate_ln1_out": "CAM peak in object (ln1_out)",
            "hand_seed_miou_ln1_out": "seeds mIoU (ln1_out)", "hand_seed_miou_ln1_out_caa": "seeds mIoU (ln1_out, CAA)",
            "cam_hit_rate_block_input": "CAM peak in object (block_input)",
            "hand_seed_miou_block_input": "seeds mIoU (block_input)",
            "hand_seed_miou_block_input_caa": "seeds mIoU (block_input, CAA)"}
    rows = {name: {label: clip[key] for key, label in cols.items()} for name, clip in bench["clip"].items()}
    return pd.DataFrame(rows).T.rename(index={"params": "the study's CLIP"})


def argmax_miou(results: dict, kind: str, variant: str) -> float | None:
    """Val mIoU of one prompt set's CAM-argmax seeds (``argmax_seed_miou`` results by kind); None when the val
    split has no masks."""
    return results[kind][variant]["val_miou"] if results.get(kind) else None


def argmax_table(results: dict, best: bool = True) -> pd.DataFrame | str:
    """``argmax_seed_miou`` results by prompt kind as one row per (kind, CAA or not): the bg threshold, the
    split it was tuned on, train and val mIoU (and val's best over the grid); a sentence when no split has
    masks."""
    rows = {}
    for kind, res in results.items():
        for variant, r in (res or {}).items():
            rows[(kind, variant)] = {"bg threshold": r["bg_threshold"], "tuned on": r.get("tuned_on", "train"),
                                     "train mIoU": r["train_miou"], "val mIoU": r["val_miou"],
                                     **({"val mIoU, best threshold": r["val_best_miou"]} if best else {})}
    if not rows:
        return "the val split has no masks: the CAM-argmax baseline has no mIoU (and no threshold to tune)"
    return pd.DataFrame(rows).T.round(3)
