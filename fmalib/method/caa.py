"""Class-aware attention refinement (CAA, CLIP-ES; docs/method.md §4): mean patch attention of the last k blocks →
Sinkhorn → (A+Aᵀ)/2 → A·A; each class's CAM is propagated from inside the bounding boxes of its regions
above a threshold; the result stays raw (consumers score it)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..core.errors import FmalibError


def sinkhorn(a: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Alternate column then row normalisation ``n_iters`` times (rows sum to 1 exactly afterwards)."""
    for _ in range(int(n_iters)):
        a = a / a.sum(dim=0, keepdim=True).clamp_min(1e-12)
        a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return a


def caa_affinity(attn: Sequence[torch.Tensor], n_iters: int) -> torch.Tensor:
    """Last blocks' attention maps, each (1+hw, 1+hw) (or (1, …)), -> the (hw, hw) CAA transition matrix."""
    if not len(attn):
        raise FmalibError("CAA needs at least one attention map (caa_last_k ≥ 1)")
    a = torch.stack([t.reshape(t.shape[-2:]) for t in attn]).float().mean(dim=0)[1:, 1:]
    a = sinkhorn(a, n_iters)
    a = (a + a.T) / 2
    return a @ a


def scoremap_boxes(cam: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """The boxes (x0, y0, x1, y1; x1, y1 exclusive) CAA propagates from, as the original's ``scoremap2bbox``
    (FMA-WSSS ``src/libs/seeding/aff/utils.py``, CLIP-ES ``utils.py``) derives them from a normalised CAM:
    quantised to uint8 by truncation, binarised strictly above ``int(threshold · its max)``, one box per
    8-connected region (OpenCV's outer contours; the hole contours RETR_TREE adds lie inside them), each
    ``boundingRect`` end clipped to ``W − 1`` / ``H − 1`` — so a region touching the right or bottom edge loses
    that last column or row, and a 1-px-wide one there gives an empty box. No region: no box."""
    q = (np.asarray(cam, np.float32) * 255).astype(np.uint8)
    fg = q > int(threshold * q.max())
    h, w = q.shape
    lab, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    return [(sl[1].start, sl[0].start, min(sl[1].stop, w - 1), min(sl[0].stop, h - 1))
            for sl in ndimage.find_objects(lab) if sl is not None]


def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Union of ``scoremap_boxes`` as a boolean (h, w) mask."""
    out = np.zeros(np.shape(cam), bool)
    for x0, y0, x1, y1 in scoremap_boxes(cam, threshold):
        out[y0:y1, x0:x1] = True
    return out


CAA_SOURCES = ("normalized", "raw")


def caa_refine(score: torch.Tensor, affinity: torch.Tensor, threshold: float,
               source: torch.Tensor | None = None) -> torch.Tensor:
    """Propagate each class's map from inside its boxes: affinity @ (map · box mask), (K, h, w) -> (K, h, w),
    **raw** — as the original saves it (``aff_cam``, ``src/libs/seeding/aff/tools.py``; ``to_in_bbox`` =
    ``to_out_bbox`` = 'in_bbox': only patches inside a box pass mass on). Consumers score it
    (``method.scores.cam_scores``: upsample, ReLU, min-max).

    ``score``: the (K, h, w) CAMs scored on the patch grid (``min_max_norm``); the boxes always come from it.
    The map propagated is ``source`` when given (the raw Grad-CAM: the original's ``aff_at='cam'``) and
    ``score`` itself otherwise (``aff_at='score'``)."""
    k, h, w = score.shape
    masks = torch.from_numpy(np.stack([box_mask(c, threshold) for c in score.detach().cpu().numpy()])
                             if k else np.zeros((0, h, w), bool)).to(score.device)
    src = ((score if source is None else source) * masks).reshape(k, h * w).float()
    return (src @ affinity.T).reshape(k, h, w)
