"""Quality of a CLIP for the method, with hand prompts only (no prompt learning):

- ``zero_shot_map``: multi-label mAP of S_k = cos(image embedding, text_k) over a split (docs/method.md §1 image
  embedding: mean of projected patch tokens), prompts ``"a clean origami {}."`` (CLIP-ES's template).
- ``cam_peak_hit_rate``: hand-prompt Grad-CAM (``fmalib.method.cam.gradcam``, docs/method.md §4: at ``target_layer`` — the
  last block's ln_1 output by default, the original's — softmax over present fg classes + bg prompts,
  backprop the class probability, channel weights = mean gradient, ReLU) peaks inside the labelled object;
  one count per (image, present class).
Notebook 01 and bench/foundation.py call these; ``clip_quality`` runs both on a dataset.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from ..method.cam import gradcam
from ..method.metrics import average_precision, multi_hot
from ..method.prompts import HAND_TEMPLATE
from ..models import clip as C

log = logging.getLogger(__name__)


@torch.no_grad()
def text_features(model, tokenizer: Callable, words: Sequence[str], template: str = HAND_TEMPLATE) -> torch.Tensor:
    """(K, D) L2-normalised text embeddings of ``template.format(word)``."""
    tokens = tokenizer([template.format(w) for w in words]).to(next(model.parameters()).device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def image_embeddings(model, images: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, D) L2-normalised image embeddings (mean of projected patch tokens), one image at a time (sizes vary)."""
    out = [C.encode_image_tokens(model, C.to_input(model, im)).image_embed.float()
           for im in tqdm(images, desc="clip image embeddings", leave=False)]
    return F.normalize(torch.cat(out), dim=-1)


def zero_shot_map(model, tokenizer: Callable, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
                  class_names: Sequence[str], template: str = HAND_TEMPLATE, embeds: torch.Tensor | None = None) -> dict:
    """{"map", "ap": per class} of hand-prompt cosine scores; ``embeds`` reuses ``image_embeddings``."""
    emb = image_embeddings(model, images) if embeds is None else embeds
    scores = (emb @ text_features(model, tokenizer, class_names, template).T).cpu().numpy()
    y = multi_hot(labels, len(class_names))
    ap = [average_precision(scores[:, k], y[:, k]) for k in range(len(class_names))]
    return {"map": float(np.nanmean(ap)), "ap": dict(zip(class_names, ap))}


def hand_prompt_gradcam(model, x: torch.Tensor, text: torch.Tensor, classes: Sequence[int],
                        target_layer: str = "ln1_out") -> np.ndarray:
    """Grad-CAMs (len(classes), h, w), ReLU'd, of one image ``x`` (1, 3, H, W) by ``fmalib.method.cam.gradcam``.

    ``text`` (K, D) normalised prompts whose softmax the CAM differentiates: the image's present fg classes
    and the bg prompts; ``classes`` index rows of ``text``; ``target_layer`` as params ``cam.target_layer``.
    """

    with torch.no_grad():
        out = C.encode_image_tokens(model, x)
    classes = torch.as_tensor(list(classes), dtype=torch.long)
    cams = gradcam(model, out.block_input, out.grid, text, torch.zeros_like(classes), classes,
                   target_layer=target_layer)
    return F.relu(cams).detach().cpu().numpy()


def peak_in_object(cam: np.ndarray, gt: np.ndarray, class_id: int) -> bool:
    """Bilinear upsampling of ``cam`` to the GT size; its argmax pixel is (next to, if 255) class ``class_id``."""
    up = F.interpolate(torch.from_numpy(cam)[None, None].float(), size=gt.shape, mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    if gt[y, x] == class_id:
        return True
    if gt[y, x] == IGNORE:  # thin boundary band: count it when the object touches the peak pixel
        return bool((gt[max(0, y - 1):y + 2, max(0, x - 1):x + 2] == class_id).any())
    return False


def cam_peak_hit_rate(model, tokenizer: Callable, images: Sequence[np.ndarray], labels: Sequence[Sequence[int]],
                      gts: Sequence[np.ndarray], class_names: Sequence[str], bg_words: Sequence[str],
                      template: str = HAND_TEMPLATE, target_layer: str = "ln1_out") -> dict:
    """{"hit_rate", "n_pairs", "chance", "per_class"}; chance = mean fraction of the image the object covers."""
    fg = text_features(model, tokenizer, class_names, template)
    bg = text_features(model, tokenizer, bg_words, template)
    hits, areas, per_class = [], [], {n: [] for n in class_names}
    for im, ids, gt in tqdm(list(zip(images, labels, gts)), desc="clip cam hit rate", leave=False):
        ids = [int(c) for c in ids]
        if not ids:
            continue
        text = torch.cat([fg[[c - 1 for c in ids]], bg])
        cams = hand_prompt_gradcam(model, C.to_input(model, im), text, range(len(ids)), target_layer)
        for cam, c in zip(cams, ids):
            hit = peak_in_object(cam, gt, c)
            hits.append(hit)
            per_class[class_names[c - 1]].append(hit)
            areas.append(float((gt == c).mean()))
    if not hits:
        raise FmalibError("cam_peak_hit_rate: no (image, class) pairs with labels")
    return {"hit_rate": float(np.mean(hits)), "n_pairs": len(hits), "chance": float(np.mean(areas)),
            "per_class": {k: float(np.mean(v)) if v else float("nan") for k, v in per_class.items()}}


def clip_quality(model, tokenizer: Callable, dataset, class_names: Sequence[str], bg_words: Sequence[str],
                 n_images: int | None = None, template: str = HAND_TEMPLATE, target_layer: str = "ln1_out") -> dict:
    """Both numbers on the first ``n_images`` items of a dataset (``open_dataset`` items)."""
    n = len(dataset) if n_images is None else min(n_images, len(dataset))
    items = [dataset[i] for i in range(n)]
    images = [it["image"] for it in items]
    labels = [list(it["labels"]) for it in items]
    res = {"zero_shot": zero_shot_map(model, tokenizer, images, labels, class_names, template)}
    if all(it["gt"] is not None for it in items):
        res["cam"] = cam_peak_hit_rate(model, tokenizer, images, labels, [it["gt"] for it in items],
                                       class_names, bg_words, template, target_layer)
    res["n_images"] = n
    return res


def zero_shot_table(model, tokenizer: Callable, items: Sequence[dict], class_names: Sequence[str],
                    template: str = HAND_TEMPLATE, top_k: int = 3):
    """Hand-prompt zero-shot scores of a few dataset items (notebook 01, any dataset): per image its labels,
    the top-k classes by softmax over the fg prompts (scale exp(logit_scale)) and the rank of each label."""

    text = text_features(model, tokenizer, class_names, template)
    emb = image_embeddings(model, [it["image"] for it in items])
    probs = (C.logit_scale(model).float() * emb @ text.T).softmax(-1).cpu().numpy()
    rows = []
    for it, p in zip(items, probs):
        order = np.argsort(-p, kind="stable")
        rank = {int(c): int(np.flatnonzero(order == c - 1)[0]) + 1 for c in it["labels"]}
        rows.append({"id": it["id"], "labels": ", ".join(class_names[c - 1] for c in rank),
                     **{f"top {k + 1}": f"{class_names[order[k]]} ({p[order[k]]:.2f})"
                        for k in range(min(top_k, len(class_names)))},
                     "label ranks": ", ".join(str(r) for r in rank.values()),
                     "top 1 is a label": bool(rank) and min(rank.values()) == 1})
    return pd.DataFrame(rows).set_index("id")
