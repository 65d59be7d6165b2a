"""Quality of a SAM on the synthetic val split, through segment_anything's own predictor and generator.

- ``point_prompt_iou``: one positive point at each instance's centre (the pixel farthest from its border,
  the usual single-click protocol), SAM's three outputs; best-of-3, whole-level (output 2) and
  top-predicted-IoU mean IoU against the instance mask.
- ``iou_calibration``: points uniform over the image (where the automatic generator's grid lands);
  predicted IoU of every output vs its actual IoU with the point's best valid region (part or whole).
- ``amg_object_recall``: automatic mask generation; an instance is recovered when a kept mask overlaps it
  at IoU ≥ ``recall_iou``.
Notebook 01 and bench/foundation.py call these; ``sam_quality`` runs all three with foundation.sam.eval.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from ..core.errors import FmalibError
from ..core.params import Params
from ..data.synthetic import generate_sample, sample_ids, sample_size
from ..method.generator import MASK_KEYS, MultiLevelMaskGenerator
from .regions import region_maps

log = logging.getLogger(__name__)


def val_samples(params: Params, n: int, split: str = "val") -> list:
    """The first ``n`` samples of a split of the synthetic benchmark, exactly as write_benchmark draws them."""

    syn = params["data"]["synthetic"]
    size_range = (syn["size_min"], syn["size_max"])
    n = min(n, syn["n_val"] if split == "val" else syn["n_train"])
    return [generate_sample(syn["seed"], idx, sample_size(syn["seed"], idx, size_range))
            for _, idx in sample_ids(split, n)]


def center_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask pixel farthest from the background (first in raster order on ties)."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def predict_points(predictor: SamPredictor, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multimask masks (P, 3, H, W) bool and predicted IoUs (P, 3) for single positive points (x, y)."""
    coords = predictor.transform.apply_coords(xy.astype(np.float64), predictor.original_size)
    coords_t = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)[:, None, :]
    labels_t = torch.ones(len(xy), 1, dtype=torch.int, device=predictor.device)
    with torch.no_grad():
        masks, iou, _ = predictor.predict_torch(coords_t, labels_t, multimask_output=True)
    return masks.cpu().numpy(), iou.cpu().numpy()


def point_prompt_iou(model: Sam, samples: Sequence) -> dict:
    """Single centre point per instance: mean best-of-3, output-2 (whole) and top-scored IoU."""
    predictor = SamPredictor(model)
    best, whole, top = [], [], []
    for s in tqdm(samples, desc="SAM point-prompt IoU"):
        predictor.set_image(s.image)
        xy = np.array([center_point(inst.mask) for inst in s.instances])
        masks, scores = predict_points(predictor, xy)
        for inst, m, sc in zip(s.instances, masks, scores):
            ious = [_iou(mk, inst.mask) for mk in m]
            best.append(max(ious))
            whole.append(ious[2])
            top.append(ious[int(np.argmax(sc))])
    return {"n_instances": len(best), "best_of_3": float(np.mean(best)), "whole_output": float(np.mean(whole)),
            "top_scored": float(np.mean(top))}


def iou_calibration(model: Sam, samples: Sequence, points_per_image: int = 8, seed: int = 0,
                    pred_iou_thresh: float = 0.86) -> dict:
    """Predicted vs actual IoU (best valid region of the point: part or whole) of all 3 outputs."""
    predictor = SamPredictor(model)
    rng = np.random.default_rng(seed)
    pred, actual = [], []
    for s in tqdm(samples, desc="SAM IoU calibration"):
        whole, part, _ = region_maps(s)
        h, w = whole.shape
        xy = np.stack([rng.integers(0, w, points_per_image), rng.integers(0, h, points_per_image)], 1)
        predictor.set_image(s.image)
        masks, scores = predict_points(predictor, xy)
        for (x, y), m, sc in zip(xy, masks, scores):
            targets = (part == part[y, x], whole == whole[y, x])
            for mk, p in zip(m, sc):
                pred.append(float(p))
                actual.append(max(_iou(mk, t) for t in targets))
    pred_a, act_a = np.array(pred), np.array(actual)
    keep = pred_a >= pred_iou_thresh
    return {"n_masks": len(pred), "pearson": float(np.corrcoef(pred_a, act_a)[0, 1]) if pred_a.std() > 0 else 0.0,
            "mae": float(np.abs(pred_a - act_a).mean()), "mean_pred": float(pred_a.mean()),
            "mean_actual": float(act_a.mean()), "frac_pred_above_thresh": float(keep.mean()),
            "actual_iou_of_kept": float(act_a[keep].mean()) if keep.any() else None}


def amg_object_recall(model: Sam | None, samples: Sequence, points_per_side: int = 16,
                      pred_iou_thresh: float = 0.86, stability_score_thresh: float = 0.92,
                      box_nms_thresh: float = 0.7, crop_n_layers: int = 0, recall_iou: float = 0.7,
                      mask_fn: Callable[[np.ndarray], Sequence[np.ndarray]] | None = None) -> dict:
    """Fraction of instances some generated mask covers at IoU ≥ ``recall_iou``.

    ``mask_fn(image) -> bool masks`` replaces segment_anything's generator (e.g. fmalib.method.generator's multi-level one).
    """
    if mask_fn is None:
        gen = SamAutomaticMaskGenerator(model, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                                        stability_score_thresh=stability_score_thresh,
                                        box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers,
                                        min_mask_region_area=0, output_mode="binary_mask")
        mask_fn = lambda image: [r["segmentation"] for r in gen.generate(image)]  # noqa: E731
    hits, n_masks, best = [], [], []
    t0 = time.time()
    for s in tqdm(samples, desc="SAM automatic masks"):
        masks = mask_fn(s.image)
        n_masks.append(len(masks))
        for inst in s.instances:
            b = max((_iou(m, inst.mask) for m in masks), default=0.0)
            best.append(b)
            hits.append(b >= recall_iou)
    return {"n_instances": len(hits), "recall": float(np.mean(hits)), "mean_best_iou": float(np.mean(best)),
            "masks_per_image": float(np.mean(n_masks)), "s_per_image": (time.time() - t0) / max(1, len(samples))}


AMG_KEYS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_n_layers")


def amg_settings(params: Params) -> dict:
    """The automatic-generation thresholds the method uses: the ``masks`` section of the params."""
    masks = params["masks"]
    missing = [k for k in AMG_KEYS if k not in masks]
    if missing:

        raise FmalibError(f"{params.path}: masks.{missing[0]} missing; SAM quality uses the masks thresholds")
    return {k: masks[k] for k in AMG_KEYS}


def sam_quality(model: Sam, params: Params, n_images: int | None = None, multilevel: bool = True) -> dict:
    """All three measures on the val split, automatic generation with the ``masks`` section's thresholds:
    segment_anything's stock generator (``amg``) and, with ``multilevel``, fmalib.method.generator with
    its whole-mask bonus and overlap filter (``amg_multilevel``), which is what the method consumes."""
    ev = params["foundation"]["sam"]["eval"]
    amg = amg_settings(params)
    samples = val_samples(params, n_images or ev["n_images"])
    out = {"n_images": len(samples), "amg_settings": amg, "point": point_prompt_iou(model, samples),
           "calibration": iou_calibration(model, samples, pred_iou_thresh=amg["pred_iou_thresh"]),
           "amg": amg_object_recall(model, samples, recall_iou=ev["recall_iou"], **amg)}
    if multilevel:

        gen = MultiLevelMaskGenerator(model, **{k: params["masks"][k] for k in MASK_KEYS})
        out["amg_multilevel"] = amg_object_recall(None, samples, recall_iou=ev["recall_iou"],
                                                  mask_fn=lambda image: list(gen.generate(image).to_bool()))
    log.info("tiny SAM quality on %d val images: %s", len(samples), out)
    return out
