"""SAMS on CAMs from files (``python -m fmalib sams``) vs the same CAMs fed directly; SAM vs SAM 2 mask stage.

On a toy slice (params/toy.yaml, the first ``--images`` train images, in its own data root and workdir):

1. the mask stage (tiny SAM of assets/), fmalib's hand-prompt CAMs (``run_cam_stage(params, split, "hand")``),
   and SAMS seeds from the CAM cache directly (``make_seeds`` with the ``StageCache``);
2. the same CAMs written as CLIP-ES writes its files (``write_clip_es_cams``: ``np.save`` of ``{"keys":
   0-based int64, "attn_highres": float16}``) — ``grid``: the cached maps as they are (float16 already: equal
   maps), which must give equal labels, p and mIoU; ``highres``: resized to the image and min-max normalised
   per class as CLIP-ES does, which SAMS's scale invariance makes nearly equal (float16 rounding, and the
   ReLU-before-resize order) — reported, not asserted — both through ``refine_cam_files``, the function
   behind ``python -m fmalib sams --cam-format clip-es``;
3. mask-generator s/image on CPU (one thread) with params/toy.yaml's masks: SAM (segment_anything, the tiny
   one, trained and random-init) vs SAM 2 (the sam2 package, Hiera-tiny at random init, 128 px input as in
   params/toy.yaml's sam2 block) on the toy images, and SAM ViT-B vs SAM 2 Hiera-tiny at random init at
   their 1024 px input on ``--large-images`` synthetic 500x375 images (VOC's size). Random weights measure
   speed only: mask quality needs real weights (sam2.1_hiera_*.pt, sam_vit_*.pth).

Writes reports/bench/sams_external.json.
    python bench/sams_external.py [--images 40] [--timing-images 8] [--large-images 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import fmalib.study
from fmalib.core.params import load_params, repo_relative, repo_root
from fmalib.data import open_dataset
from fmalib.data.labels import read_label_png
from fmalib.data.synthetic import generate_sample
from fmalib.method.metrics import mean_iou
from fmalib.method.upsample import upsample_cams
from fmalib.models.checkpoints import load_sam_from_params
from fmalib.models.sam import load_sam
from fmalib.models.sam2 import load_sam2
from fmalib.stages.cam_files import refine_cam_files
from fmalib.stages.cams import caa_for, load_cams, run_cam_stage
from fmalib.stages.mask_generators import build_mask_generator
from fmalib.stages.masks import run_mask_stage
from fmalib.stages.seeds import make_seeds
from fmalib.stages.seed_eval import evaluate_seeds
from fmalib.study.results import write_bench


# --- fmalib's CAMs written as CLIP-ES writes them -------------------------------------------------------------
def scale_cam_image(cams: np.ndarray) -> np.ndarray:
    """CLIP-ES's pytorch_grad_cam.utils.image.scale_cam_image, per map: (x - min) / (1e-7 + max)."""
    return np.float32([(m - m.min()) / (1e-7 + (m - m.min()).max()) for m in cams]).reshape(cams.shape)


def write_clip_es_cams(cache, dataset, out_dir: Path, caa: bool, highres: bool = False) -> Path:
    """One CLIP-ES ``<id>.npy`` per image from the CAM ``StageCache``, as generate_cams_voc12.py saves it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for j, image_id in enumerate(dataset.ids):
        cams, labels = load_cams(cache, image_id, caa)
        if highres:  # CLIP-ES: resized to (ori_height, ori_width), normalised to [0, 1]
            cams = scale_cam_image(upsample_cams(np.maximum(cams, 0), dataset.load_image(j).shape[:2]))
        keys = torch.tensor([int(c) - 1 for c in labels], dtype=torch.int64)  # 0-based class indices
        # CLIP-ES stores float16; the grid form keeps the cache's raw float32 maps, so its seeds must equal
        dtype = np.float16 if highres else np.float32
        np.save(out_dir / f"{image_id}.npy", {"keys": keys.numpy(), "attn_highres": np.asarray(cams, dtype)})
    return out_dir


def compare_labels(dataset, dir_a: Path, dir_b: Path) -> dict:
    equal_images, agree, total = 0, 0, 0
    for image_id in dataset.ids:
        a, b = read_label_png(dir_a / f"{image_id}.png"), read_label_png(dir_b / f"{image_id}.png")
        equal_images += bool(np.array_equal(a, b))
        agree += int((a == b).sum())
        total += a.size
    return {"equal_images": equal_images, "images": len(dataset), "pixel_agreement": agree / total}


# --- mask generators' speed -----------------------------------------------------------------------------------
def time_generator(generator, images, warm_up: bool = True) -> dict:
    if warm_up:
        generator.generate(images[0])
    t0 = time.perf_counter()
    results = [generator.generate(img) for img in images]
    elapsed = time.perf_counter() - t0
    per_level = sum(np.bincount(m.levels, minlength=3)[:3] for m in results) / len(images)
    return {"s_per_image": elapsed / len(images), "masks_per_image": per_level.round(2).tolist(),
            "images": len(images), "image_size": list(images[0].shape[:2])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40, help="toy train images (data.synthetic.n_train)")
    ap.add_argument("--timing-images", type=int, default=8, help="toy images per generator timing")
    ap.add_argument("--large-images", type=int, default=1, help="500x375 images for ViT-B vs Hiera-t at 1024 px")
    ap.add_argument("--workdir", default="work/bench-sams-external", help="data root and caches (deleted first)")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="only write the train split's hand-prompt CAMs of --params (with --fast) as CLIP-ES files "
                         "into DIR, for `python -m fmalib sams` (README: Refine your own CAMs with SAMS)")
    ap.add_argument("--params", default="params/toy.yaml", help="with --export")
    ap.add_argument("--fast", action="store_true", help="with --export: the params file's fast: overrides")
    args = ap.parse_args(argv)
    if args.export:
        params = fmalib.study.setup(args.params, fast=args.fast)
        split = params["data"]["train_split"]
        cams = run_cam_stage(params, split, "hand")
        out_dir = write_clip_es_cams(cams, open_dataset(params, split), Path(args.export), caa_for(params, cams),
                                     highres=True)
        print(f"CLIP-ES CAM files of {split}: {out_dir}")
        return
    torch.set_num_threads(1)  # one thread: faster than two on a shared 2-core machine (bench/masks.py)
    work = Path(args.workdir) if Path(args.workdir).is_absolute() else repo_root() / args.workdir
    shutil.rmtree(work, ignore_errors=True)
    overrides = {"data.root": str(work / "data"), "workdir": str(work / "work"),
                 "data.synthetic.n_train": args.images, "data.synthetic.n_val": 1,
                 "sams.power_images": args.images}
    params = load_params("params/toy.yaml", overrides)
    split = params["data"]["train_split"]
    dataset = open_dataset(params, split)
    out = {"params": "params/toy.yaml", "overrides": {k: v for k, v in overrides.items() if "synthetic" in k},
           "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1}}

    # 1. fmalib's own CAMs straight from the cache
    t0 = time.perf_counter()
    masks = run_mask_stage(params, split)
    mask_s = time.perf_counter() - t0
    cams = run_cam_stage(params, split, "hand")
    caa = caa_for(params, cams)
    direct = make_seeds(params, split, cams, "fine", bg_power="auto")
    direct_miou = mean_iou(evaluate_seeds(dataset, direct.dir))
    out["fmalib_cams"] = {"source": "run_cam_stage(params, split, 'hand'), the StageCache", "caa": caa,
                          "bg_power": direct.bg_power, "fallback_images": direct.fallback_images,
                          "seed_miou": direct_miou, "mask_stage_s_per_image": mask_s / len(dataset)}

    # 2. the same CAMs as CLIP-ES files, through the CLI's function
    for form in ("grid", "highres"):
        files = write_clip_es_cams(cams, dataset, work / f"clip_es_{form}", caa, highres=form == "highres")
        summary = refine_cam_files(params, files, "clip-es", work / f"seeds_clip_es_{form}", split, "auto")
        out[f"clip_es_{form}"] = {"bg_power": summary["bg_power"], "fallback_images": summary["fallback_images"],
                                  "seed_miou": summary["seed_miou"], "masks_cache_reused":
                                  summary["masks_cache"] == repo_relative(masks.dir),
                                  **compare_labels(dataset, direct.dir, work / f"seeds_clip_es_{form}")}
    grid = out["clip_es_grid"]
    assert grid["equal_images"] == len(dataset) and grid["bg_power"] == direct.bg_power, \
        f"equal maps must give equal SAMS labels: {grid}"
    assert grid["seed_miou"] == direct_miou

    # 3. SAM vs SAM 2 mask generators, s/image on CPU
    images = [dataset[j]["image"] for j in range(min(args.timing_images, len(dataset)))]
    timing = {"toy": {}, "large": {}}
    trained = load_sam_from_params(params, "cpu")
    timing["toy"]["sam_tiny_trained"] = time_generator(build_mask_generator(params, trained), images)
    # random init: every threshold 0, so that the random models' masks survive and both do the same work
    zero = load_params(dict(params), {"masks.pred_iou_thresh": 0.0, "masks.stability_score_thresh": 0.0})
    torch.manual_seed(0)
    timing["toy"]["sam_tiny_random"] = time_generator(build_mask_generator(zero, load_sam("fmalib_tiny")), images)
    have_sam2 = importlib.util.find_spec("sam2") is not None
    out["sam2_installed"] = have_sam2
    if have_sam2:
        torch.manual_seed(0)
        timing["toy"]["sam2_hiera_t_random_128px"] = time_generator(
            build_mask_generator(load_params(dict(zero), {"masks.generator": "sam2"})), images)
    timing["toy"]["settings"] = ("params/toy.yaml masks (12x12 points, no crops); the random-init runs with "
                                 "pred_iou_thresh = stability_score_thresh = 0")
    large = [generate_sample(0, 10_000 + i, (375, 500)).image for i in range(args.large_images)]
    if large:  # no warm-up: a 1024 px encoder pass dominates
        pz = load_params(dict(zero), {"masks.points_per_side": 8, "masks.crop_n_layers": 0})
        torch.manual_seed(0)
        timing["large"]["sam_vit_b_random_1024px"] = time_generator(build_mask_generator(pz, load_sam("vit_b")),
                                                                    large, warm_up=False)
        if have_sam2:
            torch.manual_seed(0)
            pz2 = load_params(dict(pz), {"masks.generator": "sam2"})
            timing["large"]["sam2_hiera_t_random_1024px"] = time_generator(
                build_mask_generator(pz2, load_sam2("sam2.1_hiera_t", None, 1024)), large, warm_up=False)
        timing["large"]["settings"] = "8x8 points, every threshold 0 (random masks survive), no crops, no warm-up"
    timing["note"] = ("random weights measure speed only; mask quality needs real weights (SAM 2: "
                      "sam2.1_hiera_*.pt, SAM: sam_vit_*.pth)")
    out["mask_generators_cpu"] = timing
    write_bench("sams_external", out)


if __name__ == "__main__":
    main()
