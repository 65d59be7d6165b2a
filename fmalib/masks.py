"""Multi-level SAM automatic masks (METHOD §5): SAM's three outputs kept apart, filtered, cached as RLE.

Built on ``segment_anything``'s ``SamPredictor`` and its ``utils.amg`` helpers (point grids, crop boxes,
stability score, boxes, crop-edge test, un-cropping), not on ``SamAutomaticMaskGenerator``:

* every point prompt gives SAM's three multimask outputs; the output index is the mask's **level**
  (0 subpart, 1 part, 2 whole) and stays with it;
* whole masks get ``whole_iou_bonus`` (+0.1) on the predicted IoU compared with ``pred_iou_thresh`` and
  ``whole_nms_bonus`` (+1.0) on the score of the within-crop box NMS, so they win ties against their parts
  there; the cross-crop NMS (1 / crop area) and the NMS after small-region clean-up (1 unchanged, 0
  changed) use SAM's stock scores, as the original (which overrides only the per-crop NMS score);
* masks are run-length encoded only after the per-crop NMS (the stock generator encodes every candidate);
* small disconnected islands / holes (< ``min_mask_region_area`` px) are removed with scipy (no OpenCV);
* the **overlap filter** (the original's ``rock_sand_water``) runs level by level, each level as one batch:
  every whole mask is kept; all part masks are then tested at once against the kept wholes, and all
  subpart masks against the wholes + kept parts; a candidate stays if the largest fraction of it covered by
  any single kept mask, |m ∩ k| / |m|, is below ``overlap_thresh`` (0.3). Masks of one level are never
  tested against each other, so two overlapping parts can both stay.

The result of one image is a ``MaskSet`` (pycocotools RLE strings + level + predicted IoU + stability),
cached per image by ``run_mask_stage`` (resumable, shardable: ``python -m fmalib masks --shard i/n``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from segment_anything import SamPredictor
from segment_anything.utils.amg import (
    batch_iterator,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_masks,
)
from torchvision.ops.boxes import batched_nms, box_area
from tqdm.auto import tqdm

from .cache import StageCache
from .errors import FmalibError
from .rle import MaskRuns, decode_count_buffer, encode_count_strings

log = logging.getLogger(__name__)

LEVELS = ("subpart", "part", "whole")
WHOLE = 2

# params.masks (validated by fmalib.params.SCHEMA)
MASK_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
             "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_n_points_downscale_factor",
             "crop_overlap_ratio", "crop_nms_thresh", "min_mask_region_area", "whole_iou_bonus",
             "whole_nms_bonus", "overlap_thresh")


# --- one image's masks ------------------------------------------------------------------------------------
@dataclass
class MaskSet:
    """The masks of one image: pycocotools RLE count strings (column-major) + per-mask level and scores."""

    height: int
    width: int
    counts: list[bytes]
    levels: np.ndarray  # uint8 (N,): 0 subpart, 1 part, 2 whole
    scores: np.ndarray  # float32 (N,): SAM's predicted IoU (raw, without the whole bonus)
    stability: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.counts)

    def rles(self) -> list[dict]:
        return [{"size": [self.height, self.width], "counts": c} for c in self.counts]

    def runs(self) -> MaskRuns:
        if not self.counts:
            return MaskRuns.empty(self.height, self.width)
        buf = np.frombuffer(b"".join(self.counts), np.uint8)
        counts, offsets = decode_count_buffer(buf, np.array([len(c) for c in self.counts]))
        return MaskRuns.from_counts(counts, offsets, self.height, self.width)

    def to_bool(self) -> np.ndarray:
        return self.runs().to_bool()

    def areas(self) -> np.ndarray:
        return self.runs().areas

    def select(self, index) -> "MaskSet":
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return MaskSet(self.height, self.width, [self.counts[i] for i in index], self.levels[index],
                       self.scores[index], self.stability[index])

    @classmethod
    def from_runs(cls, runs: MaskRuns, levels, scores, stability) -> "MaskSet":
        counts, offsets = runs.to_counts()
        strings = encode_count_strings(counts, offsets) if runs.n else []
        return cls(runs.height, runs.width, strings, np.asarray(levels, np.uint8),
                   np.asarray(scores, np.float32), np.asarray(stability, np.float32))

    # cache layout: the count strings concatenated into one uint8 array (no pickled objects)
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"size": np.array([self.height, self.width], np.int32),
                "rle_chars": np.frombuffer(b"".join(self.counts), np.uint8),
                "rle_lengths": np.array([len(c) for c in self.counts], np.int64),
                "level": self.levels.astype(np.uint8), "score": self.scores.astype(np.float32),
                "stability": self.stability.astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "mask cache") -> "MaskSet":
        try:
            h, w = (int(v) for v in arrays["size"])
            chars, lens = arrays["rle_chars"].tobytes(), arrays["rle_lengths"].astype(np.int64)
            ends = np.cumsum(lens)
            counts = [chars[e - n:e] for e, n in zip(ends.tolist(), lens.tolist())]
            out = cls(h, w, counts, arrays["level"].astype(np.uint8), arrays["score"].astype(np.float32),
                      arrays["stability"].astype(np.float32))
        except KeyError as exc:
            raise FmalibError(f"{source}: missing array {exc} (expected size, rle_chars, rle_lengths, level, "
                              f"score, stability); delete it to recompute") from None
        if not (len(out.counts) == len(out.levels) == len(out.scores) == len(out.stability)):
            raise FmalibError(f"{source}: arrays of different lengths; delete it to recompute")
        return out


# --- the steps ------------------------------------------------------------------------------------------------
def bool_to_runs(masks: torch.Tensor) -> MaskRuns:
    """Boolean (N, H, W) tensor (any device) -> MaskRuns, in one pass for all masks."""
    n, h, w = masks.shape
    if n == 0:
        return MaskRuns.empty(h, w)
    flat = torch.nn.functional.pad(masks.permute(0, 2, 1).reshape(n, h * w).to(torch.int8), (1, 1))
    edge = flat[:, 1:] - flat[:, :-1]  # +1 where a run starts, -1 where it ends (positions 0..H*W)
    idx = torch.nonzero(edge).cpu().numpy()
    rising = edge[edge != 0].cpu().numpy() > 0
    starts, ends = idx[rising, 1], idx[~rising, 1]
    offsets = np.r_[0, np.cumsum(np.bincount(idx[rising, 0], minlength=n))]
    return MaskRuns(h, w, starts.astype(np.int64), ends.astype(np.int64), offsets.astype(np.int64))


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


def overlap_filter(rles: Sequence[Mapping[str, Any]], levels: np.ndarray, thresh: float) -> np.ndarray:
    """Indices (ascending) of the masks kept by the level-by-level overlap filter (module doc, METHOD §5).

    ``rles``: pycocotools RLE dicts of the image's (non-empty) masks; ``levels`` (N,) 0/1/2. Every whole is
    kept; then the parts, as one batch, are kept where max over kept k of |m ∩ k| / |m| < ``thresh``; then
    the subparts, as one batch, against wholes + kept parts. pycocotools' ``iou`` with every "ground truth"
    marked crowd computes exactly |dt ∩ gt| / |dt| (the candidate's own area)."""
    from pycocotools import mask as mask_utils

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
        runs = _concat_runs([p[0] for p in parts])
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


def _concat_runs(parts: Sequence[MaskRuns]) -> MaskRuns:
    h, w = parts[0].height, parts[0].width
    offsets = [np.zeros(1, np.int64)]
    total = 0
    for p in parts:
        offsets.append(p.offsets[1:] + total)
        total += len(p.starts)
    return MaskRuns(h, w, np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]),
                    np.concatenate(offsets))


# --- the stage: SAM model, cache, runner ------------------------------------------------------------------
def _file_identity(path: Path) -> dict:
    """Content hash for files up to 256 MB (the tiny SAM); size + mtime for the 2.5 GB ViT-H."""
    st = path.stat()
    if st.st_size <= 256 * 2**20:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sam_identity(params) -> dict:
    """What identifies the SAM of ``params.sam`` (cache key); a missing tiny checkpoint means random init."""
    sam = params["sam"]
    ident = {"model_type": sam["model_type"]}
    ckpt = params.resolve_path("sam.checkpoint") if sam["checkpoint"] else None
    if ckpt is not None and ckpt.is_file():
        ident.update(_file_identity(ckpt))
    elif sam["model_type"] == "fmalib_tiny":
        ident["random_init_seed"] = int(params["seed"])
    else:
        raise FmalibError(f"params sam.checkpoint: {ckpt} does not exist (a {sam['model_type']} SAM needs its "
                          f"weights, e.g. sam_vit_h_4b8939.pth)")
    return ident


def load_sam_from_params(params, device: str | None = None):
    """The SAM of ``params.sam`` (random init, with a warning, while the tiny checkpoint is not there)."""
    from .models.sam import load_sam

    ident = sam_identity(params)
    device = device or params["device"]
    if "random_init_seed" in ident:
        log.warning("SAM checkpoint %s not found: using a randomly initialised %s (seed %d)",
                    params["sam"]["checkpoint"], params["sam"]["model_type"], ident["random_init_seed"])
        torch.manual_seed(ident["random_init_seed"])
        return load_sam(params["sam"]["model_type"], None, device)
    return load_sam(params["sam"]["model_type"], params.resolve_path("sam.checkpoint"), device)


def mask_cache(params, split: str) -> StageCache:
    """The mask cache of ``split``: keyed by the SAM, params.masks and the dataset (not by the shard)."""
    data = params["data"]
    key = {"sam": sam_identity(params), "masks": {k: params["masks"][k] for k in MASK_KEYS},
           "data": {"kind": data["kind"], "root": str(params.resolve_path("data.root")), "split": split,
                    "synthetic": dict(data["synthetic"]) if data["kind"] == "synthetic" else None}}
    return StageCache(params.resolve_path("workdir"), "masks", key)


def load_masks(cache: StageCache, image_id: str) -> MaskSet:
    """One image's cached masks."""
    if not cache.has(image_id):
        raise FmalibError(f"no cached SAM masks for image {image_id!r} in {cache.dir}; run the mask stage "
                          f"(fmalib.masks.run_mask_stage or python -m fmalib masks)")
    return MaskSet.from_arrays(cache.load_npz(image_id), str(cache.path(image_id)))


def save_masks(cache: StageCache, image_id: str, masks: MaskSet) -> Path:
    return cache.save_npz(image_id, **masks.to_arrays())


def shard_indices(n_items: int, shard: tuple[int, int]) -> list[int]:
    """Items i, i + n, i + 2n, ... of shard (i, n): shards of one run partition the split."""
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise FmalibError(f"shard {shard!r}: expected (i, n) with 0 <= i < n")
    return list(range(i, n_items, n))


def run_mask_stage(params, split: str | None = None, shard: tuple[int, int] = (0, 1), *, force: bool = False,
                   model=None, limit: int | None = None) -> StageCache:
    """Compute and cache the masks of the images of ``split`` in ``shard`` that are not cached yet.

    Resumable: finished images are files in the cache and are skipped; shards write into the same cache
    directory, so running shards 0/n .. n-1/n (anywhere, in any order) fills it. ``limit`` caps the images
    of this shard (smoke runs). Returns the cache."""
    from .data import open_dataset

    split = split or params["data"]["train_split"]
    dataset = open_dataset(params, split)
    cache = mask_cache(params, split)
    mine = shard_indices(len(dataset), shard)[:limit]
    todo = [j for j in mine if force or not cache.has(dataset.ids[j])]
    log.info("SAM masks of %s shard %d/%d: %d images, %d cached, %d to compute -> %s",
             split, shard[0], shard[1], len(mine), len(mine) - len(todo), len(todo), cache.dir)
    if not todo:
        return cache
    generator = MultiLevelMaskGenerator(model if model is not None else load_sam_from_params(params),
                                        params["masks"])
    per_level = np.zeros(3, np.int64)
    for j in tqdm(todo, desc=f"SAM masks {split} {shard[0]}/{shard[1]}"):
        item = dataset[j]
        masks = generator.generate(item["image"])
        save_masks(cache, item["id"], masks)
        per_level += np.bincount(masks.levels, minlength=3)[:3]
    log.info("SAM masks of %s shard %d/%d: cached %d images in %s; masks per image: %s", split, shard[0],
             shard[1], len(todo), cache.dir,
             ", ".join(f"{name} {c / len(todo):.1f}" for name, c in zip(LEVELS, per_level)))
    return cache


# --- summaries for the notebooks ---------------------------------------------------------------------------
def region_recall(masks: MaskSet, gt: np.ndarray, iou: float = 0.5) -> tuple[int, int]:
    """(GT regions matched, GT regions): a region is one class's pixels of ``gt`` (background included,
    255 ignored); matched when some mask overlaps it with IoU >= ``iou``."""
    classes = [c for c in np.unique(gt) if c != 255]
    if not len(masks):
        return 0, len(classes)
    dense = masks.to_bool().reshape(len(masks), -1)
    area = dense.sum(1)
    hits = 0
    for c in classes:
        region = (gt == c).ravel()
        inter = dense[:, region].sum(1)
        hits += bool((inter / np.maximum(area + region.sum() - inter, 1) >= iou).any())
    return hits, len(classes)


def mask_table(cache: StageCache, dataset, limit: int | None = None):
    """Per image: masks per level and GT-region recall at IoU 0.5 (a DataFrame)."""
    import pandas as pd

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
    import pandas as pd

    generator = MultiLevelMaskGenerator(model if model is not None else load_sam_from_params(params),
                                        params["masks"])
    rows = []
    for i, image in enumerate(tqdm(images, desc="overlap filter effect", leave=False)):
        raw = generator.generate_unfiltered(image)
        keep = overlap_filter(raw.rles(), raw.levels, generator.cfg["overlap_thresh"])
        for stage, levels in (("before", raw.levels), ("after", raw.levels[keep])):
            counts = np.bincount(levels, minlength=3)[:3]
            rows.append({"image": i, "filter": stage, **{n: int(c) for n, c in zip(LEVELS, counts)}})
    return pd.DataFrame(rows)


def level_mosaics(image: np.ndarray, masks: MaskSet) -> dict[str, np.ndarray]:
    """The image with its masks of each level painted in random colours, plus all levels together."""
    from .viz import mask_mosaic

    dense = masks.to_bool() if len(masks) else np.zeros((0, *image.shape[:2]), bool)
    out = {name: mask_mosaic(image, dense[masks.levels == lv]) for lv, name in enumerate(LEVELS)}
    order = np.argsort(-masks.levels.astype(np.int64), kind="stable")  # wholes below, subparts on top
    out["all"] = mask_mosaic(image, dense[order])
    return out


def cli(args) -> None:
    """``python -m fmalib masks --params P [--split S] [--shard i/n] [--force] [--fast]``."""
    from . import study

    params = study.setup(args.params, fast=args.fast, overrides=args.overrides, device=args.device)
    cache = run_mask_stage(params, args.split, args.shard, force=args.force)
    print(f"masks: {len(cache.done_ids())} images cached in {cache.dir}")
