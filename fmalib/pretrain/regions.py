"""Region index maps of a synthetic sample — the targets of SAM pretraining and of its quality measures."""
from __future__ import annotations

import numpy as np

from ..core.errors import FmalibError

PAD = 255  # region index of the padding outside the resized image


def region_maps(sample) -> tuple[np.ndarray, np.ndarray, int]:
    """(whole, part, n_instances) uint8 (H, W) index maps of a synthetic ``Sample``.

    Wholes 0..n_instances-1 are the instances, the rest the visible stuff bands; part indices are global
    and a one-part instance or a stuff band is its own single part.
    """
    h, w = sample.image.shape[:2]
    whole = np.full((h, w), PAD, np.uint8)
    part = np.full((h, w), PAD, np.uint8)
    covered = np.zeros((h, w), bool)
    n_part = 0
    for i, inst in enumerate(sample.instances):
        whole[inst.mask] = i
        covered |= inst.mask
        for pm in (inst.parts if len(inst.parts) > 1 else [inst.mask]):
            part[pm & inst.mask] = n_part
            n_part += 1
        rest = inst.mask & (part == PAD)  # pixels no part claims (not expected): a part of their own
        if rest.any():
            part[rest] = n_part
            n_part += 1
    k = len(sample.instances)
    for _, sm in sample.stuff:
        vis = sm & ~covered
        if vis.any():
            whole[vis] = k
            part[vis] = n_part
            k += 1
            n_part += 1
    if k > PAD or n_part > PAD or (whole == PAD).any():
        raise FmalibError(f"synthetic sample: {k} regions / {n_part} parts or uncovered pixels; expected < {PAD}, none")
    return whole, part, len(sample.instances)
