"""Masks as column-major runs: the layout of COCO RLE, decoded and encoded without a per-mask Python loop.

A SAM mask set is stored as pycocotools RLE (compressed count strings, column-major). ``MaskRuns`` holds the
runs of 1s of N masks of one image as flat arrays — run r covers the column-major pixel indices
``[starts[r], ends[r])`` of mask ``mask_of_run[r]`` — which is all SAMS needs: mask sums of a CAM from
prefix sums at the run ends, painting from the run boundaries. Nothing here decodes a dense (N, H, W) array
unless ``to_bool`` is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from ..core.errors import FmalibError


def _cumsum_within(values: np.ndarray, offsets: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum of ``values`` restarting at every segment (segment i = offsets[i]:offsets[i+1];
    ``segment`` gives each element's segment)."""
    total = np.cumsum(values)
    base = np.r_[values.dtype.type(0), total][offsets[:-1]]
    return total - base[segment]


def decode_count_strings(strings: Sequence[bytes | str]) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools compressed RLE strings -> (counts int64 concatenated, offsets (N+1,)). Own code: pycocotools
    decodes only to dense masks, and SAMS works on the runs.

    The format (pycocotools ``rleToString``): each count is written in 5-bit chunks, low chunk first, as
    chars 48 + chunk (| 0x20 when another chunk follows); the last chunk's 0x10 bit is the sign; from the
    4th count on, a count is stored as the difference to the count two before it.
    """
    raw = [s.encode() if isinstance(s, str) else bytes(s) for s in strings]
    lens = np.fromiter((len(s) for s in raw), np.int64, len(raw))
    return decode_count_buffer(np.frombuffer(b"".join(raw), np.uint8), lens)


def decode_count_buffer(buffer: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``decode_count_strings`` on the strings concatenated into one uint8 buffer, with their lengths."""
    lens = np.asarray(lens, np.int64)
    buffer = np.asarray(buffer, np.uint8)
    if len(buffer) and (buffer.min() < 48 or buffer.max() > 111):
        raise FmalibError("RLE counts string holds a character outside pycocotools' alphabet (ASCII 48-111)")
    chars = buffer.astype(np.int64) - 48
    last = (chars & 0x20) == 0  # the final chunk of a count
    if len(chars) and not last[np.cumsum(lens)[lens > 0] - 1].all():
        raise FmalibError("RLE counts string is truncated (its last count has a continuation bit)")
    end_idx = np.flatnonzero(last)
    if len(end_idx) == len(chars):  # every count is one chunk (the common case after delta coding)
        x, k_last = chars & 0x1F, np.zeros(len(chars), np.int64)
    else:
        group_start = np.r_[0, end_idx[:-1] + 1]
        k = np.arange(len(chars)) - np.repeat(group_start, end_idx - group_start + 1)
        x = np.add.reduceat((chars & 0x1F) << (5 * k), group_start) if len(chars) else np.zeros(0, np.int64)
        k_last = k[end_idx]
    negative = (chars[end_idx] & 0x10) != 0
    x[negative] |= np.left_shift(-1, 5 * (k_last[negative] + 1))
    # counts per string, and each count's index j within its string
    str_end = np.cumsum(lens)
    n_counts = np.diff(np.r_[0, np.searchsorted(end_idx, str_end)])
    offsets = np.r_[0, np.cumsum(n_counts)].astype(np.int64)
    string = np.repeat(np.arange(len(lens)), n_counts)
    j = np.arange(len(x)) - offsets[string]
    # undo the delta coding: odd j and even j >= 2 are running sums within their string
    odd = (j & 1) == 1
    even = ~odd & (j >= 2)
    counts = np.where(odd, _cumsum_within(np.where(odd, x, 0), offsets, string),
                      np.where(even, _cumsum_within(np.where(even, x, 0), offsets, string), x))
    if (counts < 0).any():
        raise FmalibError("RLE counts string decodes to a negative run length: corrupt RLE")
    return counts, offsets


def encode_count_strings(counts: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    """Inverse of ``decode_count_strings`` (uncompressed counts -> pycocotools strings), via pycocotools."""

    out = []
    for n in range(len(offsets) - 1):
        c = counts[offsets[n] : offsets[n + 1]]
        rle = mask_utils.frPyObjects({"size": [1, int(c.sum())], "counts": [int(v) for v in c]}, 1, int(c.sum()))
        out.append(rle["counts"])
    return out


@dataclass(frozen=True)
class MaskRuns:
    """N masks of an (height, width) image as runs of 1s in column-major pixel order (COCO RLE's order).

    ``starts``/``ends`` (int64, R): run r covers flat indices [starts[r], ends[r]) where flat = x * height + y;
    ``offsets`` (int64, N + 1): mask n owns runs offsets[n]:offsets[n + 1], in increasing position.
    """

    height: int
    width: int
    starts: np.ndarray
    ends: np.ndarray
    offsets: np.ndarray

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def mask_of_run(self) -> np.ndarray:
        return np.repeat(np.arange(self.n), np.diff(self.offsets))

    @property
    def areas(self) -> np.ndarray:
        lengths = self.ends - self.starts
        cum = np.r_[0, np.cumsum(lengths)]
        return cum[self.offsets[1:]] - cum[self.offsets[:-1]]

    # -- constructors ------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, height: int, width: int) -> "MaskRuns":
        z = np.zeros(0, np.int64)
        return cls(int(height), int(width), z, z.copy(), np.zeros(1, np.int64))

    @classmethod
    def from_counts(cls, counts: np.ndarray, offsets: np.ndarray, height: int, width: int) -> "MaskRuns":
        """From uncompressed RLE counts (alternating 0s, 1s, ... column-major), concatenated per mask."""
        counts = np.asarray(counts, np.int64)
        offsets = np.asarray(offsets, np.int64)
        n_counts = np.diff(offsets)
        mask_of_count = np.repeat(np.arange(len(n_counts)), n_counts)
        pos_end = _cumsum_within(counts, offsets, mask_of_count)  # end of each count within its mask
        totals = pos_end[offsets[1:][n_counts > 0] - 1]
        if len(totals) and (totals != height * width).any():
            bad = int(np.flatnonzero(n_counts > 0)[np.flatnonzero(totals != height * width)[0]])
            raise FmalibError(f"RLE of mask {bad} covers {int(pos_end[offsets[bad + 1] - 1])} pixels; "
                              f"expected height*width = {height * width}")
        if (n_counts == 0).any() and height * width > 0:
            raise FmalibError(f"RLE of mask {int(np.flatnonzero(n_counts == 0)[0])} has no counts")
        j = np.arange(len(counts)) - offsets[mask_of_count]
        ones = (j % 2 == 1) & (counts > 0)
        ends = pos_end[ones]
        starts = ends - counts[ones]
        run_offsets = np.r_[0, np.cumsum(np.bincount(mask_of_count[ones], minlength=len(n_counts)))]
        return cls(int(height), int(width), starts, ends, run_offsets.astype(np.int64))

    @classmethod
    def from_rles(cls, rles: Sequence[Mapping[str, Any]], height: int | None = None,
                  width: int | None = None) -> "MaskRuns":
        """From COCO RLE dicts ``{"size": [h, w], "counts": str | bytes | list[int]}`` of one image."""
        if len(rles) == 0:
            if height is None or width is None:
                raise FmalibError("MaskRuns.from_rles: no masks and no (height, width) given")
            return cls.empty(height, width)
        sizes = {(int(r["size"][0]), int(r["size"][1])) for r in rles}
        if len(sizes) != 1:
            raise FmalibError(f"MaskRuns.from_rles: the RLEs of one image have different sizes {sorted(sizes)}")
        (h, w), = sizes
        if (height is not None and height != h) or (width is not None and width != w):
            raise FmalibError(f"MaskRuns.from_rles: RLE size {(h, w)} != expected {(height, width)}")
        if all(isinstance(r["counts"], (str, bytes)) for r in rles):
            counts, offsets = decode_count_strings([r["counts"] for r in rles])
        else:
            lists = [np.asarray(r["counts"], np.int64) for r in rles]
            counts = np.concatenate(lists)
            offsets = np.r_[0, np.cumsum([len(c) for c in lists])]
        return cls.from_counts(counts, offsets, h, w)

    @classmethod
    def from_bool(cls, masks: np.ndarray) -> "MaskRuns":
        """From a boolean (N, H, W) array, through pycocotools' C encoder (reads all N*H*W pixels once)."""

        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise FmalibError(f"masks must be a boolean (N, H, W) array; got shape {masks.shape}")
        n, h, w = masks.shape
        if n == 0 or h * w == 0:
            return cls(h, w, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(n + 1, np.int64))
        fortran = np.asfortranarray(masks.astype(bool, copy=False).transpose(1, 2, 0)).view(np.uint8)
        return cls.from_rles(mask_utils.encode(fortran))

    # -- conversions -------------------------------------------------------------------------------------
    def to_bool(self) -> np.ndarray:
        """Dense boolean (N, H, W)."""
        flat = np.zeros((self.n, self.height * self.width + 1), np.int8)
        m = self.mask_of_run
        np.add.at(flat, (m, self.starts), 1)
        np.add.at(flat, (m, self.ends), -1)
        dense = np.cumsum(flat[:, :-1], axis=1).astype(bool)
        return np.ascontiguousarray(dense.reshape(self.n, self.width, self.height).transpose(0, 2, 1))

    def to_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Uncompressed RLE counts (0s first) concatenated per mask, and their offsets."""
        m = self.mask_of_run
        prev_end = np.r_[0, self.ends[:-1]]
        first_of_mask = np.zeros(len(self.starts), bool)
        first_of_mask[self.offsets[:-1][np.diff(self.offsets) > 0]] = True
        prev_end[first_of_mask] = 0
        zeros = self.starts - prev_end
        ones = self.ends - self.starts
        n_runs = np.diff(self.offsets)
        last_end = np.zeros(self.n, np.int64)
        last_end[n_runs > 0] = self.ends[self.offsets[1:][n_runs > 0] - 1]
        tail = self.height * self.width - last_end
        # per mask: z0 o0 z1 o1 ... tail (tail omitted when 0, except for an all-zero mask)
        pairs = np.stack([zeros, ones], 1).reshape(-1)
        pair_mask = np.repeat(m, 2)
        keep_tail = (tail > 0) | (n_runs == 0)
        seq = np.concatenate([pairs, tail[keep_tail]])
        seq_mask = np.concatenate([pair_mask, np.arange(self.n)[keep_tail]])
        seq_pos = np.concatenate([np.arange(len(pairs)), np.full(int(keep_tail.sum()), len(pairs))])
        order = np.lexsort((seq_pos, seq_mask))
        counts = seq[order]
        offsets = np.r_[0, np.cumsum(np.bincount(seq_mask, minlength=self.n))]
        return counts.astype(np.int64), offsets.astype(np.int64)

    def to_rles(self) -> list[dict]:
        """pycocotools-compatible RLE dicts with compressed (bytes) counts."""
        counts, offsets = self.to_counts()
        strings = encode_count_strings(counts, offsets)
        return [{"size": [self.height, self.width], "counts": s} for s in strings]

    def select(self, index: np.ndarray) -> "MaskRuns":
        """The masks ``index`` (ints or a boolean keep-mask), in that order."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        lo, hi = self.offsets[index], self.offsets[index + 1]
        n_runs = hi - lo
        run_idx = np.repeat(lo - np.r_[0, np.cumsum(n_runs)[:-1]], n_runs) + np.arange(int(n_runs.sum()))
        return MaskRuns(self.height, self.width, self.starts[run_idx], self.ends[run_idx],
                        np.r_[0, np.cumsum(n_runs)].astype(np.int64))


@dataclass(frozen=True)
class Intervals:
    """The column-major pixel line cut at every run boundary: interval j = [bounds[j], bounds[j + 1]) is
    covered by a fixed set of masks; run r spans intervals first[r] .. last[r] - 1."""

    bounds: np.ndarray  # (E + 1,) int64, 0 ... H * W
    first: np.ndarray  # (R,)
    last: np.ndarray  # (R,)

    @classmethod
    def of(cls, runs: MaskRuns) -> "Intervals":
        hw = runs.height * runs.width
        cut = np.zeros(hw + 1, bool)  # a bitmap, not np.unique: O(pixels) and no sort
        cut[[0, hw]] = True
        cut[runs.starts] = True
        cut[runs.ends] = True
        index = np.cumsum(cut, dtype=np.int64) - 1
        return cls(np.flatnonzero(cut), index[runs.starts], index[runs.ends])
