"""Multi-level SAM automatic masks (docs/method.md §5): SAM's three outputs kept apart, thresholded, de-duplicated.

``MultiLevelMaskGenerator`` is a ``segment_anything.SamAutomaticMaskGenerator``. From the stock generator it
keeps the point grids, the crop boxes, the ``SamPredictor`` (``self.predictor``), ``MaskData`` and
``_generate_masks``' crop loop with its cross-crop NMS (score 1 / crop area). It overrides:

* ``_process_batch``: every point prompt gives SAM's three multimask outputs; the output index is the mask's
  **level** (0 subpart, 1 part, 2 whole), a ``MaskData`` field. Whole masks get ``whole_iou_bonus`` (+0.1) on
  the predicted IoU compared with ``pred_iou_thresh``, tested on the decoder's low-resolution logits, so only
  survivors are upsampled (stock upsamples every mask first; same masks). Empty masks are dropped;
* ``_process_crop``: whole masks get ``whole_nms_bonus`` (+1.0) on the score of the within-crop box NMS, so
  they win ties against their parts there; masks are uncropped and run-length encoded (``MaskRuns``) only
  after this NMS (stock encodes every candidate as RLE);
* ``_generate_masks``: the stock one, with its cross-crop NMS;
* ``postprocess_small_regions``: the stock clean-up and NMS (score 1 unchanged, 0 changed: stock scores, no
  bonus), on runs, with a scipy ``remove_small_regions`` (stock needs OpenCV);
* ``generate``: a ``MaskSet`` (``fmalib.method.masks``) after the overlap filter (``fmalib.method.overlap``);
  ``generate_unfiltered`` is the same before the filter.

After every NMS the survivors keep the NMS's score order, as in the stock generator and the original: SAMS
paints ties in this order.
"""
from __future__ import annotations


import numpy as np
import torch
from scipy import ndimage
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import (MaskData, batch_iterator, batched_mask_to_box, calculate_stability_score,
                                        is_box_near_crop_edge, uncrop_boxes_xyxy, uncrop_masks)
from torchvision.ops.boxes import batched_nms

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
    with scipy instead of OpenCV (not a dependency). Returns (mask, changed)."""
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


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Indices kept by class-agnostic box NMS, in its score order (torchvision's, as stock SAM keeps them)."""
    boxes, scores = torch.as_tensor(boxes), torch.as_tensor(scores)  # SAM 2's MaskData may hold arrays
    return batched_nms(boxes.float(), scores.float(), torch.zeros(len(boxes), device=boxes.device), thresh)


def per_mask(runs: MaskRuns) -> list[MaskRuns]:
    """N masks' runs -> N one-mask ``MaskRuns``: a list, which ``MaskData.filter`` / ``cat`` carry along."""
    o = runs.offsets.tolist()
    return [MaskRuns(runs.height, runs.width, runs.starts[a:b], runs.ends[a:b], np.array([0, b - a], np.int64))
            for a, b in zip(o[:-1], o[1:])]


def _joined(masks: list[MaskRuns], height: int, width: int) -> MaskRuns:
    return concat_runs(masks) if masks else MaskRuns.empty(height, width)


class MultiLevelMaskGenerator(SamAutomaticMaskGenerator):
    """SAM automatic masks with levels (see the module doc).

    The stock generator's keyword arguments (``SamAutomaticMaskGenerator``), all required, plus the levels'
    three: ``whole_iou_bonus`` (added to whole masks' predicted IoU before ``pred_iou_thresh``),
    ``whole_nms_bonus`` (added to their NMS score) and ``overlap_thresh`` (a part / subpart is kept if at most
    this share of it lies under masks kept before it). ``MASK_KEYS`` names them all."""

    def __init__(self, model, *, points_per_side: int, points_per_batch: int, pred_iou_thresh: float,
                 stability_score_thresh: float, stability_score_offset: float, box_nms_thresh: float,
                 crop_n_layers: int, crop_nms_thresh: float, crop_overlap_ratio: float,
                 crop_n_points_downscale_factor: int, min_mask_region_area: int, whole_iou_bonus: float,
                 whole_nms_bonus: float, overlap_thresh: float):
        super().__init__(model, points_per_side=points_per_side, points_per_batch=points_per_batch,
                         pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                         stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
                         crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
                         crop_overlap_ratio=crop_overlap_ratio,
                         crop_n_points_downscale_factor=crop_n_points_downscale_factor,
                         min_mask_region_area=0, output_mode="binary_mask")
        self.min_mask_region_area = min_mask_region_area  # set here: stock __init__ imports cv2 if > 0
        self.whole_iou_bonus, self.whole_nms_bonus = whole_iou_bonus, whole_nms_bonus
        self.overlap_thresh = overlap_thresh

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> MaskSet:
        """All filtered masks of an (H, W, 3) uint8 RGB image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise FmalibError(f"masks: expected an (H, W, 3) uint8 RGB image; got {image.shape} {image.dtype}")
        raw = self.generate_unfiltered(image)
        if len(raw) == 0:
            return raw
        return raw.select(overlap_filter(raw.rles(), raw.levels, self.overlap_thresh))

    @torch.no_grad()
    def generate_unfiltered(self, image: np.ndarray) -> MaskSet:
        """Masks after thresholds, NMS and small-region removal, before the overlap filter (stock ``generate``
        up to its encoding, which builds dict records)."""
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(data, self.min_mask_region_area,
                                                  max(self.box_nms_thresh, self.crop_nms_thresh))
        return MaskSet.from_runs(_joined(data["runs"], *image.shape[:2]), data["levels"], data["iou_preds"],
                                 data["stability_score"])

    def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int,
                      orig_size: tuple[int, ...]) -> MaskData:
        """Stock, but the box NMS score has the whole bonus, and only its survivors are uncropped and run-length
        encoded (field ``runs``)."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        points = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]
        data = MaskData()
        for (batch,) in batch_iterator(self.points_per_batch, points):
            data.cat(self._process_batch(batch, crop_size, crop_box, orig_size))
        self.predictor.reset_image()
        score = nms_score(data["iou_preds"], data["levels"], self.whole_nms_bonus)
        data.filter(box_nms(data["boxes"], score, self.box_nms_thresh))
        n = len(data["levels"])
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box], device=data["boxes"].device).repeat(n, 1)
        data["runs"] = per_mask(bool_to_runs(uncrop_masks(data["masks"], crop_box, *orig_size)))
        del data["masks"]
        return data

    def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int],
                       orig_size: tuple[int, ...]) -> MaskData:
        """One batch of point prompts -> binary masks (at crop size) passing the thresholds, with their levels.
        The predicted-IoU test runs on the decoder's low-resolution output, so only its survivors are
        upsampled (stock ``SamPredictor.predict_torch`` upsamples every mask first; the result is the same)."""
        pred = self.predictor
        model = pred.model
        coords = torch.as_tensor(pred.transform.apply_coords(points, im_size), device=pred.device)
        labels = torch.ones(len(coords), dtype=torch.int, device=pred.device)
        sparse, dense = model.prompt_encoder(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
        low_res, iou = model.mask_decoder(image_embeddings=pred.features,
                                          image_pe=model.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=True)
        n_out = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        levels = torch.arange(n_out, device=iou.device).repeat(len(coords))
        if self.pred_iou_thresh > 0:
            keep = passes_pred_iou(iou, levels, self.pred_iou_thresh, self.whole_iou_bonus)
            low_res, iou, levels = low_res[keep], iou[keep], levels[keep]
        logits = model.postprocess_masks(low_res[:, None], pred.input_size, pred.original_size)[:, 0]
        stability = calculate_stability_score(logits, model.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            keep = stability >= self.stability_score_thresh
            logits, iou, levels, stability = logits[keep], iou[keep], levels[keep], stability[keep]
        masks = logits > model.mask_threshold
        boxes = batched_mask_to_box(masks)
        inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        inside &= masks.flatten(1).any(1)
        return MaskData(masks=masks[inside], iou_preds=iou[inside], stability_score=stability[inside],
                        levels=levels[inside], boxes=boxes[inside])

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Stock: clean each mask (holes, then islands, < ``min_area`` px), then box NMS again with SAM's stock
        scores, 1 for a mask the cleaning left unchanged, 0 for a changed one — no whole bonus here
        (docs/method.md §5). Ours works on the ``runs`` field, cleans with scipy (stock: OpenCV), keeps the survivors
        in the NMS's score order and drops any mask left empty. Edits ``mask_data`` in place."""
        if len(mask_data["runs"]) == 0:
            return mask_data
        dense = concat_runs(mask_data["runs"]).to_bool()
        unchanged = np.ones(len(dense), bool)
        for i in range(len(dense)):  # scipy labelling, mask by mask
            m, changed_h = remove_small_regions(dense[i], min_area, "holes")
            m, changed_i = remove_small_regions(m, min_area, "islands")
            dense[i] = m
            unchanged[i] = not (changed_h or changed_i)
        masks = torch.from_numpy(dense)
        nonempty = masks.flatten(1).any(1).numpy()
        boxes = batched_mask_to_box(masks)
        keep = box_nms(boxes, torch.from_numpy(unchanged).float(), nms_thresh).numpy()
        keep = keep[nonempty[keep]]
        mask_data.filter(torch.as_tensor(keep))
        mask_data["runs"] = per_mask(MaskRuns.from_bool(dense[keep]))
        mask_data["boxes"] = boxes[keep].numpy()
        return mask_data
