"""Figures the notebooks show: panels (lists of images + titles) for ``fmalib.study.viz.image_grid``, and the
prompt-training curves."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm.auto import tqdm

from ..method.masks import LEVELS, MaskSet
from ..method.prompts import HAND_TEMPLATE
from ..method.scores import cam_scores
from ..models.clip import to_input
from ..pretrain.clip_quality import hand_prompt_gradcam, text_features
from ..pretrain.sam_quality import center_point, predict_points
from ..stages.cams import load_cams
from ..stages.masks import load_masks
from .viz import heatmap, mask_mosaic, overlay


def sample_panels(dataset, n: int = 8, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n random samples as (image, GT overlay) panel pairs with titles, for ``fmalib.study.viz.image_grid``."""
    rng = np.random.default_rng(seed)
    images, titles = [], []
    for i in sorted(rng.choice(len(dataset), size=min(n, len(dataset)), replace=False).tolist()):
        item = dataset[i]
        names = ", ".join(dataset.class_names[j - 1] for j in item["labels"])
        images += [item["image"], overlay(item["image"], item["gt"]) if item["gt"] is not None else item["image"]]
        titles += [f"{item['id']}\n{names}", "GT" if item["gt"] is not None else "no mask (tags only)"]
    return images, titles


def hand_prompt_cam_panels(model, tokenizer: Callable, item: dict, class_names: Sequence[str],
                           bg_words: Sequence[str], template: str = HAND_TEMPLATE,
                           target_layer: str = "ln1_out") -> tuple[list, list]:
    """Zero-shot hand-prompt Grad-CAM heat maps of one dataset item, one per present class (notebook 01)."""
    ids = [int(c) for c in item["labels"]]
    text = torch.cat([text_features(model, tokenizer, [class_names[c - 1] for c in ids], template),
                      text_features(model, tokenizer, bg_words, template)])
    cams = hand_prompt_gradcam(model, to_input(model, item["image"]), text, range(len(ids)), target_layer)
    h, w = item["image"].shape[:2]
    panels = []
    for cam in cams:
        up = F.interpolate(torch.from_numpy(cam)[None, None].float(), size=(h, w), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        panels.append(heatmap(item["image"], up / max(float(up.max()), 1e-8)))
    return [item["image"], *panels], ["image", *[class_names[c - 1] for c in ids]]


def point_prompt_panels(model: Sam, sample) -> tuple[list[np.ndarray], list[str]]:
    """For each instance of one sample: its centre point's three multimask outputs as mosaics (notebook 01)."""
    predictor = SamPredictor(model)
    predictor.set_image(sample.image)
    xy = np.array([center_point(inst.mask) for inst in sample.instances])
    masks, scores = predict_points(predictor, xy)
    panels, titles = [], []
    for k, (m, sc) in enumerate(zip(masks, scores)):
        for level, name in enumerate(("subpart", "part", "whole")):
            panels.append(mask_mosaic(sample.image, m[level:level + 1], seed=k))
            titles.append(f"object {k}: {name}\npredicted IoU {sc[level]:.2f}")
    return panels, titles


def amg_preview(model: Sam, images: Sequence[np.ndarray], masks_params, max_points_per_side: int = 16,
                seed: int = 0) -> tuple[list[np.ndarray], list[str], dict]:
    """segment_anything's automatic masks on a few images of any dataset (notebook 01), quickly: the
    ``masks`` params' thresholds, at most ``max_points_per_side`` points a side and no crop layers (the
    method's own multi-level masks are notebook 02's). Returns mosaics, titles and {masks_per_image,
    s_per_image, points_per_side}."""
    pps = min(int(masks_params["points_per_side"]), int(max_points_per_side))
    gen = SamAutomaticMaskGenerator(model, points_per_side=pps, pred_iou_thresh=masks_params["pred_iou_thresh"],
                                    stability_score_thresh=masks_params["stability_score_thresh"],
                                    box_nms_thresh=masks_params["box_nms_thresh"], crop_n_layers=0,
                                    min_mask_region_area=0, output_mode="binary_mask")
    panels, titles, counts = [], [], []
    t0 = time.perf_counter()
    for k, image in enumerate(tqdm(images, desc="SAM automatic masks (preview)")):
        records = sorted(gen.generate(image), key=lambda r: -r["area"])  # small masks painted last, on top
        masks = np.stack([r["segmentation"] for r in records]) if records else np.zeros((0, *image.shape[:2]), bool)
        panels += [image, mask_mosaic(image, masks, seed=seed + k)]
        titles += ["image", f"{len(records)} masks"]
        counts.append(len(records))
    seconds = (time.perf_counter() - t0) / max(1, len(images))
    return panels, titles, {"masks_per_image": float(np.mean(counts)) if counts else 0.0,
                            "s_per_image": seconds, "points_per_side": pps}


def level_mosaics(image: np.ndarray, masks: MaskSet) -> dict[str, np.ndarray]:
    """The image with its masks of each level painted in random colours, plus all levels together."""
    dense = masks.to_bool() if len(masks) else np.zeros((0, *image.shape[:2]), bool)
    out = {name: mask_mosaic(image, dense[masks.levels == lv]) for lv, name in enumerate(LEVELS)}
    order = np.argsort(-masks.levels.astype(np.int64), kind="stable")  # wholes below, subparts on top
    out["all"] = mask_mosaic(image, dense[order])
    return out


def cam_panels(item: dict, sources: dict) -> tuple[list, list]:
    """(images, titles) of one figure row: the image, its GT, then per source the max-over-classes CAM.

    sources: {title: (cams (K, h, w), labels)} — e.g. from ``load_cams`` of several CAM caches."""
    image = item["image"]
    images, titles = [image], ["image"]
    if item.get("gt") is not None:
        images.append(overlay(image, item["gt"]))
        titles.append("ground truth")
    for title, (cams, labels) in sources.items():
        heat = cam_scores(cams, image.shape[:2]).max(axis=0) if len(labels) else np.zeros(image.shape[:2])
        images.append(heatmap(image, heat))
        titles.append(title)
    return images, titles


def seed_panels(item: dict, cams: np.ndarray, labels: np.ndarray, seeds: dict[str, np.ndarray]):
    """(images, titles) for a figure row: image, GT (where the split has masks), the CAMs' max as a heat map,
    then each seed overlay."""
    image = item["image"]
    heat = cam_scores(cams, image.shape[:2]).max(axis=0) if len(labels) else np.zeros(image.shape[:2])
    gt = [] if item["gt"] is None else [overlay(image, item["gt"])]
    images = [image, *gt, heatmap(image, heat)] + [overlay(image, s) for s in seeds.values()]
    return images, ["image", *["ground truth"] * len(gt), "CAM (max over classes)", *seeds]


def hand_prompt_cam_rows(model, tokenizer: Callable, items: Sequence[dict], class_names: Sequence[str],
                         bg_words: Sequence[str]) -> tuple[list, list]:
    """``hand_prompt_cam_panels`` of several items, one after the other (notebook 01)."""
    images, titles = [], []
    for item in items:
        p, t = hand_prompt_cam_panels(model, tokenizer, item, class_names, bg_words)
        images += p
        titles += t
    return images, titles


def mask_level_rows(dataset, cache, n: int = 4) -> tuple[list, list]:
    """Per image: the image, all its cached masks, then each level's (notebook 02)."""
    images, titles = [], []
    for j in range(min(n, len(dataset))):
        item = dataset[j]
        masks = load_masks(cache, item["id"])
        mosaics = level_mosaics(item["image"], masks)
        counts = np.bincount(masks.levels, minlength=3)
        images += [item["image"], mosaics["all"], *(mosaics[name] for name in LEVELS)]
        titles += [item["id"], f"all ({len(masks)})", *(f"{name} ({c})" for name, c in zip(LEVELS, counts))]
    return images, titles


def cam_rows(dataset, sources: dict[str, tuple], n: int = 4) -> tuple[list, list]:
    """``cam_panels`` of the first ``n`` images for CAM caches ``{title: (StageCache, caa)}`` (notebooks 03, 05)."""
    images, titles = [], []
    for j in range(min(n, len(dataset))):
        item = dataset[j]
        p, t = cam_panels(item, {name: load_cams(cache, item["id"], caa=caa) for name, (cache, caa) in sources.items()})
        images += p
        titles += t
    return images, titles


def training_curves(run, loss_name: str, title: str):
    """A prompt-training run's loss (each iteration and a running mean), its learning rate, and the mean cosine
    between its class prompts (are they growing alike?), side by side."""
    fig, ax = plt.subplots(1, 3, figsize=(13, 3))
    loss = pd.Series(run.losses)
    ax[0].plot(loss, alpha=0.3, label="per iteration")
    ax[0].plot(loss.rolling(max(1, len(loss) // 20), min_periods=1).mean(), label="running mean")
    ax[0].set(xlabel="iteration", ylabel=loss_name, title=title)
    ax[0].legend()
    ax[1].plot(run.lrs)
    ax[1].set(xlabel="iteration", ylabel="learning rate", title="warm-up + cosine")
    ax[2].plot(run.fg_similarity)
    ax[2].set(xlabel="iteration", ylabel="mean cosine between class prompts", title="are the class prompts alike?")
    fig.tight_layout()
    return fig
