"""Prompt-training data: the batch schedule and the augmentation, scaled to the crop (colour jitter, rescale so
the long side falls in ``long_side`` with the short side ≥ crop, random crop, horizontal flip; seeds follow
the geometry). Each item's augmentation comes from an RNG seeded by (seed, iteration, slot), so a resumed run
gives the same bytes as an uninterrupted one."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
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


def color_jitter(x: torch.Tensor, rng: np.random.Generator, strength: Sequence[float]) -> torch.Tensor:
    """torchvision ColorJitter semantics (brightness, contrast, saturation, hue; random order) with ``rng``."""
    b, c, s, h = (float(v) for v in strength)
    ops = []
    if b > 0:
        f = rng.uniform(max(0.0, 1 - b), 1 + b)
        ops.append(lambda t, f=f: TF.adjust_brightness(t, f))
    if c > 0:
        f = rng.uniform(max(0.0, 1 - c), 1 + c)
        ops.append(lambda t, f=f: TF.adjust_contrast(t, f))
    if s > 0:
        f = rng.uniform(max(0.0, 1 - s), 1 + s)
        ops.append(lambda t, f=f: TF.adjust_saturation(t, f))
    if h > 0:
        f = rng.uniform(-h, h)
        ops.append(lambda t, f=f: TF.adjust_hue(t, f))
    for k in rng.permutation(len(ops)):
        x = ops[k](x)
    return x


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
            aug) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (H, W, 3) [+ uint8 (H, W) seeds] -> float (3, S, S) in [0, 1] [+ long (S, S)], S = aug.crop_size.

    Colour jitter; rescale (bicubic) so the long side is uniform in aug.long_side and the short side ≥ S;
    random S×S crop (padding with 0 / ignore if ever needed); horizontal flip with p = 0.5 if aug.flip.
    """
    crop = int(aug["crop_size"])
    lo, hi = (int(v) for v in aug["long_side"])
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    x = color_jitter(x, rng, aug["color_jitter"]).clamp(0, 1)
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
