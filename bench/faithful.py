"""What each of the original's small details is worth on the toy, each alone -> reports/bench/faithful.json

fmalib follows the original (HAL-42/FMA-WSSS with AlchemyCat, CLIP-ES) in these details; each is measured
against what fmalib did before, the rest as shipped:
- ``cam_input``: CAM input sides rounded **up** to the patch, PIL bicubic (the original) vs rounded to the
  nearest multiple, bilinear;
- ``caa_boxes``: ``scoremap2bbox`` boxes (uint8 map, strict threshold, ends clipped to W-1 / H-1) vs the full
  extent of each 8-connected region of the float map;
- ``caa_map``: the raw propagated map, scored where used (the original) vs ReLU + min-max on the patch grid;
as hand-prompt CAM-argmax seeds (CLIP-ES protocol: bg threshold picked on train, mIoU on val), without and
with CAA (the paper's CAA settings);
- ``cam_relu_order``: the raw CAM stored and scored where used — upsampled, then ReLU and min-max (the
  original's ``cam2score``) — vs ReLU and min-max on the patch grid before upsampling, as the coarse seeds
  (SAMS on the cls CAMs, train; the masks and cls prompts reused from the params' workdir);
- ``color_jitter``: AlchemyCat's RandColorJitter (the original) vs none (``prompts.color_jitter.p: 0``), as
  the whole settings column (cls mAP, coarse and fine seeds; stage 2 off).

The replaced variants are written here, not in fmalib (the library keeps one way to do each thing); they
run in their own workdirs, because a stage's cache key sees fmalib's code, not a patch applied here.
    python bench/faithful.py [--params params/toy.yaml] [--skip-jitter]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import fmalib.method.caa as caa_mod
import fmalib.method.image_cams as image_cams_mod
import fmalib.models.clip as clip_mod
import fmalib.stages.cams as cams_stage
from fmalib import study
from fmalib.core.params import load_params, repo_root
from fmalib.method.scores import min_max_norm
from fmalib.stages.cam_argmax import argmax_seed_miou
from fmalib.study.compare import settings_column
from fmalib.study.results import write_bench


def nearest_input_size(model, height, width, max_side=None):
    """Sides rounded to the nearest multiple of the patch (at least one), long side capped at max_side."""
    p = clip_mod.patch_size(model)
    h, w = float(height), float(width)
    n_max = None if max_side is None else max(1, int(max_side) // p)
    if max_side is not None and max(h, w) > max_side:
        h, w = h * max_side / max(h, w), w * max_side / max(h, w)
    hh, ww = (max(1, int(round(v / p))) for v in (h, w))
    if n_max is not None:
        hh, ww = min(hh, n_max), min(ww, n_max)
    return hh * p, ww * p


def bilinear_to_input(model, image, max_side=None):
    mean, std = clip_mod.image_normalization(model)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    hh, ww = nearest_input_size(model, *image.shape[:2], max_side)
    if (hh, ww) != image.shape[:2]:
        x = F.interpolate(x, size=(hh, ww), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.to(next(model.parameters()).device)


def full_extent_box_mask(cam, threshold):
    """Union of the full bounding boxes of the 8-connected regions where cam > threshold · max(cam)."""
    cam = np.asarray(cam, np.float32)
    out = np.zeros(cam.shape, bool)
    if cam.max() <= 0:
        return out
    lab, _ = ndimage.label(cam > threshold * cam.max(), structure=np.ones((3, 3), bool))
    for sl in ndimage.find_objects(lab):
        if sl is not None:
            out[sl] = True
    return out


@contextlib.contextmanager
def patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def variant_contexts():
    """{detail: (the original's behaviour, the replaced one)} as context managers over fmalib's functions."""
    refine = caa_mod.caa_refine

    def normalised_refine(score, affinity, threshold, source=None):
        return min_max_norm(refine(score, affinity, threshold, source))

    def before_input():
        stack = contextlib.ExitStack()
        stack.enter_context(patched(clip_mod, input_size=nearest_input_size, to_input=bilinear_to_input))
        stack.enter_context(patched(cams_stage, input_size=nearest_input_size))
        return stack

    return {"cam_input": before_input,
            "caa_boxes": lambda: patched(caa_mod, box_mask=full_extent_box_mask),
            "caa_map": lambda: patched(image_cams_mod, caa_refine=normalised_refine)}


def coarse_seeds(params, workdir: str) -> float:
    """Coarse-seed mIoU (%) with this workdir's CAMs; the masks and cls prompts are linked from the params'
    own workdir (content-keyed caches: a link is a hit) so only CAMs and seeds are computed."""
    from fmalib.data import open_dataset
    from fmalib.method.metrics import mean_iou
    from fmalib.stages.cams import run_cam_stage
    from fmalib.stages.seed_eval import evaluate_seeds
    from fmalib.stages.seeds import make_seeds

    Path(workdir).mkdir(parents=True)
    for name in ("masks", "prompts_cls", "fingerprints"):
        (Path(workdir) / name).symlink_to(Path(params.resolve_path("workdir")) / name)
    p = load_params(params.to_dict(), {"workdir": workdir})
    split = p.data.train_split
    cams = run_cam_stage(p, split, "cls", (0, 1))
    return 100 * mean_iou(evaluate_seeds(open_dataset(p, split), make_seeds(p, split, cams, "coarse").dir))


def hand_seeds(params, workdir: str) -> dict:
    p = load_params(params.to_dict(), {"workdir": workdir, "cam.use_caa.hand": True})
    res = argmax_seed_miou(p, "hand")
    return {"no_caa": 100 * res["no_caa"]["val_miou"], "caa": 100 * res["caa"]["val_miou"]}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--skip-jitter", action="store_true", help="only the CAM details (no prompt training)")
    ap.add_argument("--skip-cam", action="store_true", help="only the colour jitter")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = study.setup(args.params)
    t0 = time.perf_counter()
    out: dict = {"params": args.params, "unit": "val mIoU (%) of hand-prompt CAM-argmax seeds", "details": {}}
    root = tempfile.mkdtemp(prefix="fmalib-faithful-")
    previous = repo_root() / "reports" / "bench" / "faithful.json"
    if previous.is_file():  # what this run skips is kept from the last one
        out["details"].update(json.loads(previous.read_text())["details"])
    try:
        original = None if args.skip_cam else hand_seeds(params, f"{root}/original")
        for name, before in ({} if args.skip_cam else variant_contexts()).items():
            with before():
                replaced = hand_seeds(params, f"{root}/{name}")
            out["details"][name] = {"original": original, "replaced": replaced}
            print(f"{name:12s} no CAA {original['no_caa']:.1f} (replaced: {replaced['no_caa']:.1f})   "
                  f"CAA {original['caa']:.1f} (replaced: {replaced['caa']:.1f})", flush=True)
        if not args.skip_cam:
            original_coarse = coarse_seeds(params, f"{root}/coarse_original")
            real = cams_stage.image_cams

            def normalised_on_grid(*a, **kw):
                res = real(*a, **kw)
                return {**res, "cam": min_max_norm(res["cam"]), "cam_caa": min_max_norm(res["cam_caa"])}

            with patched(cams_stage, image_cams=normalised_on_grid):
                replaced_coarse = coarse_seeds(params, f"{root}/coarse_replaced")
            out["details"]["cam_relu_order"] = {"unit": "coarse-seed mIoU (%), train", "original": original_coarse,
                                                "replaced": replaced_coarse}
            print(f"cam_relu_order coarse seeds {original_coarse:.1f} (replaced: {replaced_coarse:.1f})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.skip_jitter:
        cols = {}
        for name, p in (("original", params), ("replaced", load_params(params.to_dict(),
                                                                        {"prompts.color_jitter.p": 0.0}))):
            col = settings_column(p, stage2=False)
            cols[name] = {k: (100 * v if "miou" in k else v) for k, v in col.items()
                          if isinstance(v, float) and not math.isnan(v) and ("miou" in k or "map" in k)}
        out["details"]["color_jitter"] = {"unit": "mAP (0-1) and mIoU (%) of the settings column", **cols}
        print("color_jitter " + "  ".join(f"{k} {cols['original'][k]:.3f} (replaced: {cols['replaced'].get(k, float('nan')):.3f})"
                                          for k in cols["original"]), flush=True)
    out["seconds"] = time.perf_counter() - t0
    write_bench("faithful", out)
    return out


if __name__ == "__main__":
    main()
