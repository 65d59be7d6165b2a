"""Multi-level SAM automatic masks (METHOD §5): SAM's three outputs kept apart, thresholded, de-duplicated.

Built on ``segment_anything``'s ``SamPredictor`` and its ``utils.amg`` helpers (point grids, crop boxes,
stability score, boxes, crop-edge test, un-cropping):

* every point prompt gives SAM's three multimask outputs; the output index is the mask's **level**
  (0 subpart, 1 part, 2 whole) and stays with it;
* whole masks get ``whole_iou_bonus`` (+0.1) on the predicted IoU compared with ``pred_iou_thresh`` and
  ``whole_nms_bonus`` (+1.0) on the score of the within-crop box NMS, so they win ties against their parts
  there; the cross-crop NMS (1 / crop area) and the NMS after small-region clean-up (1 unchanged, 0
  changed) use SAM's stock scores, as the original (which overrides only the per-crop NMS score);
* masks are run-length encoded only after the per-crop NMS (the stock generator encodes every candidate);
* small disconnected islands / holes (< ``min_mask_region_area`` px) are removed with scipy (no OpenCV);
* then the overlap filter (``fmalib.method.overlap``).

The result of one image is a ``MaskSet`` (``fmalib.method.masks``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from scipy import ndimage
from segment_anything import SamPredictor
from segment_anything.utils.amg import (batch_iterator, batched_mask_to_box, build_all_layer_point_grids,
                                        calculate_stability_score, generate_crop_boxes, is_box_near_crop_edge,
                                        uncrop_boxes_xyxy, uncrop_masks)
from torchvision.ops.boxes import batched_nms, box_area

from ..core.errors import FmalibError
from .masks import WHOLE, MaskSet, bool_to_runs, concat_runs
from .overlap import overlap_filter
from .rle import MaskRuns

MASK_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_n_points_downscale_factor",
             "crop_overlap_ratio", "crop_nms_thresh", "min_mask_region_area", "whole_iou_bonus",
             "whole_nms_bonus", "overlap_thresh")


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """segment_anything's ``remove_small_regions`` (8-connected holes / islands below ``area_thresh`` px)
    with scipy instead of OpenCV. Returns (mask, changed)."""
    if mode not in ("holes", "islands"):
        raise FmalibError(f"remove_small_regions: mode {mode!r}; expected 'holes' or 'islands'")
    holes = mode == "holes"
    regions, n = ndimage.label(holes ^ mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    if holes:
        keep_labels = np.r_[0, small]
    else:
        keep_labels = np.setdiff1d(np.arange(1, n + 1), small)
        if len(keep_labels) == 0:  # every island is small: keep the largest
            keep_labels = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(regions, keep_labels), True


def passes_pred_iou(iou: torch.Tensor, levels: torch.Tensor, thresh: float, whole_bonus: float) -> torch.Tensor:
    """Predicted-IoU test with the whole-mask bonus: iou + bonus * [level == whole] > thresh."""
    return iou + whole_bonus * (levels == WHOLE).to(iou.dtype) > thresh


def nms_score(iou: torch.Tensor, levels: torch.Tensor, whole_bonus: float) -> torch.Tensor:
    """Box-NMS score: predicted IoU + bonus for whole masks, so a whole beats its near-duplicate part."""
    return iou + whole_bonus * (levels == WHOLE).to(iou.dtype)


def _box_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    return batched_nms(boxes.float(), scores.float(), torch.zeros(len(boxes), device=boxes.device), thresh)


class MultiLevelMaskGenerator:
    """SAM automatic masks with levels, from ``params.masks`` (see the module doc)."""

    def __init__(self, model, cfg: Mapping[str, Any]):
        missing = [k for k in MASK_KEYS if k not in cfg]
        if missing:
            raise FmalibError(f"params masks: missing key {missing[0]} (expected {', '.join(MASK_KEYS)})")
        self.cfg = {k: cfg[k] for k in MASK_KEYS}
        self.predictor = SamPredictor(model)
        self.point_grids = build_all_layer_point_grids(cfg["points_per_side"], cfg["crop_n_layers"],
                                                       cfg["crop_n_points_downscale_factor"])

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> MaskSet:
        """All filtered masks of an (H, W, 3) uint8 RGB image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise FmalibError(f"masks: expected an (H, W, 3) uint8 RGB image; got {image.shape} {image.dtype}")
        raw = self.generate_unfiltered(image)
        if len(raw) == 0:
            return raw
        return raw.select(overlap_filter(raw.rles(), raw.levels, self.cfg["overlap_thresh"]))

    @torch.no_grad()
    def generate_unfiltered(self, image: np.ndarray) -> MaskSet:
        """Masks after thresholds, NMS and small-region removal, before the overlap filter."""
        cfg = self.cfg
        h, w = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes((h, w), cfg["crop_n_layers"], cfg["crop_overlap_ratio"])
        parts = [self._crop(image, box, layer) for box, layer in zip(crop_boxes, layer_idxs)]
        parts = [p for p in parts if p is not None]
        if not parts:
            return MaskSet.from_runs(MaskRuns.empty(h, w), [], [], [])
        runs = concat_runs([p[0] for p in parts])
        meta = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        if len(crop_boxes) > 1:  # duplicates across crops: prefer masks from smaller crops (stock rule)
            keep = _box_nms(meta["boxes"], 1 / box_area(meta["crop_boxes"].float()), cfg["crop_nms_thresh"])
            keep = torch.sort(keep).values
            runs, meta = runs.select(keep.cpu().numpy()), {k: v[keep] for k, v in meta.items()}
        if cfg["min_mask_region_area"] > 0 and runs.n:
            runs, meta = self._remove_small_regions(runs, meta)
        return MaskSet.from_runs(runs, meta["levels"].cpu().numpy(), meta["iou_preds"].cpu().numpy(),
                                 meta["stability"].cpu().numpy())

    def _crop(self, image, crop_box, layer):
        cfg = self.cfg
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        ch, cw = crop.shape[:2]
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array([[cw, ch]])
        batches = [self._batch(pts, (ch, cw), crop_box, image.shape[:2])
                   for (pts,) in batch_iterator(cfg["points_per_batch"], points)]
        self.predictor.reset_image()
        masks = torch.cat([b[0] for b in batches])
        meta = {k: torch.cat([b[1][k] for b in batches]) for k in batches[0][1]}
        if len(masks) == 0:
            return None
        score = nms_score(meta["iou_preds"], meta["levels"], cfg["whole_nms_bonus"])
        keep = _box_nms(meta["boxes"], score, cfg["box_nms_thresh"])
        keep = torch.sort(keep).values  # generation order: deterministic ties downstream
        masks, meta = masks[keep], {k: v[keep] for k, v in meta.items()}
        meta["boxes"] = uncrop_boxes_xyxy(meta["boxes"], crop_box)
        meta["crop_boxes"] = torch.tensor([crop_box] * len(masks), device=masks.device)
        return bool_to_runs(uncrop_masks(masks, crop_box, *image.shape[:2])), meta

    def _batch(self, points: np.ndarray, crop_size, crop_box, orig_size):
        """One batch of point prompts -> binary masks (at crop size) passing the thresholds, with their meta.
        The predicted-IoU test runs on the decoder's low-resolution output, so only its survivors are
        upsampled (``SamPredictor.predict_torch`` upsamples every mask first; the result is the same)."""
        cfg, pred = self.cfg, self.predictor
        model = pred.model
        coords = torch.as_tensor(pred.transform.apply_coords(points, crop_size), device=pred.device)
        labels = torch.ones(len(coords), dtype=torch.int, device=pred.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou = model.mask_decoder(image_embeddings=pred.features,
                                          image_pe=model.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=True)
        n_out = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        levels = torch.arange(n_out, device=iou.device).repeat(len(coords))
        if cfg["pred_iou_thresh"] > 0:
            keep = passes_pred_iou(iou, levels, cfg["pred_iou_thresh"], cfg["whole_iou_bonus"])
            low_res, iou, levels = low_res[keep], iou[keep], levels[keep]
        logits = model.postprocess_masks(low_res[:, None], pred.input_size, pred.original_size)[:, 0]
        stability = calculate_stability_score(logits, model.mask_threshold, cfg["stability_score_offset"])
        if cfg["stability_score_thresh"] > 0:
            keep = stability >= cfg["stability_score_thresh"]
            logits, iou, levels, stability = logits[keep], iou[keep], levels[keep], stability[keep]
        masks = logits > model.mask_threshold
        boxes = batched_mask_to_box(masks)
        inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        inside &= masks.flatten(1).any(1)
        meta = {"iou_preds": iou[inside], "stability": stability[inside], "levels": levels[inside],
                "boxes": boxes[inside]}
        return masks[inside], meta

    def _remove_small_regions(self, runs: MaskRuns, meta: dict):
        """Clean each mask, then box NMS again with SAM's stock scores (``postprocess_small_regions``): 1 for
        a mask the cleaning left unchanged, 0 for a changed one — no whole bonus here (METHOD §5)."""
        area = self.cfg["min_mask_region_area"]
        dense = runs.to_bool()
        unchanged = np.ones(runs.n, bool)
        for i in range(runs.n):  # scipy labelling, mask by mask
            m, changed_h = remove_small_regions(dense[i], area, "holes")
            m, changed_i = remove_small_regions(m, area, "islands")
            dense[i] = m
            unchanged[i] = not (changed_h or changed_i)
        masks = torch.from_numpy(dense)
        nonempty = masks.flatten(1).any(1).numpy()
        boxes = batched_mask_to_box(masks)
        score = torch.from_numpy(unchanged).float()
        keep = _box_nms(boxes, score, max(self.cfg["box_nms_thresh"], self.cfg["crop_nms_thresh"]))
        keep = np.sort(keep.numpy())
        keep = keep[nonempty[keep]]
        new_runs = MaskRuns.from_bool(dense[keep])
        meta = {k: v[torch.as_tensor(keep, device=v.device)] for k, v in meta.items()}
        return new_runs, meta

