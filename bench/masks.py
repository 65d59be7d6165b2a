"""Toy SAM mask stage: images/s on this CPU, masks per level, and cache bytes per image vs raw masks.

Runs ``fmalib.method.generator.MultiLevelMaskGenerator`` with params/toy.yaml's settings on the first ``--images``
train images (the tiny SAM from assets/tiny_sam.pth, or a random-init one while it is missing — then also
with every threshold at 0, so that masks survive). Writes reports/bench/masks.json.
    python bench/masks.py [--images 20] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import time

import numpy as np
import torch

from fmalib.core.params import load_params, repo_root
from fmalib.data import open_dataset
from fmalib.method.generator import MultiLevelMaskGenerator
from fmalib.models.checkpoints import load_sam_from_params, sam_fingerprint
from fmalib.study.results import write_bench


def cache_bytes(masks) -> int:
    """Bytes of the image's cache file (compressed npz, as StageCache writes it)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **masks.to_arrays())
    return len(buf.getvalue())


def run(params, images, threads: int, overrides: dict) -> dict:
    torch.set_num_threads(threads)
    cfg = dict(params["masks"], **overrides)
    generator = MultiLevelMaskGenerator(load_sam_from_params(params, "cpu"), cfg)
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params/toy.yaml")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
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
    write_bench(args.out, result)
    return result


if __name__ == "__main__":
    main()
