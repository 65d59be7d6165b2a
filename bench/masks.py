"""Toy SAM mask stage: images/s on this CPU, masks per level, and cache bytes per image vs raw masks.

Runs ``fmalib.method.generator.MultiLevelMaskGenerator`` with params/toy.yaml's settings on the first ``--images``
train images (the tiny SAM from assets/tiny_sam.pth, or a random-init one while it is missing — then also
with every threshold at 0, so that masks survive).

Then ``stock_comparison``: segment_anything's own ``SamAutomaticMaskGenerator`` with the same model, points,
thresholds and crop settings on the same images — both generators' s/image, the ratio, and how equal the
outputs are (fmalib's whole masks matched by IoU to the stock masks, and back; counts per level). The stock
small-region clean-up needs OpenCV (not installed), so both run with ``min_mask_region_area=0``. Two models: the
tiny SAM with params/toy.yaml's masks on the first ``--compare-images`` toy images (also once with both whole
bonuses at 0, where the two must agree mask for mask), and SAM ``vit_b`` at random init on ``--vit-b-images``
synthetic 500x375 images (VOC's size) with every threshold at 0 so the random model's masks survive, 8x8
points, no crops (``--vit-b-images 0`` skips it), then twice more on the stored encoder outputs (the decoder
and post-processing alone), with the bonuses and without. Writes reports/bench/masks.json.
    python bench/masks.py [--images 20] [--threads 1 2] [--compare-images 4] [--vit-b-images 2] [--compare-threads 1]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import time

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator

from fmalib.core.params import load_params, repo_root
from fmalib.data import open_dataset
from fmalib.data.synthetic import generate_sample
from fmalib.method.generator import MASK_KEYS, MultiLevelMaskGenerator
from fmalib.method.masks import LEVELS, WHOLE
from fmalib.method.overlap import overlap_filter
from fmalib.models.checkpoints import load_sam_from_params, sam_fingerprint
from fmalib.models.sam import load_sam
from fmalib.study.results import write_bench

# params.masks keys that segment_anything's generator takes as they are (the whole bonuses and the overlap
# filter are fmalib's; min_mask_region_area is 0 in the comparison: the stock clean-up needs OpenCV)
STOCK_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
              "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio",
              "crop_n_points_downscale_factor")
MATCH_IOU = 0.9


def cache_bytes(masks) -> int:
    """Bytes of the image's cache file (compressed npz, as StageCache writes it)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **masks.to_arrays())
    return len(buf.getvalue())


def run(params, images, threads: int, overrides: dict) -> dict:
    torch.set_num_threads(threads)
    cfg = dict(params["masks"], **overrides)
    generator = MultiLevelMaskGenerator(load_sam_from_params(params, "cpu"), **{k: cfg[k] for k in MASK_KEYS})
    generator.generate(images[0])  # warm-up
    per_level, cache, raw_bool, raw_bits, unfiltered = np.zeros(3), 0, 0, 0, 0
    t0 = time.perf_counter()
    results = [generator.generate(img) for img in images]
    elapsed = time.perf_counter() - t0
    for img, m in zip(images, results):
        per_level += np.bincount(m.levels, minlength=3)[:3]
        cache += cache_bytes(m)
        raw_bool += len(m) * img.shape[0] * img.shape[1]
        raw_bits += len(m) * ((img.shape[0] * img.shape[1] + 7) // 8)
    unfiltered = sum(len(generator.generate_unfiltered(img)) for img in images) / len(images)
    n = len(images)
    return {"threads": threads, "overrides": overrides, "images_per_s": n / elapsed, "s_per_image": elapsed / n,
            "masks_per_image": (per_level / n).round(2).tolist(), "masks_per_image_before_overlap_filter":
            unfiltered, "cache_bytes_per_image": cache / n, "raw_bool_bytes_per_image": raw_bool / n,
            "raw_bitpacked_bytes_per_image": raw_bits / n,
            "cache_vs_raw_bool": cache / max(raw_bool, 1), "cache_vs_raw_bits": cache / max(raw_bits, 1)}


# --------------------------------------------------------------------------------- fmalib vs segment_anything
def stock_generator(model, cfg) -> SamAutomaticMaskGenerator:
    """segment_anything's generator with ``cfg``'s model, points, thresholds and crops; no small-region clean-up."""
    return SamAutomaticMaskGenerator(model, **{k: cfg[k] for k in STOCK_KEYS}, min_mask_region_area=0,
                                     output_mode="binary_mask")


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, H, W) and (M, H, W) bool masks."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x = torch.from_numpy(a.reshape(len(a), -1)).float()
    y = torch.from_numpy(b.reshape(len(b), -1)).float()
    inter = x @ y.T
    union = x.sum(1)[:, None] + y.sum(1)[None] - inter
    return (inter / union.clamp(min=1)).numpy()


def _timed_pair(fa, fb, images, sync):
    """Both functions on each image in turn, which one first alternating (so load from other processes and any
    first-call cost hit both alike): outputs, wall s/image, this process's CPU s/image (robust to other load)."""
    outs, times, cpu = ([], []), [0.0, 0.0], [0.0, 0.0]
    for i, img in enumerate(images):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0, c0 = time.perf_counter(), time.process_time()
            outs[k].append((fa, fb)[k](img))
            sync()
            times[k] += time.perf_counter() - t0
            cpu[k] += time.process_time() - c0
    n = len(images)
    return outs[0], times[0] / n, outs[1], times[1] / n, cpu[0] / n, cpu[1] / n


def _fraction(hits: int, total: int):
    return hits / total if total else None


def compare_with_stock(model, cfg, images, warm_up: bool = True, sync=lambda: None) -> dict:
    """fmalib's generator vs segment_anything's on ``images`` with the same ``cfg`` (min_mask_region_area 0).

    Times ``generate_unfiltered`` (the stock generator's work: grid, decoder, thresholds, NMS, crops) and the
    overlap filter apart; matches masks by IoU: fmalib's whole masks to any stock mask (>= 0.9), the stock masks
    to fmalib's whole / any-level masks, and identical masks (IoU 1)."""
    cfg = dict(cfg, min_mask_region_area=0)
    ours, stock = MultiLevelMaskGenerator(model, **{k: cfg[k] for k in MASK_KEYS}), stock_generator(model, cfg)
    empty_crashes = []

    def stock_generate(image):
        # segment_anything 1.0 indexes an empty (0,) crop-box tensor when no mask survives on an image with
        # several crops (an untrained SAM at the paper's thresholds): that is zero masks, counted apart.
        try:
            return stock.generate(image)
        except IndexError:
            empty_crashes.append(1)
            return []

    if warm_up:
        ours.generate_unfiltered(images[0]), stock_generate(images[0])
        sync()
    raw, t_ours, theirs, t_stock, cpu_ours, cpu_stock = _timed_pair(ours.generate_unfiltered, stock_generate,
                                                                    images, sync)
    t0 = time.perf_counter()
    kept = [m.select(overlap_filter(m.rles(), m.levels, cfg["overlap_thresh"])) if len(m) else m for m in raw]
    t_filter = (time.perf_counter() - t0) / len(images)
    c = dict.fromkeys(("whole", "whole_in_stock", "stock", "stock_in_whole", "stock_in_any", "any", "any_in_stock",
                       "stock_exact_in_any"), 0)
    per_level, per_level_kept = np.zeros(3), np.zeros(3)
    for m, recs in zip(raw, theirs):
        ours_bool = m.to_bool() if len(m) else np.zeros((0, m.height, m.width), bool)
        stock_bool = np.stack([r["segmentation"] for r in recs]) if recs else np.zeros((0, *ours_bool.shape[1:]), bool)
        whole = np.asarray(m.levels) == WHOLE
        iou = mask_iou(ours_bool, stock_bool)
        iou_whole = iou[whole]
        c["whole"] += int(whole.sum())
        c["any"] += len(ours_bool)
        c["stock"] += len(stock_bool)
        if iou.size:
            c["whole_in_stock"] += int((iou_whole.max(1) >= MATCH_IOU).sum()) if len(iou_whole) else 0
            c["stock_in_whole"] += int((iou_whole.max(0) >= MATCH_IOU).sum()) if len(iou_whole) else 0
            c["stock_in_any"] += int((iou.max(0) >= MATCH_IOU).sum())
            c["any_in_stock"] += int((iou.max(1) >= MATCH_IOU).sum())
            c["stock_exact_in_any"] += int((iou.max(0) >= 1.0 - 1e-6).sum())
        per_level += np.bincount(np.asarray(m.levels, np.int64), minlength=3)[:3]
    for m in kept:
        per_level_kept += np.bincount(np.asarray(m.levels, np.int64), minlength=3)[:3]
    n = len(images)
    return {
        "images": n, "image_size": list(images[0].shape[:2]),
        "settings": {k: cfg[k] for k in (*STOCK_KEYS, "whole_iou_bonus", "whole_nms_bonus", "overlap_thresh",
                                          "min_mask_region_area")},
        "fmalib_s_per_image": t_ours, "stock_s_per_image": t_stock, "fmalib_vs_stock_time_ratio": t_ours / t_stock,
        "fmalib_cpu_s_per_image": cpu_ours, "stock_cpu_s_per_image": cpu_stock,
        "fmalib_vs_stock_cpu_time_ratio": cpu_ours / cpu_stock if cpu_stock else None,
        "fmalib_overlap_filter_s_per_image": t_filter,
        "fmalib_with_filter_vs_stock_time_ratio": (t_ours + t_filter) / t_stock,
        "masks_per_image": {"stock": c["stock"] / n,
                            "fmalib_before_overlap_filter": dict(zip(LEVELS, (per_level / n).round(2).tolist())),
                            "fmalib_after_overlap_filter": dict(zip(LEVELS, (per_level_kept / n).round(2).tolist()))},
        "stock_no_mask_index_errors": len(empty_crashes),
        "match_iou": MATCH_IOU,
        "fmalib_whole_with_a_stock_mask": _fraction(c["whole_in_stock"], c["whole"]),
        "stock_with_an_fmalib_whole_mask": _fraction(c["stock_in_whole"], c["stock"]),
        "stock_with_an_fmalib_mask_any_level": _fraction(c["stock_in_any"], c["stock"]),
        "fmalib_any_level_with_a_stock_mask": _fraction(c["any_in_stock"], c["any"]),
        "stock_identical_to_an_fmalib_mask": _fraction(c["stock_exact_in_any"], c["stock"]),
    }


class EncoderMemo:
    """SAM's image-encoder outputs kept by input content: ``record`` stores them (every call still computes),
    ``replay`` returns the stored ones, so a second comparison on the same images skips the encoder (its times
    are then the decoder and post-processing alone)."""

    def __init__(self, model):
        self.encoder, self.forward = model.image_encoder, model.image_encoder.forward
        self.store, self.replaying = {}, False
        self.encoder.forward = self

    def __call__(self, x):
        key = (tuple(x.shape), hash(x.detach().cpu().numpy().tobytes()))
        if self.replaying and key in self.store:
            return self.store[key]
        out = self.forward(x)
        self.store[key] = out
        return out

    def close(self):
        del self.encoder.forward


def vit_b_images(n: int, size=(375, 500)) -> list[np.ndarray]:
    """Synthetic benchmark images at VOC's typical 500x375, outside the toy's train / val indices."""
    return [generate_sample(0, 5_000_000 + i, size).image for i in range(n)]


def stock_comparison(params, toy_images, n_vit_b: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = dict(params["masks"])
    ident = sam_fingerprint(params)
    if "random_init_seed" in ident:  # a random tiny SAM passes no real threshold
        cfg.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    tiny = load_sam_from_params(params, "cpu")
    out = {"note": "both generators with min_mask_region_area=0: segment_anything's small-region clean-up needs "
                   "OpenCV (cv2), which is not installed; fmalib's own clean-up (scipy) is timed in `runs`",
           "threads": threads,
           "tiny_sam": compare_with_stock(tiny, cfg, toy_images),
           # with both whole bonuses at 0 fmalib's masks (all levels) must be the stock ones (identical = 1.0)
           "tiny_sam_bonuses_off": compare_with_stock(tiny, dict(cfg, whole_iou_bonus=0.0, whole_nms_bonus=0.0),
                                                      toy_images)}
    out["tiny_sam"]["sam"] = {k: v for k, v in ident.items() if k != "sha256"}
    if n_vit_b:
        torch.manual_seed(0)
        vit_b = load_sam("vit_b", None, "cpu")
        cfg_b = dict(load_params("params/voc.yaml")["masks"], points_per_side=8, points_per_batch=64, crop_n_layers=0,
                     pred_iou_thresh=0.0, stability_score_thresh=0.0)
        images = vit_b_images(n_vit_b)
        memo = EncoderMemo(vit_b)
        out["vit_b_random_init"] = compare_with_stock(vit_b, cfg_b, images, warm_up=False)
        # a random SAM's masks are near-copies of each other, so NMS leaves few and the stock (score = predicted
        # IoU) and fmalib (whole bonus) keep different ones; with the bonuses off they must agree mask for mask.
        # Both on the stored encoder outputs: their times are the decoder and post-processing alone.
        memo.replaying = True
        out["vit_b_random_init_after_encoder"] = compare_with_stock(vit_b, cfg_b, images, warm_up=False)
        out["vit_b_random_init_bonuses_off_after_encoder"] = compare_with_stock(
            vit_b, dict(cfg_b, whole_iou_bonus=0.0, whole_nms_bonus=0.0), images, warm_up=False)
        memo.close()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params/toy.yaml")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--compare-images", type=int, default=4, help="toy images of the stock comparison")
    parser.add_argument("--vit-b-images", type=int, default=2, help="500x375 images for vit_b vs stock (0: skip)")
    parser.add_argument("--compare-threads", type=int, default=1,
                        help="torch threads of the stock comparison (1: its CPU seconds are the work, whatever the "
                             "load from other processes)")
    parser.add_argument("--out", default=str(repo_root() / "reports" / "bench" / "masks.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    dataset = open_dataset(params, params["data"]["train_split"])
    images = [dataset[i]["image"] for i in range(min(args.images, len(dataset)))]
    ident = sam_fingerprint(params)
    settings = [{}]
    if "random_init_seed" in ident:  # a random SAM passes no real threshold: measure with all of them off
        settings.append({"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
    runs = [run(params, images, t, o) for o in settings for t in args.threads]
    result = {"params": args.params, "sam": {k: v for k, v in ident.items() if k != "sha256"},
              "sam_random_init": "random_init_seed" in ident, "images": len(images),
              "image_size": [int(np.mean([i.shape[0] for i in images])), int(np.mean([i.shape[1] for i in images]))],
              "masks": {k: params["masks"][k] for k in ("points_per_side", "points_per_batch", "crop_n_layers")},
              "runs": runs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_1min": os.getloadavg()[0]}
    if args.compare_images:
        result["stock_comparison"] = stock_comparison(params, images[:args.compare_images], args.vit_b_images,
                                                      args.compare_threads)
        result["load_average_1min_after"] = os.getloadavg()[0]
    write_bench(args.out, result)
    return result


if __name__ == "__main__":
    main()
