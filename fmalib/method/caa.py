"""Class-aware attention refinement (CAA, CLIP-ES; docs/method.md §4): mean patch attention of the last k blocks →
Sinkhorn → (A+Aᵀ)/2 → A·A; each class's CAM is propagated from inside the bounding boxes of its regions
above a threshold."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from ..core.errors import FmalibError
from .cam import normalize_cams


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


def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Union of the bounding boxes of the 8-connected regions where cam > threshold · max(cam)."""
    fg = cam > threshold * cam.max()
    out = np.zeros(cam.shape, bool)
    if cam.max() <= 0:
        return out
    lab, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    for sl in ndimage.find_objects(lab):
        if sl is not None:
            out[sl] = True
    return out


CAA_SOURCES = ("normalized", "raw")


def caa_refine(cams: torch.Tensor, affinity: torch.Tensor, threshold: float,
               source: torch.Tensor | None = None) -> torch.Tensor:
    """(K, h, w) normalised CAMs -> refined CAMs: affinity @ (CAM restricted to its boxes), then ReLU and
    min-max.

    The boxes always come from the normalised ``cams``; the map propagated is ``source`` when given (the
    original propagates the raw Grad-CAM for seg prompts) and the normalised CAMs otherwise (cls prompts).
    """
    k, h, w = cams.shape
    masks = torch.from_numpy(np.stack([box_mask(c, threshold) for c in cams.detach().cpu().numpy()])
                             if k else np.zeros((0, h, w), bool)).to(cams.device)
    src = ((cams if source is None else source) * masks).reshape(k, h * w).float()
    refined = (src @ affinity.T).reshape(k, h, w)
    return normalize_cams(refined.clamp(min=0)) if k else refined

