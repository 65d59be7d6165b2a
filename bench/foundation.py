"""Quality of the shipped tiny CLIP(s) and SAM -> reports/bench/foundation.json.

Each CLIP is measured on val with hand prompts, before any prompt learning: zero-shot mAP, Grad-CAM peak inside
the object at both ``cam.target_layer`` choices (``ln1_out``, the original's; ``block_input``, the residual
stream entering the last block), and CAM-argmax seed mIoU (CLIP-ES protocol: bg threshold picked on train,
reported on val) at ``ln1_out`` without and with CAA. The params' CLIP and every ``variants`` entry that
swaps the CLIP (toy: ``first_tiny_clip``, the dense-patch-loss model) are measured side by side.

Usage: python bench/foundation.py [--params params/toy.yaml] [--n-images N]
"""
from __future__ import annotations

import argparse
import time

from fmalib import study
from fmalib.core.params import repo_root, with_variant
from fmalib.data import open_dataset
from fmalib.models.checkpoints import clip_checkpoint, load_clip_from_params, load_sam_from_params
from fmalib.models.clip import clip_identity, get_tokenizer
from fmalib.pretrain.clip_quality import cam_peak_hit_rate, zero_shot_map
from fmalib.pretrain.sam_quality import sam_quality
from fmalib.stages.cam_argmax import argmax_seed_miou
from fmalib.study.results import write_bench

# issue 15's targets for the CLIP (val, hand prompts); issue 7's for SAM
CLIP_TARGETS = {"cam_hit_rate_ln1_out": (">=", 0.70), "hand_seed_miou_ln1_out": (">=", 0.50),
                "zero_shot_map": ("in", (0.75, 0.93)), "weights_mb": ("<=", 25.0)}
SAM_TARGETS = {"sam_point_best_of_3": 0.75, "sam_amg_recall": 0.80}


def meets(value: float, rule: tuple) -> bool:
    op, ref = rule
    return {">=": lambda: value >= ref, "<=": lambda: value <= ref, "in": lambda: ref[0] <= value <= ref[1]}[op]()


def clip_numbers(params, n_images: int) -> dict:
    """One CLIP's numbers (its own params: model, checkpoint, workdir caches)."""
    clip = load_clip_from_params(params)
    tok = get_tokenizer(params.clip.model)
    val = open_dataset(params, params.data.val_split)
    items = [val[i] for i in range(min(n_images, len(val)))]
    images, labels, gts = [it["image"] for it in items], [list(it["labels"]) for it in items], [it["gt"] for it in items]
    names, bg = params.classes.names, params.classes.bg_words
    out = {"model": params.clip.model, "checkpoint": str(params.clip.checkpoint),
           "vision_layers": clip_identity(clip, params.clip.model)["vision layers"],
           "weights_mb": clip_checkpoint(params).stat().st_size / 1e6,
           "zero_shot_map": zero_shot_map(clip, tok, images, labels, names)["map"]}
    for layer in ("ln1_out", "block_input"):
        out[f"cam_hit_rate_{layer}"] = cam_peak_hit_rate(clip, tok, images, labels, gts, names, bg,
                                                         target_layer=layer)["hit_rate"]
        seeds = argmax_seed_miou(study.setup(params.to_dict(), overrides={"cam.target_layer": layer}), "hand",
                                 model=clip)
        out[f"hand_seed_miou_{layer}"] = seeds["no_caa"]["val_miou"]
        out[f"hand_seed_miou_{layer}_caa"] = seeds["caa"]["val_miou"]
    out["meets"] = {k: meets(out[k], rule) for k, rule in CLIP_TARGETS.items()}
    return out


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--n-images", type=int, default=None, help="val images (default: the params' eval sizes)")
    args = ap.parse_args()
    params = study.setup(args.params)
    t0 = time.perf_counter()
    n_clip = args.n_images or params.foundation.clip.eval.n_images
    clips = {"params": clip_numbers(params, n_clip)}
    for name in params.variants:
        variant = with_variant(params, name)
        if variant.clip != params.clip:
            clips[name] = clip_numbers(variant, n_clip)
    sam = load_sam_from_params(params)
    sq = sam_quality(sam, params, n_images=args.n_images)
    sam_measured = {"sam_point_best_of_3": sq["point"]["best_of_3"], "sam_amg_recall": sq["amg"]["recall"],
                    "sam_amg_multilevel_recall": sq["amg_multilevel"]["recall"],
                    "sam_iou_calibration_r": sq["calibration"]["pearson"]}
    files = {p.name: p.stat().st_size for p in (repo_root() / "assets").glob("*") if p.is_file()}
    out = {"clip": clips, "clip_targets": CLIP_TARGETS, "sam": sam_measured, "sam_targets": SAM_TARGETS,
           "sam_meets": {k: sam_measured[k] >= v for k, v in SAM_TARGETS.items()}, "asset_bytes": files,
           "clip_images": min(n_clip, len(open_dataset(params, params.data.val_split))), "sam_images": sq["n_images"],
           "seconds": time.perf_counter() - t0}
    write_bench("foundation", out)
    return out


if __name__ == "__main__":
    main()
