"""Multi-level SAM 2 automatic masks: the ``sam2`` package's ``SAM2AutomaticMaskGenerator`` turned into the
generator of docs/method.md §5, as ``fmalib.method.generator`` turns segment_anything's.

The same thresholds (``MASK_KEYS``), the same levels (the multimask output index: 0 subpart,
1 part, 2 whole — SAM 2's decoder has SAM's three multimask tokens), the same whole-mask bonuses, the same
scipy clean-up and the same overlap filter (``fmalib.method.overlap``); ``generate`` returns a ``MaskSet``
(``fmalib.method.masks``), so the mask cache and SAMS do not know which generator ran. From the stock generator
it keeps the point grids, the crop boxes, the ``SAM2ImagePredictor`` (``self.predictor``: its transforms and
``_predict``), ``MaskData`` and ``_generate_masks``' crop loop with its cross-crop NMS. It overrides:

* ``_process_batch``: every point prompt's three multimask outputs are kept apart with their index as the
  level (stock keeps them but forgets the index); whole masks get ``whole_iou_bonus`` on the predicted-IoU
  test; stability as stock; empty masks dropped; no RLE yet;
* ``_process_crop``: ``whole_nms_bonus`` on the score of the within-crop box NMS, survivors in its score
  order, un-cropped and run-length encoded (``MaskRuns``) only after that NMS;
* ``postprocess_small_regions``: holes / islands below ``min_mask_region_area`` removed with scipy
  (``fmalib.method.generator.remove_small_regions``; stock needs OpenCV), then box NMS with SAM's stock
  scores (1 unchanged, 0 changed). The predictor's own hole filling (``max_hole_area``) needs the sam2 CUDA
  extension and is off (``min_mask_region_area=0`` goes to the stock ``__init__``);
* the predictor's backbone feature sizes follow ``model.image_size`` (stock hard-codes 1024 px's 256 / 128 /
  64), so a small SAM 2 (tests, the toy bench) runs.

``sam2`` is optional (``pip install -e ".[sam2]"``): it is imported inside ``sam2_generator_class``, which
builds the subclass on first use; ``MultiLevelSam2MaskGenerator(model, **arguments)`` builds one generator.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ..core.errors import FmalibError
from .generator import MASK_KEYS, box_nms, nms_score, passes_pred_iou, per_mask, remove_small_regions
from .masks import MaskSet, bool_to_runs, concat_runs
from .overlap import overlap_filter
from .rle import MaskRuns


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FmalibError(f"masks: expected an (H, W, 3) uint8 RGB image; got {image.shape} {image.dtype}")
    return image


@functools.lru_cache(maxsize=None)
def sam2_generator_class() -> type:
    """The ``SAM2AutomaticMaskGenerator`` subclass (module doc), built once sam2 is imported."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # optional dependency (sam2)
    from sam2.utils.amg import (MaskData, batch_iterator, batched_mask_to_box,  # optional dependency (sam2)
                                calculate_stability_score, is_box_near_crop_edge, uncrop_boxes_xyxy, uncrop_masks)

    class _MultiLevelSam2MaskGenerator(SAM2AutomaticMaskGenerator):
        """SAM 2 automatic masks with levels (see fmalib.method.generator_sam2); the keyword arguments of
        ``MultiLevelMaskGenerator``."""

        def __init__(self, model, **arguments):
            if set(arguments) != set(MASK_KEYS):
                raise TypeError(f"MultiLevelSam2MaskGenerator takes exactly the keyword arguments {MASK_KEYS}; "
                                f"missing {sorted(set(MASK_KEYS) - set(arguments))}, "
                                f"unknown {sorted(set(arguments) - set(MASK_KEYS))}")
            own = {k: arguments.pop(k) for k in ("min_mask_region_area", "whole_iou_bonus", "whole_nms_bonus",
                                                 "overlap_thresh")}
            super().__init__(model, **arguments, min_mask_region_area=0, output_mode="binary_mask",
                             use_m2m=False, multimask_output=True)
            self.min_mask_region_area = own["min_mask_region_area"]  # scipy clean-up here, not the CUDA one
            self.whole_iou_bonus, self.whole_nms_bonus = own["whole_iou_bonus"], own["whole_nms_bonus"]
            self.overlap_thresh = own["overlap_thresh"]
            size = int(model.image_size)  # stock: [(256, 256), (128, 128), (64, 64)], 1024 px only
            self.predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8),
                                             (size // 16, size // 16)]

        @torch.no_grad()
        def generate(self, image: np.ndarray) -> MaskSet:
            """All filtered masks of an (H, W, 3) uint8 RGB image."""
            raw = self.generate_unfiltered(_check_image(image))
            if len(raw) == 0:
                return raw
            return raw.select(overlap_filter(raw.rles(), raw.levels, self.overlap_thresh))

        @torch.no_grad()
        def generate_unfiltered(self, image: np.ndarray) -> MaskSet:
            """Masks after thresholds, NMS and small-region removal, before the overlap filter."""
            image = _check_image(image)
            data = self._generate_masks(image)
            if self.min_mask_region_area > 0:
                data = self.postprocess_small_regions(data, self.min_mask_region_area,
                                                      max(self.box_nms_thresh, self.crop_nms_thresh))
            runs = data["runs"]
            joined = concat_runs(runs) if runs else MaskRuns.empty(*image.shape[:2])
            return MaskSet.from_runs(joined, np.asarray(data["levels"]), np.asarray(data["iou_preds"]),
                                     np.asarray(data["stability_score"]))

        def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int,
                          orig_size: tuple[int, ...]):
            """Stock, but the box NMS score has the whole bonus, and only its survivors are un-cropped and
            run-length encoded (field ``runs``)."""
            x0, y0, x1, y1 = crop_box
            crop = image[y0:y1, x0:x1, :]
            crop_size = crop.shape[:2]
            self.predictor.set_image(crop)
            points = self.point_grids[crop_layer_idx] * np.array(crop_size)[None, ::-1]
            data = MaskData()
            for (batch,) in batch_iterator(self.points_per_batch, points):
                data.cat(self._process_batch(batch, crop_size, crop_box, orig_size, normalize=True))
            self.predictor.reset_predictor()
            score = nms_score(data["iou_preds"], data["levels"], self.whole_nms_bonus)
            data.filter(box_nms(data["boxes"], score, self.box_nms_thresh))
            n = len(data["levels"])
            data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
            data["crop_boxes"] = torch.tensor([crop_box], device=data["boxes"].device).repeat(n, 1)
            data["runs"] = per_mask(bool_to_runs(uncrop_masks(data["masks"], crop_box, *orig_size)))
            del data["masks"]
            return data

        def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int],
                           orig_size: tuple[int, ...], normalize: bool = False):
            """One batch of point prompts -> binary masks (at crop size) passing the thresholds, with levels."""
            pred = self.predictor
            pts = torch.as_tensor(points, dtype=torch.float32, device=pred.device)
            coords = pred._transforms.transform_coords(pts, normalize=normalize, orig_hw=im_size)
            labels = torch.ones(len(coords), dtype=torch.int, device=coords.device)
            logits, iou, _ = pred._predict(coords[:, None, :], labels[:, None], multimask_output=True,
                                           return_logits=True)
            n_out = logits.shape[1]
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            levels = torch.arange(n_out, device=iou.device).repeat(len(coords))
            if self.pred_iou_thresh > 0:
                keep = passes_pred_iou(iou, levels, self.pred_iou_thresh, self.whole_iou_bonus)
                logits, iou, levels = logits[keep], iou[keep], levels[keep]
            stability = calculate_stability_score(logits, self.mask_threshold, self.stability_score_offset)
            if self.stability_score_thresh > 0:
                keep = stability >= self.stability_score_thresh
                logits, iou, levels, stability = logits[keep], iou[keep], levels[keep], stability[keep]
            masks = logits > self.mask_threshold
            boxes = batched_mask_to_box(masks)
            inside = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
            inside &= masks.flatten(1).any(1)
            return MaskData(masks=masks[inside], iou_preds=iou[inside], stability_score=stability[inside],
                            levels=levels[inside], boxes=boxes[inside])

        @staticmethod
        def postprocess_small_regions(mask_data, min_area: int, nms_thresh: float):
            """Clean each mask (holes, then islands, < ``min_area`` px) with scipy, then box NMS with SAM's
            stock scores (1 unchanged, 0 changed); survivors in generation order, empty ones dropped."""
            if len(mask_data["runs"]) == 0:
                return mask_data
            dense = concat_runs(mask_data["runs"]).to_bool()
            unchanged = np.ones(len(dense), bool)
            for i in range(len(dense)):
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

    _MultiLevelSam2MaskGenerator.__name__ = _MultiLevelSam2MaskGenerator.__qualname__ = \
        "MultiLevelSam2MaskGenerator"
    return _MultiLevelSam2MaskGenerator


def MultiLevelSam2MaskGenerator(model, **arguments):  # noqa: N802 (reads as the class it builds)
    """A SAM 2 mask generator with levels (``sam2_generator_class()(model, **arguments)``, the keyword arguments
    of ``MultiLevelMaskGenerator``): ``generate(image) -> MaskSet``."""
    return sam2_generator_class()(model, **arguments)
