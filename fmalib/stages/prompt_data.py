"""Prompt-training data: the batch schedule and the augmentation, scaled to the crop (AlchemyCat's colour jitter,
rescale so the long side falls in ``long_side`` with the short side ≥ crop, random crop, horizontal flip; seeds
follow the geometry). Each item's augmentation comes from an RNG seeded by (seed, iteration, slot), so a resumed run
gives the same bytes as an uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..core.errors import FmalibError
from ..data.labels import read_label_png


def batch_indices(n: int, batch: int, it: int, seed: int) -> list[int]:
    """Dataset indices of iteration ``it``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    if n == 0:
        raise FmalibError("prompt training: the training split is empty")
    out, pos = [], it * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return out


def scale_abs(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """OpenCV's ``convertScaleAbs`` on uint8: |alpha·x + beta|, rounded half to even, clipped to 255."""
    return np.minimum(np.rint(np.abs(x.astype(np.float64) * alpha + beta)), 255).astype(np.uint8)


def _hsv_channel(image: np.ndarray, channel: int, alpha: float, beta: float) -> np.ndarray:
    """``scale_abs`` on one channel of the image's 8-bit HSV (PIL's: hue on 0–255, as OpenCV's HSV_FULL)."""
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    hsv[..., channel] = scale_abs(hsv[..., channel], alpha, beta)
    return np.array(Image.fromarray(hsv, "HSV").convert("RGB"))


def jitter_draws(rng: np.random.Generator, jitter) -> dict:
    """One image's draws of AlchemyCat's ``RandColorJitter`` (``alchemy_cat/data/plugins/augers.py``): each of
    brightness, contrast, saturation and hue happens with probability ``p`` (None: not applied), then the four
    steps run in a random order."""
    p = float(jitter["p"])
    b, h = float(jitter["brightness"]), float(jitter["hue"])
    draws = {"brightness": rng.uniform(-b, b) if rng.random() < p else None,
             "contrast": rng.uniform(*jitter["contrast"]) if rng.random() < p else None,
             "saturation": rng.uniform(*jitter["saturation"]) if rng.random() < p else None,
             "hue": rng.uniform(-h, h) if rng.random() < p else None}
    draws["order"] = [int(i) for i in rng.permutation(4)]
    return draws


JITTER_STEPS = ("brightness", "contrast", "saturation", "hue")


def color_jitter(image: np.ndarray, draws: dict) -> np.ndarray:
    """Apply ``jitter_draws`` to a uint8 RGB image: brightness adds its delta to every channel, contrast
    multiplies every channel (no mean centring), saturation multiplies HSV's S, hue adds its delta to the 0–255
    hue (clipped, not wrapped) — each step saturating to uint8 as OpenCV's ``convertScaleAbs``."""
    for step in (JITTER_STEPS[i] for i in draws["order"]):
        v = draws[step]
        if v is None:
            continue
        if step == "brightness":
            image = scale_abs(image, 1.0, v)
        elif step == "contrast":
            image = scale_abs(image, v, 0.0)
        elif step == "saturation":
            image = _hsv_channel(image, 1, v, 0.0)
        else:
            image = _hsv_channel(image, 0, 1.0, v)
    return image


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
            aug) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (H, W, 3) [+ uint8 (H, W) seeds] -> float (3, S, S) in [0, 1] [+ long (S, S)], S = aug.crop_size.

    Colour jitter (``color_jitter``, on the uint8 image); rescale (bicubic) so the long side is uniform in aug.long_side and the short side ≥ S;
    random S×S crop (padding with 0 / ignore if ever needed); horizontal flip with p = 0.5 if aug.flip.
    """
    crop = int(aug["crop_size"])
    lo, hi = (int(v) for v in aug["long_side"])
    image = color_jitter(np.ascontiguousarray(image, np.uint8), jitter_draws(rng, aug["color_jitter"]))
    x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    h, w = image.shape[:2]
    scale = max(rng.integers(lo, hi + 1) / max(h, w), crop / min(h, w))
    # an extreme aspect ratio (1 x 3000 px) would ask for a 224 x 672,000 tensor: cap the long side at 4x the
    # range's top; the short side is then stretched to the crop (nh, nw >= crop below)
    scale = min(scale, 4 * max(hi, crop) / max(h, w))
    nh, nw = max(crop, int(round(h * scale))), max(crop, int(round(w * scale)))
    x = TF.resize(x, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    y = None
    if label is not None:
        if label.shape != (h, w):
            raise FmalibError(f"seed map is {label.shape}, its image {(h, w)}; expected equal sizes")
        y = TF.resize(torch.from_numpy(np.ascontiguousarray(label))[None], [nh, nw],
                      interpolation=InterpolationMode.NEAREST)[0].long()
    top, left = int(rng.integers(0, nh - crop + 1)), int(rng.integers(0, nw - crop + 1))
    x = x[:, top:top + crop, left:left + crop]
    y = y[top:top + crop, left:left + crop] if y is not None else None
    if aug["flip"] and rng.random() < 0.5:
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    return x, y


class TrainSet(torch.utils.data.Dataset):
    """Items keyed by (iteration, slot, dataset index) so augmentation is seeded per item."""

    def __init__(self, dataset, aug, seed: int, num_classes: int, seeds_dir: Path | None, mean, std):
        self.ds, self.aug, self.seed, self.C, self.seeds_dir = dataset, aug, seed, num_classes, seeds_dir
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        it, slot, idx = key
        item = self.ds[idx]
        seed_map = None
        if self.seeds_dir is not None:
            path = self.seeds_dir / f"{item['id']}.png"
            if not path.is_file():
                raise FmalibError(f"seed map {path} missing for training image {item['id']!r}")
            seed_map = read_label_png(path)
        x, y = augment(item["image"], seed_map, np.random.default_rng([self.seed, it, slot]), self.aug)
        present = torch.zeros(self.C, dtype=torch.bool)
        present[torch.as_tensor(np.asarray(item["labels"], np.int64) - 1)] = True
        return (x - self.mean) / self.std, present, (y if y is not None else torch.zeros(0, dtype=torch.long))
