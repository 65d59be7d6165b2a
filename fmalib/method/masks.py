"""One image's SAM masks as a compact set: pycocotools RLE count strings + level (0 subpart, 1 part, 2 whole),
SAM's predicted IoU and stability per mask — what the mask generator returns and the mask cache stores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..core.errors import FmalibError
from .rle import MaskRuns, decode_count_buffer, encode_count_strings

LEVELS = ("subpart", "part", "whole")


WHOLE = 2


@dataclass
class MaskSet:
    """The masks of one image: pycocotools RLE count strings (column-major) + per-mask level and scores."""

    height: int
    width: int
    counts: list[bytes]
    levels: np.ndarray  # uint8 (N,): 0 subpart, 1 part, 2 whole
    scores: np.ndarray  # float32 (N,): SAM's predicted IoU (raw, without the whole bonus)
    stability: np.ndarray  # float32 (N,)

    def __len__(self) -> int:
        return len(self.counts)

    def rles(self) -> list[dict]:
        return [{"size": [self.height, self.width], "counts": c} for c in self.counts]

    def runs(self) -> MaskRuns:
        if not self.counts:
            return MaskRuns.empty(self.height, self.width)
        buf = np.frombuffer(b"".join(self.counts), np.uint8)
        counts, offsets = decode_count_buffer(buf, np.array([len(c) for c in self.counts]))
        return MaskRuns.from_counts(counts, offsets, self.height, self.width)

    def to_bool(self) -> np.ndarray:
        return self.runs().to_bool()

    def select(self, index) -> "MaskSet":
        index = np.asarray(index)
        index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)  # [] is float
        return MaskSet(self.height, self.width, [self.counts[i] for i in index], self.levels[index],
                       self.scores[index], self.stability[index])

    @classmethod
    def from_runs(cls, runs: MaskRuns, levels, scores, stability) -> "MaskSet":
        counts, offsets = runs.to_counts()
        strings = encode_count_strings(counts, offsets) if runs.n else []
        return cls(runs.height, runs.width, strings, np.asarray(levels, np.uint8),
                   np.asarray(scores, np.float32), np.asarray(stability, np.float32))

    # cache layout: the count strings concatenated into one uint8 array (no pickled objects)
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"size": np.array([self.height, self.width], np.int32),
                "rle_chars": np.frombuffer(b"".join(self.counts), np.uint8),
                "rle_lengths": np.array([len(c) for c in self.counts], np.int64),
                "level": self.levels.astype(np.uint8), "score": self.scores.astype(np.float32),
                "stability": self.stability.astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str = "mask cache") -> "MaskSet":
        try:
            h, w = (int(v) for v in arrays["size"])
            chars, lens = arrays["rle_chars"].tobytes(), arrays["rle_lengths"].astype(np.int64)
            ends = np.cumsum(lens)
            counts = [chars[e - n:e] for e, n in zip(ends.tolist(), lens.tolist())]
            out = cls(h, w, counts, arrays["level"].astype(np.uint8), arrays["score"].astype(np.float32),
                      arrays["stability"].astype(np.float32))
        except KeyError as exc:
            raise FmalibError(f"{source}: missing array {exc} (expected size, rle_chars, rle_lengths, level, "
                              f"score, stability); delete it to recompute") from None
        if not (len(out.counts) == len(out.levels) == len(out.scores) == len(out.stability)):
            raise FmalibError(f"{source}: arrays of different lengths; delete it to recompute")
        return out


def bool_to_runs(masks: torch.Tensor) -> MaskRuns:
    """Boolean (N, H, W) tensor (any device) -> MaskRuns, in one pass for all masks."""
    n, h, w = masks.shape
    if n == 0:
        return MaskRuns.empty(h, w)
    flat = torch.nn.functional.pad(masks.permute(0, 2, 1).reshape(n, h * w).to(torch.int8), (1, 1))
    edge = flat[:, 1:] - flat[:, :-1]  # +1 where a run starts, -1 where it ends (positions 0..H*W)
    idx = torch.nonzero(edge).cpu().numpy()
    rising = edge[edge != 0].cpu().numpy() > 0
    starts, ends = idx[rising, 1], idx[~rising, 1]
    offsets = np.r_[0, np.cumsum(np.bincount(idx[rising, 0], minlength=n))]
    return MaskRuns(h, w, starts.astype(np.int64), ends.astype(np.int64), offsets.astype(np.int64))


def concat_runs(parts: Sequence[MaskRuns]) -> MaskRuns:
    h, w = parts[0].height, parts[0].width
    offsets = [np.zeros(1, np.int64)]
    total = 0
    for p in parts:
        offsets.append(p.offsets[1:] + total)
        total += len(p.starts)
    return MaskRuns(h, w, np.concatenate([p.starts for p in parts]), np.concatenate([p.ends for p in parts]),
                    np.concatenate(offsets))

