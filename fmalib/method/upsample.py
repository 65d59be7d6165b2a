"""Bilinear resampling of CAMs with torch's align_corners=False rule (CLIP-ES / F.interpolate), in NumPy, and
its separable 1-D taps (SAMS scores masks from them without upsampling a CAM)."""
from __future__ import annotations

import numpy as np


def interp_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear resampling n_in -> n_out samples, align_corners=False (torch's rule): for every output
    sample its two source samples and their weights (i0, i1, w0, w1)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, 1.0 - lam, lam


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """The (n_out, n_in) matrix of ``interp_taps``."""
    i0, i1, w0, w1 = interp_taps(n_out, n_in)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), w0)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m


def upsample_cams(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (K, h, w) -> (K, H, W) float32, align_corners=False (as CLIP-ES / F.interpolate)."""
    cam = np.asarray(cam, np.float32)
    size = (int(size[0]), int(size[1]))
    if cam.shape[1:] == size:
        return cam
    uy, ux = interp_matrix(size[0], cam.shape[1]), interp_matrix(size[1], cam.shape[2])
    return np.matmul(uy, cam.astype(np.float64) @ ux.T).astype(np.float32)
