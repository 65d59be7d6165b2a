"""The method end to end under one params set, as one column of numbers (notebook 07, bench/settings.py).

The toy departs from the paper's settings where the tiny CLIP needs it (each departure is a named key in
params/toy.yaml with its measured reason; ``paper_settings`` lists the paper's values of those keys). The
study shows both columns: ``settings_column(params)`` for the toy's choices and
``settings_column(paper_params(params))`` for the paper's, each computing (or reading from the stage
caches, which are keyed by what changes the result) the same orderings:

- learned cls prompts vs hand prompts: val classification mAP and CAM-argmax seed mIoU (val);
- CAA vs none, seg prompts vs cls prompts: CAM-argmax seed mIoU (val), CLIP-ES protocol;
- SAMS vs CAM argmax: coarse (cls CAMs) and fine (seg CAMs) seeds on the train split;
- fine vs coarse seeds; stage 2 trained on the fine seeds vs on ground truth (val).
"""
from __future__ import annotations

import logging
from typing import Any

from ..core.params import Params, load_params
from ..data import open_dataset
from ..method.metrics import mean_iou
from ..stages.prompt_runs import build_prompts
from ..models.checkpoints import load_clip_from_params
from ..segment import evaluate_segmenter, run_dir, train_segmenter
from ..stages.cams import run_cam_stage
from ..stages.cam_argmax import argmax_seed_miou
from ..stages.masks import run_mask_stage
from ..stages.prompt_runs import load_context
from ..stages.prompts import classification_map, train_prompts
from ..stages.seeds import make_seeds
from ..stages.cam_argmax import cam_argmax_seed_dir
from ..stages.seed_eval import evaluate_seeds

log = logging.getLogger(__name__)


def paper_params(params: Params) -> Params:
    """``params`` with its ``paper_settings`` overrides applied (the paper's values where the toy departs)."""
    out = load_params(params.to_dict(), dict(params["paper_settings"]))
    out.path = params.path
    return out


def settings_column(params: Params, stage2: bool = True) -> dict:
    """Every number of the orderings above for ``params`` (see the module docstring); stages are cached."""

    model = load_clip_from_params(params)
    split, val_split = params["data"]["train_split"], params["data"]["val_split"]
    train_ds, val_ds = open_dataset(params, split), open_dataset(params, val_split)
    caa = {kind: bool(on) for kind, on in params["cam"]["use_caa"].items()}
    out: dict[str, Any] = {"use_caa": caa, "target_layer": params["cam"]["target_layer"],
                           "cls_lr": params["prompts"]["cls"]["lr"], "seg_lr": params["prompts"]["seg"]["lr"],
                           "cls_loss": params["prompts"]["cls"]["loss"]}

    cls_run = train_prompts(params, "cls", model=model)
    hand = build_prompts("hand", model, params)
    cls = load_context(build_prompts("cls", model, params), cls_run.context_path)
    out["map_hand"] = classification_map(model, hand, val_ds)["map"]
    out["map_cls"] = classification_map(model, cls, val_ds)["map"]
    out["cls_fg_similarity_last"] = cls_run.fg_similarity[-1]
    argmax = {k: argmax_seed_miou(params, k, model=model) for k in ("hand", "cls")}

    whole = (0, 1)  # one process, every image, whatever the launcher: each stage reads the previous one whole
    run_mask_stage(params, split, whole)
    cls_cams = run_cam_stage(params, split, "cls", whole, model=model)
    coarse = make_seeds(params, split, cls_cams, "coarse", shard=whole)
    train_gt = train_ds.has_masks  # a tags-only train split: no seed mIoU, no GT-tuned CAM argmax, no GT run
    out["coarse_miou"] = train_miou(train_ds, coarse.dir)
    out["coarse_bg_power"] = coarse.bg_power
    if train_gt:
        cls_argmax_dir, _, _ = cam_argmax_seed_dir(params, split, cls_cams)
        out["cls_argmax_train_miou"] = mean_iou(evaluate_seeds(train_ds, cls_argmax_dir))

    seg_run = train_prompts(params, "seg", seeds_dir=coarse.dir, model=model)
    argmax["seg"] = argmax_seed_miou(params, "seg", seeds_dir=coarse.dir, model=model)
    seg_cams = run_cam_stage(params, split, "seg", whole, ctx_path=seg_run.cam_context_path, model=model)
    fine = make_seeds(params, split, seg_cams, "fine", shard=whole)
    out["fine_miou"] = train_miou(train_ds, fine.dir)
    out["fine_bg_power"] = fine.bg_power
    if train_gt:
        seg_argmax_dir, _, _ = cam_argmax_seed_dir(params, split, seg_cams)
        out["seg_argmax_train_miou"] = mean_iou(evaluate_seeds(train_ds, seg_argmax_dir))
    for kind, res in argmax.items():
        for variant in ("no_caa", "caa"):
            out[f"argmax_val_{kind}_{variant}"] = res[variant]["val_miou"] if res else None

    if stage2:
        runs = {"seeds": run_dir(params, "seeds", fine.dir), **({"gt": run_dir(params, "gt", None)} if train_gt else {})}
        for name, run in runs.items():
            train_segmenter(params, fine.dir if name == "seeds" else None, run)
            if val_ds.has_masks:
                out[f"stage2_{name}_val_miou"] = evaluate_segmenter(params, run, val_split)["miou"]
    log.info("settings column (%s, CAA %s, cls lr %g, seg lr %g): coarse %s, fine %s", out["target_layer"], caa,
             out["cls_lr"], out["seg_lr"], out["coarse_miou"], out["fine_miou"])
    return out


def train_miou(dataset, seed_dir) -> float | None:
    """Seed mIoU against the split's masks; None for a split without masks (tags only)."""
    return mean_iou(evaluate_seeds(dataset, seed_dir)) if dataset.has_masks else None


def cls_loss_variant(params: Params, loss: str) -> dict:
    """The cls prompts trained with ``prompts.cls.loss = loss`` (e.g. the ``bg_negatives`` ablation): val mAP,
    the mean cosine between class prompts after training, and CAM-argmax seed mIoU (val, no CAA / CAA)."""
    variant = load_params(params.to_dict(), {"prompts.cls.loss": loss})
    model = load_clip_from_params(variant)
    run = train_prompts(variant, "cls", model=model)
    prompts = load_context(build_prompts("cls", model, variant), run.context_path)
    val_ds = open_dataset(variant, variant["data"]["val_split"])
    seeds = argmax_seed_miou(variant, "cls", model=model)
    return {"loss": loss, "map_cls": classification_map(model, prompts, val_ds)["map"],
            "fg_similarity_first": run.fg_similarity[0], "fg_similarity_last": run.fg_similarity[-1],
            "argmax_val_cls_no_caa": seeds["no_caa"]["val_miou"] if seeds else None,
            "argmax_val_cls_caa": seeds["caa"]["val_miou"] if seeds else None}
