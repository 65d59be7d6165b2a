"""Evaluation measures: mIoU from one confusion matrix accumulated over a whole split (255 ignored), average
precision of scores, and the recall of ground-truth regions by a mask set."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from ..core.label_ids import IGNORE
from .masks import MaskSet


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels with gt == ignore are skipped."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    gt = np.asarray(gt).astype(np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    keep = gt != ignore
    pred, gt = pred[keep], gt[keep]
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} has values outside 0..{num_classes - 1} (and {ignore} = ignore in gt)")
    conf = np.bincount(gt * num_classes + pred, minlength=num_classes**2)
    return conf.reshape(num_classes, num_classes).astype(np.int64)


class ConfusionMeter:
    """Accumulate one confusion matrix over a split, image by image."""

    def __init__(self, num_classes: int, ignore: int = IGNORE):
        self.num_classes = num_classes
        self.ignore = ignore
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore)

    def mean_iou(self) -> float:
        return mean_iou(self.matrix)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU_k = TP / (TP + FP + FN); nan where class k is in neither gt nor prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean over the classes that occur (in gt or prediction) of the per-class IoU."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def iou_table(conf: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Per-class IoU with gt pixel counts; class_names includes background at index 0."""
    conf = np.asarray(conf)
    if len(class_names) != conf.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {conf.shape[0]}-class confusion matrix")
    return pd.DataFrame({
        "class": list(class_names),
        "iou": iou_per_class(conf),
        "gt_pixels": conf.sum(1),
        "pred_pixels": conf.sum(0),
    })


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP (sklearn's definition); nan when there is no positive."""
    targets = np.asarray(targets, bool)
    if not targets.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = targets[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(N, C) bool from per-image fg ids (1..C)."""
    y = np.zeros((len(labels), num_classes), bool)
    for i, ids in enumerate(labels):
        for c in ids:
            y[i, int(c) - 1] = True
    return y


def region_recall(masks: MaskSet, gt: np.ndarray, iou: float = 0.5) -> tuple[int, int]:
    """(GT regions matched, GT regions): a region is one class's pixels of ``gt`` (background included,
    255 ignored); matched when some mask overlaps it with IoU >= ``iou`` (pycocotools' mask IoU)."""
    classes = [c for c in np.unique(gt) if c != IGNORE]
    if not len(masks) or not classes:
        return 0, len(classes)
    regions = mask_utils.encode(np.asfortranarray(np.stack([gt == c for c in classes], axis=-1).astype(np.uint8)))
    ious = np.asarray(mask_utils.iou(masks.rles(), regions, [0] * len(regions))).reshape(len(masks), len(regions))
    return int((ious >= iou).any(axis=0).sum()), len(classes)
