"""CAMs of one image for its present classes (docs/method.md §4): raw Grad-CAMs at single scale (sides rounded up to
the patch size) and their raw CAA refinement; consumers score both (``method.scores.cam_scores``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..core.errors import FmalibError
from ..models import clip as C
from .caa import CAA_SOURCES, caa_affinity, caa_refine
from .cam import gradcam
from .scores import min_max_norm


def image_cams(model, text: torch.Tensor, n_fg: int, image: np.ndarray, labels: Sequence[int], *,
               target: str, target_layer: str, caa_last_k: int, sinkhorn_iters: int, threshold: float,
               caa_source: str = "normalized", max_side: int | None = None) -> dict[str, np.ndarray]:
    """CAMs of one uint8 image for its present fg ids ``labels`` (1..C) at single scale.

    text (n_fg + n_bg, D): fg prompts then bg prompts. ``target`` / ``target_layer``: Grad-CAM's (see
    ``method.cam.gradcam``); CAA averages the attention of the last ``caa_last_k`` blocks, runs
    ``sinkhorn_iters`` Sinkhorn iterations and boxes the map at ``threshold``; ``caa_source``: the map CAA
    propagates — ``normalized`` (the CAM's score on the patch grid, ReLU + min-max) or ``raw`` (the Grad-CAM);
    the boxes always come from the score. ``max_side``: cap on the input's long side
    (``models.clip.input_size``). An image without labels (K = 0) gives (0, h, w) maps.
    Returns float32 ``cam`` (the raw Grad-CAMs) and ``cam_caa`` (the raw propagated maps), both (K, h, w) on
    the patch grid, and ``labels`` — as the original saves them (``src/tasks/infer_cam/run.py``,
    ``src/tasks/aff_cam/run.py``).
    """
    if caa_source not in CAA_SOURCES:
        raise FmalibError(f"image_cams: caa_source={caa_source!r}; expected one of {CAA_SOURCES}")
    labels = np.asarray(labels, np.int64)
    x = C.to_input(model, image, max_side)  # the CAMs stay on this (capped) input's patch grid
    n_blocks = len(model.visual.transformer.resblocks)
    k_attn = min(int(caa_last_k), n_blocks)
    with torch.no_grad():
        out = C.encode_image_tokens(model, x, attn_last_k=k_attn)
    h, w = out.grid
    if not len(labels):
        empty = np.zeros((0, h, w), np.float32)
        return {"labels": labels, "cam": empty, "cam_caa": empty}
    allowed = torch.ones(1, text.shape[0], dtype=torch.bool, device=text.device)
    allowed[0, :n_fg] = False
    allowed[0, torch.as_tensor(labels - 1, device=text.device)] = True
    idx = torch.as_tensor(labels - 1, device=text.device)
    raw = gradcam(model, out.block_input, out.grid, text, torch.zeros_like(idx), idx, allowed, target,
                  target_layer=target_layer)
    score = min_max_norm(raw)  # cam2score on the patch grid (aff/caller.py): the boxes come from it
    refined = caa_refine(score, caa_affinity([a[0] for a in out.attn], sinkhorn_iters), threshold,
                         raw if caa_source == "raw" else None)
    return {"labels": labels, "cam": raw.detach().cpu().numpy().astype(np.float32),
            "cam_caa": refined.cpu().numpy().astype(np.float32)}

