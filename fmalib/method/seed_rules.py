"""Pixel-label rules over (background, classes): the one argmax both seed methods share, and CLIP-ES's
CAM-argmax seeds with a constant background score, plus their threshold sweep."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..core.errors import FmalibError
from .metrics import confusion_matrix, mean_iou
from .scores import cam_scores


def argmax_with_background(bg: np.ndarray, scores: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(index, value) of the maximum over (bg, scores_1, …, scores_K) along ``axis``: index 0 is background,
    k the k-th score. Ties go to the earlier entry — background first, then the first class listed."""
    table = np.concatenate([np.expand_dims(bg, axis), scores], axis=axis)
    idx = np.argmax(table, axis=axis)
    return idx, np.take_along_axis(table, np.expand_dims(idx, axis), axis).squeeze(axis)


def cam_argmax_seeds(cams: np.ndarray, labels: Sequence[int], bg_threshold: float,
                     size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 label map argmax over (bg_threshold, CAM_1..CAM_K) -> 0 or labels[k] (ties go to background).

    cams (K, h, w) of any scale, scored as the original does (``cam_scores``: resized bilinearly to ``size``
    when given, then ReLU + min-max).
    """
    cams = cam_scores(cams, size)
    labels = np.asarray(labels, np.int64)
    if cams.ndim != 3 or len(labels) != cams.shape[0]:
        raise FmalibError(f"cam_argmax_seeds: cams {cams.shape} must be (K, H, W) with K = len(labels) = {len(labels)}")
    if not len(labels):
        return np.zeros(cams.shape[1:], np.uint8)
    idx, _ = argmax_with_background(np.full(cams.shape[1:], bg_threshold, np.float32), cams)
    return np.concatenate([[0], labels]).astype(np.uint8)[idx]


def bg_threshold_sweep(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], thresholds: Sequence[float],
                       num_classes: int) -> dict[float, float]:
    """{threshold: mIoU} of ``cam_argmax_seeds`` over (cams at any size and scale, labels, gt) items; one pass:
    the class argmax of the scores is taken once and compared with each threshold (the same labels, ties to
    background)."""
    ts = [float(t) for t in thresholds]
    conf = np.zeros((len(ts), num_classes, num_classes), np.int64)
    for cams, labels, gt in items:
        cams = cam_scores(cams, gt.shape) if len(labels) else np.zeros((0,) + gt.shape, np.float32)
        top = cams.max(axis=0) if len(labels) else np.full(gt.shape, -np.inf, np.float32)
        cls = np.concatenate([[0], labels])[cams.argmax(axis=0) + 1] if len(labels) else np.zeros(gt.shape, np.int64)
        for i, t in enumerate(ts):
            conf[i] += confusion_matrix(np.where(top > t, cls, 0), gt, num_classes)
    return {t: mean_iou(c) for t, c in zip(ts, conf)}

