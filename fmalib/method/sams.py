"""SAMS: SAM-based seeding (docs/method.md §5) — CAMs of any method + SAM masks -> a pseudo-label map.

In the original's order (FMA-WSSS ``anns_seed``: ``resize_cam_cuda`` then ``gather_norm_bg_argmax`` with
``norm_first=True``): each present class's CAM is upsampled bilinearly (align_corners=False) to the image
size as it is, raw, and ReLU is applied after; for every mask m and class c the score is the mean of that
map inside m; each class's scores are min-max normalised across the image's masks as the original's
``min_max_norm`` does, (s - min) / (max - min + 1e-7); a mask's background score is (1 - max_c score)^p;
its label is the argmax over (background, classes) and its confidence that maximum. Masks are painted in
ascending (level, confidence) order, later over earlier, so whole masks land last and, within a level, the
surer mask wins; pixels no mask covers are background.

Feeding CAMs from any method
----------------------------
``cam`` is a float array (K, h, w) with K = len(image_labels): channel i is the CAM of class
``image_labels[i]`` (fg ids 1..C, the dataset's ``labels`` order; absent classes are not passed). Values may
have any scale or sign: negative values are clipped by the ReLU *after* upsampling (so a negative patch
pulls its bilinear neighbourhood down, as in the original). The per-class min-max makes the result
invariant to scaling a class's CAM by a positive factor up to the 1e-7 (CLIP-ES / Grad-CAM maps normalised
to [0, 1] or raw: the same seeds unless two classes' normalised scores come within ~1e-7 of each other).
(h, w) is the image size of the masks or any other size, e.g. the patch grid. A method giving one map per
class of the dataset, (C, h, w) in class-id order 1..C, is fed through ``present_cams(cam_all,
image_labels)``::

    label_map, confidence = sams_seed(present_cams(cams, labels), masks, levels, labels, bg_power=0.6)

``masks`` is a boolean (N, H, W) array, a ``MaskRuns`` or a list of COCO RLE dicts (the mask cache of
``fmalib.method.generator``); ``levels`` (N,) ints, 0 subpart / 1 part / 2 whole. Returns ``label_map`` uint8 (H, W)
with values in {0} ∪ image_labels and ``confidence`` float32 (H, W), the painted mask's confidence (0 where
no mask covers a pixel).

Defined corner cases: ties in the label argmax go to background, then to the class listed first in
``image_labels`` (the lower id, for the dataset's sorted labels) — torch.argmax's first maximum, as the
original; the 1e-7 is what breaks the tie between two classes peaking on the same mask (the one with the
larger score span wins, as in the original, where a plain min-max would give both exactly 1); ties in
(level, confidence) paint in mask-index order (the later index lands on top, the original's stable sort);
a class whose scores do not vary across the masks (one mask, or a flat CAM) normalises to 0; an image without
a present class (K = 0, a (0, h, w) CAM) is all background, confidence 1 where a mask covers it, and
``choose_bg_power`` leaves it out; empty masks are ignored; an image with no (non-empty) mask falls back to the same rule per pixel on the upsampled, ReLU'd
CAMs normalised by their maximum — label = argmax(bg, CAM_c / max CAM_c) with bg = (1 - max_c)^p, i.e. a
background threshold t with (1 - t)^p = t — with a logged warning, counted in ``stats["fallback"]`` (the
original crashes there). Scores are computed in float64 (the original: float32 on the GPU), so near-ties
within float32 rounding may break differently.

Speed: no per-mask Python loop. The masks stay run-length encoded (``fmalib.method.rle.MaskRuns``, decoded
straight from the pycocotools strings of the mask cache). The masks × CAM product comes from the runs:
for an image-size CAM, from column prefix sums of the CAM read at the run ends (one pass over the CAM).
A CAM on a coarser grid (CLIP's patch grid) that is non-negative — fmalib's cached CAMs are ReLU'd and
normalised — is never upsampled: the ReLU after upsampling is then the identity, and bilinear upsampling is
linear and separable, so a run's sum is two taps of the CAM upsampled along y only and accumulated down the
grid's columns, (H + 1, w, K) numbers — the same result. A coarse CAM with negative values breaks that
linearity (ReLU of an interpolation is not the interpolation of ReLUs), so it is upsampled in full first.
Painting resolves the top mask of every elementary interval between run boundaries with XOR-accumulated
bitsets (O(runs + pixels)). Nothing is ever (N, H, W) dense.
bench/sams.py: 100 masks, 500×375, 20 classes — see reports/bench/sams.json for the speed-up over the
plain loop kept in tests/method/test_sams.py.

Choosing the background power p without ground truth
----------------------------------------------------
``choose_bg_power`` picks the p that maximises the *balanced agreement* of the SAMS labels with the pixels
the CAMs themselves are sure about, on a sample of training images: confident-foreground pixels (the CAM
of class c, upsampled and scored as everywhere else — ReLU, then min-max — is the top class there and
>= ``hi``) should get label c, and confident-background pixels (every score <= ``lo``) should get background; the criterion is the
mean of the two hit rates, and on a plateau of equal values its middle p is taken. Raising p lowers every
mask's background score, so masks turn foreground: the first rate rises and the second falls (up to
changes of painting order), and the criterion settles where SAM's regions agree best with both ends of the
CAM's evidence. It uses only the CAMs (CAA-refined when the caller's are), never a ground-truth label, and
ignores the uncertain band in between — exactly where SAM's boundaries should decide. Why not match the
CAMs' foreground fraction instead: that needs a CAM threshold, the very knob SAMS replaces, and it
inherits the CAMs' blur. ``bg_power_sweep`` is the ground-truth sweep, for the ablation only.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..core.errors import FmalibError
from .metrics import ConfusionMeter, mean_iou
from .rle import Intervals, MaskRuns
from .scores import min_max_norm
from .seed_rules import argmax_with_background
from .upsample import interp_matrix, interp_taps, upsample_cams

log = logging.getLogger(__name__)


# --- inputs -----------------------------------------------------------------------------------------------
def present_cams(cam_all: np.ndarray, image_labels: Sequence[int]) -> np.ndarray:
    """(C, h, w) maps in class-id order 1..C -> the (K, h, w) maps of the image's present classes."""
    cam_all = np.asarray(cam_all)
    labels = np.asarray(image_labels, np.int64)
    if cam_all.ndim != 3:
        raise FmalibError(f"present_cams: expected a (C, h, w) array, got shape {cam_all.shape}")
    if len(labels) and (labels.min() < 1 or labels.max() > cam_all.shape[0]):
        raise FmalibError(f"present_cams: labels {labels.tolist()} outside 1..{cam_all.shape[0]} (C maps)")
    return cam_all[labels - 1]


def as_mask_runs(masks, height: int | None = None, width: int | None = None) -> MaskRuns:
    """bool (N, H, W) | MaskRuns | list of COCO RLE dicts -> MaskRuns."""
    if isinstance(masks, MaskRuns):
        return masks
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise FmalibError(f"masks must be a boolean (N, H, W) array; got shape {masks.shape}")
        return MaskRuns.from_bool(masks)
    return MaskRuns.from_rles(list(masks), height, width)


def _check_inputs(cam: np.ndarray, runs: MaskRuns, levels: np.ndarray, labels: np.ndarray) -> None:
    if cam.ndim != 3 or cam.shape[0] != len(labels):
        raise FmalibError(f"cam must be (K, h, w) with K = len(image_labels) = {len(labels)} (one map per "
                          f"present class, in image_labels order); got shape {cam.shape}. "
                          f"For (C, h, w) maps of every class use present_cams(cam, image_labels).")
    if min(cam.shape[1:], default=1) < 1:
        raise FmalibError(f"cam has an empty spatial size {cam.shape[1:]}")
    if len(levels) != runs.n:
        raise FmalibError(f"levels has {len(levels)} entries for {runs.n} masks")
    if runs.n and (levels.min() < 0 or levels.max() > 2):
        raise FmalibError(f"levels must be 0 (subpart), 1 (part) or 2 (whole); got {np.unique(levels).tolist()}")
    if len(np.unique(labels)) != len(labels):
        raise FmalibError(f"image_labels {labels.tolist()} has repeated classes")
    if len(labels) and (labels.min() < 1 or labels.max() > 254):
        raise FmalibError(f"image_labels {labels.tolist()} must be foreground ids in 1..254")


# --- mask × CAM scores ------------------------------------------------------------------------------------
def column_prefix(cam: np.ndarray) -> np.ndarray:
    """ReLU then exclusive cumulative sum down each column: (K, H, W) -> (K, H + 1, W) float32 (the CAM is
    at image size here, so this ReLU comes after any upsampling).

    A loop over rows adding (K, W) slices: numpy's cumsum along a non-last axis is several times slower.
    Column sums have at most H terms, so float32 keeps them to ~1e-5 relative; totals go to float64.
    """
    k, h, w = cam.shape
    out = np.empty((k, h + 1, w), np.float32)
    out[:, 0] = 0
    if cam.size and cam.min() >= 0:
        for y in range(h):
            np.add(out[:, y], cam[:, y], out=out[:, y + 1])
        return out
    row = np.empty((k, w), np.float32)
    for y in range(h):
        np.maximum(cam[:, y], 0, out=row)
        np.add(out[:, y], row, out=out[:, y + 1])
    return out


def _scores_full_resolution(cam: np.ndarray, runs: MaskRuns, iv: Intervals) -> np.ndarray:
    """Mask sums (K, N) of an image-size CAM: column-major prefix sums P at the run boundaries; a run's sum
    is P(end) - P(start)."""
    k, h, w = cam.shape
    colcum = column_prefix(cam)
    colstart = np.concatenate([np.zeros((k, 1)), np.cumsum(colcum[:, -1], axis=1, dtype=np.float64)], axis=1)
    q = iv.bounds
    x = np.minimum(q // h, w - 1)
    y = q - x * h  # == H only for q = H * W, which reads the last column's total
    prefix = colstart[:, x] + colcum[:, y, x]
    return np.add.reduceat(prefix[:, iv.last] - prefix[:, iv.first], runs.offsets[:-1], axis=1)


def _scores_projected(cam: np.ndarray, runs: MaskRuns) -> np.ndarray:
    """Mask sums (K, N) of the bilinear upsampling U c of a NON-NEGATIVE (K, h, w) CAM to the masks' size
    (then ReLU(U c) = U c: bilinear weights are >= 0), without upsampling it: U = U_y ⊗ U_x is separable, so a run's piece in image column x (rows y0..y1) sums to
    sum_b U_x[x, b] (A[y1, b] - A[y0, b]), where A = cumsum_y(U_y) c is the CAM upsampled along y only,
    accumulated down the grid's columns — (H + 1, w, K), small — and U_x[x] has two adjacent taps b, b + 1."""
    k, h, w = cam.shape
    big_h, big_w = runs.height, runs.width
    # float32 (sums of at most H terms, ~1e-6 relative); mask totals are float64 at the end
    cum_y = np.concatenate([np.zeros((1, h)), np.cumsum(interp_matrix(big_h, h), axis=0)]).astype(np.float32)
    if cam.size and cam.min() < 0:
        raise FmalibError("_scores_projected: a CAM with negative values (ReLU comes after upsampling; "
                          "mask_cam_scores upsamples those in full)")
    pos = cam.transpose(1, 0, 2).reshape(h, k * w)
    acc = np.zeros(((big_h + 1) * w + 1, k), np.float32)  # + a zero row: every row has a right neighbour
    acc[:-1] = (cum_y @ pos).reshape(big_h + 1, k, w).transpose(0, 2, 1).reshape(-1, k)
    pairs = np.lib.stride_tricks.as_strided(acc, (len(acc) - 1, 2, k), (acc.strides[0],) * 2 + (acc.strides[1],),
                                            writeable=False)  # rows (r, r + 1): the taps b, b + 1 together
    x0, x1, wx0, wx1 = interp_taps(big_w, w)
    b = np.minimum(x0, max(w - 2, 0))
    taps = np.stack([wx0 * (x0 == b) + wx1 * (x1 == b), wx0 * (x0 == b + 1) + wx1 * (x1 == b + 1)], 1)
    taps = taps.astype(np.float32)  # (W, 2)
    # cut the runs at column ends into pieces (column x, rows y0..y1), in (mask, position) order
    s, e = runs.starts, runs.ends
    xs, xe = s // big_h, (e - 1) // big_h
    n_pieces = xe - xs + 1
    run = np.repeat(np.arange(len(s)), n_pieces)
    x = xs[run] + np.arange(len(run)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    y0 = np.where(x == xs[run], s[run] - x * big_h, 0) * w + b[x]
    y1 = np.where(x == xe[run], e[run] - x * big_h, big_h) * w + b[x]
    piece = np.einsum("pjk,pj->pk", pairs[y1] - pairs[y0], taps[x])  # (P, K)
    first_piece = np.r_[0, np.cumsum(n_pieces)][runs.offsets[:-1]]
    return np.add.reduceat(piece, first_piece, axis=0).astype(np.float64).T


def mask_cam_scores(cam: np.ndarray, runs: MaskRuns, intervals: Intervals | None = None) -> np.ndarray:
    """Mean of ReLU(U CAM_c) inside every (non-empty) mask, U the bilinear resize of the raw CAM to the
    masks' size (upsample, then ReLU: the original's order): (N, K) float64 — the (masks × pixels) ·
    (pixels × classes) product, from the runs.

    An image-size CAM is summed from column prefix sums (one pass over the CAM); a smaller, non-negative
    one (a patch grid) is never upsampled: each mask is projected onto its grid instead (the same numbers:
    ReLU is the identity on an interpolation of non-negative values); a smaller one with negative values is
    upsampled in full, then ReLU'd and summed like an image-size CAM."""
    k = cam.shape[0]
    if runs.n == 0 or k == 0:
        return np.zeros((runs.n, k))
    areas = runs.areas
    if (areas == 0).any():
        raise FmalibError("mask_cam_scores: an empty mask (drop empty masks first)")
    cam = np.asarray(cam, np.float32)
    size = (runs.height, runs.width)
    if cam.shape[1:] != size and cam.min() < 0:
        cam = upsample_cams(cam, size)
    if cam.shape[1:] == size:
        sums = _scores_full_resolution(cam, runs, intervals or Intervals.of(runs))
    else:
        sums = _scores_projected(cam, runs)
    return (sums / areas[None, :]).T


def normalize_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise each class (column) across the masks with the original's ``min_max_norm(...,
    thresh=0., eps=1e-7)`` (``method.scores``): the top mask gets span / (span + 1e-7), a constant column 0."""
    if scores.shape[0] == 0:
        return scores.astype(np.float64)
    return min_max_norm(scores.astype(np.float64).T).T


# --- labelling and painting -------------------------------------------------------------------------------
def label_masks(norm_scores: np.ndarray, bg_power: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) normalised scores -> (index into (bg, class 1st, 2nd, ...) per mask, confidence) — ties go to
    the earlier entry (background first)."""
    if not bg_power > 0:
        raise FmalibError(f"bg_power must be > 0; got {bg_power}")
    bg = (1.0 - norm_scores.max(axis=1, initial=0.0)) ** float(bg_power)
    return argmax_with_background(bg, norm_scores, axis=1)


def paint_order(levels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Mask indices in painting order: ascending level, then confidence, then index."""
    n = len(levels)
    return np.lexsort((np.arange(n), confidence, levels))


def _highest_bit(words: np.ndarray) -> np.ndarray:
    """Index of the highest set bit of each row of (E, nw) uint64 words (-1 for a zero row)."""
    top = np.full(words.shape[0], -1, np.int64)
    for wi in range(words.shape[1]):  # ascending words: a set higher word overrides
        v = words[:, wi]
        hi, lo = (v >> np.uint64(32)).astype(np.float64), (v & np.uint64(0xFFFFFFFF)).astype(np.float64)
        bits = np.where(hi > 0, 32 + np.frexp(hi)[1], np.frexp(lo)[1])  # frexp exponent = bit length
        nz = v != 0
        top[nz] = wi * 64 + bits[nz] - 1
    return top


def top_mask_per_interval(runs: MaskRuns, intervals: Intervals, order: np.ndarray) -> np.ndarray:
    """Index of the mask painted last on every interval when masks are painted in ``order`` (-1: none).

    The set of masks covering an interval, as a bitset over painting ranks, is the XOR-prefix of toggles at
    the run ends; its highest bit is the winner."""
    n_int = len(intervals.bounds) - 1
    if runs.n == 0:
        return np.full(n_int, -1, np.int64)
    rank = np.empty(runs.n, np.int64)
    rank[order] = np.arange(runs.n)
    r = rank[runs.mask_of_run]
    toggles = np.zeros((n_int + 1, (runs.n + 63) // 64), np.uint64)
    bit = np.left_shift(np.uint64(1), (r % 64).astype(np.uint64))
    np.bitwise_xor.at(toggles, (intervals.first, r // 64), bit)
    np.bitwise_xor.at(toggles, (intervals.last, r // 64), bit)
    top_rank = _highest_bit(np.bitwise_xor.accumulate(toggles[:-1], axis=0))
    return np.where(top_rank >= 0, order[np.maximum(top_rank, 0)], -1)


def expand_intervals(values: np.ndarray, intervals: Intervals, height: int, width: int) -> np.ndarray:
    """Per-interval values -> an (H, W) map."""
    flat = np.repeat(values, np.diff(intervals.bounds))
    return np.ascontiguousarray(flat.reshape(width, height).T)


def fallback_cam_argmax(cam: np.ndarray, image_labels: np.ndarray, bg_power: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The SAMS rule per pixel: CAMs (ReLU) / their max, bg = (1 - max)^p, argmax (for mask-less images)."""
    pos = np.maximum(np.asarray(cam, np.float64), 0)
    peak = pos.reshape(len(pos), -1).max(axis=1) if pos.size else np.zeros(len(pos))
    norm = pos / np.where(peak > 0, peak, 1.0)[:, None, None]
    bg = (1.0 - norm.max(axis=0, initial=0.0)) ** float(bg_power)
    idx, value = argmax_with_background(bg, norm, axis=0)
    return np.r_[0, image_labels].astype(np.uint8)[idx], value.astype(np.float32)


def check_confident(hi: float, lo: float) -> None:
    """Sure foreground (>= hi) and sure background (<= lo) must leave a band between them: hi > lo."""
    if not (0.0 <= lo < hi <= 1.0):
        raise FmalibError(f"sams.confident_hi = {hi!r} and sams.confident_lo = {lo!r}: expected "
                          f"0 <= confident_lo < confident_hi <= 1 (hi: sure-foreground level of the "
                          f"max-normalised CAM, lo: sure-background level; swapped?)")


def confident_pixels(cam: np.ndarray, image_labels: np.ndarray, hi: float, lo: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The CAM's sure pixels, each class's map scored as every consumer scores it (``scores.min_max_norm``:
    ReLU, then min-max — a raw map with a positive floor must not look sure everywhere): (sure-fg map uint8
    (H, W) holding the top class where its score >= hi and 0 elsewhere, sure-bg bool (H, W) where every score
    <= lo). No present class (K = 0): nothing is sure foreground and every pixel sure background."""
    check_confident(hi, lo)
    cam = np.asarray(cam, np.float32)
    if not len(cam):
        best = np.zeros(cam.shape[1:], np.float32)
        return np.zeros(best.shape, np.uint8), best <= lo
    norm = min_max_norm(cam)
    best = norm.max(axis=0)
    arg = np.argmax(norm, axis=0)
    fg = np.where(best >= hi, np.r_[0, image_labels][arg + 1], 0).astype(np.uint8)
    return fg, best <= lo


# --- the public entry points ------------------------------------------------------------------------------
@dataclass
class SamsImage:
    """What SAMS needs of one image, with the p-independent work (mask × CAM scores, intervals) done once."""

    height: int
    width: int
    image_labels: np.ndarray  # (K,) fg ids
    runs: MaskRuns  # non-empty masks only
    levels: np.ndarray  # (N,)
    norm_scores: np.ndarray  # (N, K) min-max normalised
    intervals: Intervals
    cam: np.ndarray | None  # (K, H, W) at image size, kept only for the no-mask fallback
    confident: tuple[np.ndarray, np.ndarray] | None = None  # confident_pixels(), for choose_bg_power

    @property
    def fallback(self) -> bool:
        return self.runs.n == 0


def sams_prepare(cam: np.ndarray, masks, levels: Sequence[int], image_labels: Sequence[int],
                 image_size: tuple[int, int] | None = None,
                 confident: tuple[float, float] | None = None) -> SamsImage:
    """Validate, drop empty masks and score every mask (everything that does not depend on p).

    ``image_size`` (H, W) is needed only for an empty RLE list; ``confident=(hi, lo)`` also keeps the CAM's
    confident pixels for ``choose_bg_power``."""
    if confident is not None:
        check_confident(*confident)
    labels = np.asarray(image_labels, np.int64).reshape(-1)
    levels = np.asarray(levels, np.int64).reshape(-1)
    runs = as_mask_runs(masks, *(image_size or (None, None)))
    cam = np.asarray(cam, np.float32)
    _check_inputs(cam, runs, levels, labels)
    h, w = runs.height, runs.width
    nonempty = np.diff(runs.offsets) > 0
    if not nonempty.all():
        runs, levels = runs.select(nonempty), levels[nonempty]
    intervals = Intervals.of(runs)
    scores = normalize_scores(mask_cam_scores(cam, runs, intervals))
    if runs.n == 0:
        log.warning("SAMS: an image without SAM masks (%dx%d, classes %s): it falls back to the CAM argmax",
                    h, w, labels.tolist())
    full = upsample_cams(cam, (h, w)) if runs.n == 0 or confident is not None else None
    sure = confident_pixels(full, labels, *confident) if confident is not None else None
    return SamsImage(h, w, labels, runs, levels, scores, intervals, full if runs.n == 0 else None, sure)


def sams_assign(image: SamsImage, bg_power: float, stats: collections.Counter | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Label the prepared masks with background power ``bg_power`` and paint them: (label_map, confidence)."""
    if stats is not None:
        stats["images"] += 1
    if image.fallback:  # warned once, by sams_prepare
        if stats is not None:
            stats["fallback"] += 1
        return fallback_cam_argmax(image.cam, image.image_labels, bg_power)
    idx, conf = label_masks(image.norm_scores, bg_power)
    top = top_mask_per_interval(image.runs, image.intervals, paint_order(image.levels, conf)) + 1  # 0: none
    lut_label = np.r_[0, np.r_[0, image.image_labels][idx]].astype(np.uint8)
    lut_conf = np.r_[0.0, conf].astype(np.float32)
    return (expand_intervals(lut_label[top], image.intervals, image.height, image.width),
            expand_intervals(lut_conf[top], image.intervals, image.height, image.width))


def sams_seed(cam: np.ndarray, masks, levels: Sequence[int], image_labels: Sequence[int], bg_power: float,
              stats: collections.Counter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SAMS seed of one image: (label_map uint8 (H, W), confidence float32 (H, W)). See the module doc."""
    return sams_assign(sams_prepare(cam, masks, levels, image_labels), bg_power, stats)


# --- background power: GT-free choice and the GT sweep ---------------------------------------------------
def power_agreement(images: Iterable[SamsImage], powers: Sequence[float]):
    """Per p: hit rate on the CAM's confident-fg and confident-bg pixels and their mean (a DataFrame).

    Images without a present class (K = 0) are left out: SAMS paints them all background whatever p is, so
    they say nothing about p (counting their pixels would only dilute the bg rate). With no image left, every
    rate is 0 and every p ties."""

    powers = [float(p) for p in powers]
    hits = np.zeros((len(powers), 4))  # fg hits, fg total, bg hits, bg total
    for image in images:
        if image.confident is None:
            raise FmalibError("power_agreement: prepare the images with sams_prepare(..., confident=(hi, lo))")
        if not len(image.image_labels):
            continue
        fg, bg = image.confident
        fg_px = fg > 0
        for i, p in enumerate(powers):
            label, _ = sams_assign(image, p)
            hits[i] += [(label[fg_px] == fg[fg_px]).sum(), fg_px.sum(), (label[bg] == 0).sum(), bg.sum()]
    fg_rate = hits[:, 0] / np.maximum(hits[:, 1], 1)
    bg_rate = hits[:, 2] / np.maximum(hits[:, 3], 1)
    return pd.DataFrame({"bg_power": powers, "fg_agreement": fg_rate, "bg_agreement": bg_rate,
                         "balanced_agreement": (fg_rate + bg_rate) / 2,
                         "fg_pixels": hits[:, 1].astype(np.int64), "bg_pixels": hits[:, 3].astype(np.int64)})


def choose_bg_power(images: Sequence[SamsImage], powers: Sequence[float]):
    """GT-free p: the highest balanced agreement on the images' confident pixels (prepared with
    ``sams_prepare(..., confident=(hi, lo))``); on a plateau of equal agreement, its middle p (the lower
    median of the tied grid values), away from the plateau's edges. Returns (p, table)."""
    if len(powers) == 0:
        raise FmalibError("choose_bg_power: empty grid of powers")
    table = power_agreement(images, sorted(powers))
    score = table["balanced_agreement"].to_numpy()
    tied = np.flatnonzero(score >= score.max() - 1e-12)
    return float(table["bg_power"].iloc[tied[(len(tied) - 1) // 2]]), table


def bg_power_sweep(images: Sequence[SamsImage], gts: Sequence[np.ndarray], powers: Sequence[float],
                   num_classes: int):
    """Ground-truth sweep (ablation only): seed mIoU per p over the images (``num_classes`` incl. bg)."""


    if len(images) != len(gts):
        raise FmalibError(f"bg_power_sweep: {len(images)} images but {len(gts)} ground truths")
    rows = []
    for p in sorted(float(v) for v in powers):
        meter = ConfusionMeter(num_classes)
        for image, gt in zip(images, gts):
            meter.add(sams_assign(image, p)[0], gt)
        rows.append({"bg_power": p, "miou": mean_iou(meter.matrix)})
    return pd.DataFrame(rows)
