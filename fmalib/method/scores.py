"""From a CAM of any scale to a score map in [0, 1], as the original does it: the CAM stage keeps the raw maps
(Grad-CAM, and CAA's propagated map) and every consumer scores them — FMA-WSSS ``src/libs/seeding/score.py``
``cam2score`` with ``resize_first=True``: bilinear resize (align_corners=False) first, then ``min_max_norm``
(``src/utils/norm.py``) with ``thresh=0``: ReLU, then (x − min) / (max − min + 1e-7) per map."""
from __future__ import annotations

import math

import numpy as np
import torch

from .upsample import upsample_cams

MINMAX_EPS = 1e-7  # the original's min_max_norm eps: a map's peak scores span / (span + 1e-7), a flat map 0


def min_max_norm(cams: torch.Tensor | np.ndarray, eps: float = MINMAX_EPS):
    """Per map (first axis): ReLU, then (x − min) / (max − min + eps) — the original's ``min_max_norm(...,
    thresh=0., eps=1e-7)`` over each map's spatial axes."""
    if isinstance(cams, torch.Tensor):
        pos = cams.clamp(min=0)
        flat = pos.reshape(pos.shape[0], math.prod(pos.shape[1:]))
        lo, hi = flat.amin(1), flat.amax(1)
    else:
        pos = np.maximum(np.asarray(cams), 0)
        flat = pos.reshape(pos.shape[0], math.prod(pos.shape[1:]))
        lo, hi = flat.min(1), flat.max(1)
    shape = (-1,) + (1,) * (pos.ndim - 1)
    return (pos - lo.reshape(shape)) / (hi - lo + eps).reshape(shape)


def cam_scores(cams: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """(K, h, w) CAMs of any scale or sign -> (K, H, W) float32 scores in [0, 1): upsampled to ``size`` (the
    maps' own size when None), then ReLU + min-max (``min_max_norm``)."""
    cams = np.asarray(cams, np.float32)
    up = upsample_cams(cams, size) if size is not None else cams
    return min_max_norm(up).astype(np.float32)
