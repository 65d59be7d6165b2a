"""Quality of the shipped tiny CLIP and SAM against issue 7's targets -> reports/bench/foundation.json.

The CLIP's hand-prompt Grad-CAM hit rate is measured at both ``cam.target_layer`` choices: ``ln1_out`` (the
original's, the target of ``clip_cam_hit_rate``) and ``block_input`` (the residual stream entering the block).

Usage: python bench/foundation.py [--params params/toy.yaml] [--n-images N]
"""
from __future__ import annotations

import argparse
import time

from fmalib import study
from fmalib.core.params import repo_root
from fmalib.data import open_dataset
from fmalib.models.clip import get_tokenizer, load_clip
from fmalib.models.sam import load_sam
from fmalib.pretrain.clip_quality import cam_peak_hit_rate, clip_quality
from fmalib.pretrain.sam_quality import sam_quality
from fmalib.study.results import write_bench

TARGETS = {"clip_zero_shot_map": 0.85, "clip_cam_hit_rate": 0.70, "sam_point_best_of_3": 0.75,
           "sam_amg_recall": 0.80}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--n-images", type=int, default=None, help="val images (default: the params' eval sizes)")
    args = ap.parse_args()
    params = study.setup(args.params)
    t0 = time.perf_counter()
    clip = load_clip(params.clip.model, params.resolve_path("clip.checkpoint"), params.device)
    cq = clip_quality(clip, get_tokenizer(params.clip.model), open_dataset(params, params.data.val_split),
                      params.classes.names, params.classes.bg_words,
                      n_images=args.n_images or params.foundation.clip.eval.n_images)
    val = open_dataset(params, params.data.val_split)
    n_clip = min(args.n_images or params.foundation.clip.eval.n_images, len(val))
    items = [val[i] for i in range(n_clip)]
    block_input = cam_peak_hit_rate(clip, get_tokenizer(params.clip.model), [it["image"] for it in items],
                                    [list(it["labels"]) for it in items], [it["gt"] for it in items],
                                    params.classes.names, params.classes.bg_words, target_layer="block_input")
    sam = load_sam(params.sam.model_type, params.resolve_path("sam.checkpoint"), params.device)
    sq = sam_quality(sam, params, n_images=args.n_images)
    measured = {"clip_zero_shot_map": cq["zero_shot"]["map"], "clip_cam_hit_rate": cq["cam"]["hit_rate"],
                "clip_cam_hit_rate_block_input": block_input["hit_rate"],
                "sam_point_best_of_3": sq["point"]["best_of_3"], "sam_amg_recall": sq["amg"]["recall"],
                "sam_amg_multilevel_recall": sq["amg_multilevel"]["recall"],
                "sam_iou_calibration_r": sq["calibration"]["pearson"]}
    files = {p.name: p.stat().st_size for p in (repo_root() / "assets").glob("*") if p.is_file()}
    out = {"measured": measured, "targets": TARGETS,
           "meets": {k: measured[k] >= v for k, v in TARGETS.items()}, "asset_bytes": files,
           "clip_images": cq["n_images"], "sam_images": sq["n_images"], "seconds": time.perf_counter() - t0}
    write_bench("foundation", out)
    return out


if __name__ == "__main__":
    main()
