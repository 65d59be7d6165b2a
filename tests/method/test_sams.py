"""SAMS seeding: the vectorised run-length implementation equals a plain per-mask loop of docs/method.md §5."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from fmalib.core.errors import FmalibError
from fmalib.method.rle import MaskRuns
from fmalib.method.sams import (bg_power_sweep, choose_bg_power, mask_cam_scores, present_cams, sams_assign,
                                sams_prepare, sams_seed)
from fmalib.method.upsample import upsample_cams


def reference_upsample_relu(cam, size):
    """The original's order: ``F.interpolate`` (bilinear, align_corners=False) of the raw CAM, then ReLU."""
    cam = torch.as_tensor(np.asarray(cam, np.float32))
    if tuple(cam.shape[1:]) != tuple(size):
        cam = F.interpolate(cam[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return torch.clamp(cam, min=0).numpy()


def reference_sams(cam, masks, levels, image_labels, bg_power):
    """docs/method.md §5 read literally, one mask at a time, with the original's min_max_norm (+1e-7 on the span);
    ``cam`` at any size (kept as the oracle and as bench/sams.py's baseline)."""
    n, h, w = masks.shape
    cam = reference_upsample_relu(cam, (h, w))
    k = len(image_labels)
    keep = [i for i in range(n) if masks[i].any()]
    if not keep:  # fallback: the same rule per pixel on max-normalised CAMs
        norm = np.stack([c / c.max() if c.max() > 0 else c for c in cam.astype(np.float64)]) if k else \
            np.zeros((0, h, w))
        bg = (1.0 - norm.max(axis=0, initial=0.0)) ** bg_power
        table = np.concatenate([bg[None], norm])
        idx = table.argmax(0)
        return np.r_[0, image_labels].astype(np.uint8)[idx], table.max(0).astype(np.float32)
    scores = np.zeros((len(keep), k))
    for j, i in enumerate(keep):
        for c in range(k):
            scores[j, c] = cam[c][masks[i]].astype(np.float64).sum() / masks[i].sum()
    for c in range(k):
        lo, hi = scores[:, c].min(), scores[:, c].max()
        scores[:, c] = (scores[:, c] - lo) / (hi - lo + 1e-7)
    bg = (1.0 - scores.max(axis=1, initial=0.0)) ** bg_power
    labels, confs = [], []
    for j in range(len(keep)):
        best, lab = bg[j], 0
        for c in range(k):
            if scores[j, c] > best:  # strict: ties keep background / the lower class
                best, lab = scores[j, c], int(image_labels[c])
        labels.append(lab)
        confs.append(best)
    order = sorted(range(len(keep)), key=lambda j: (levels[keep[j]], confs[j]))  # stable: index breaks ties
    label_map = np.zeros((h, w), np.uint8)
    conf_map = np.zeros((h, w), np.float32)
    for j in order:
        label_map[masks[keep[j]]] = labels[j]
        conf_map[masks[keep[j]]] = confs[j]
    return label_map, conf_map


def random_case(rng, n_masks, h, w, k, n_classes=6):
    """Dyadic CAM values (sums exact in any order, so ties are exact) with negatives, overlapping boxes and
    blobs, duplicated and empty masks, random levels."""
    cam = (rng.integers(-2, 5, size=(k, h, w)) / 4).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n_masks, h, w), bool)
    for i in range(n_masks):
        kind = rng.integers(4)
        if kind == 0:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            masks[i, y0:y0 + rng.integers(1, h), x0:x0 + rng.integers(1, w)] = True
        elif kind == 1:
            cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, h), rng.uniform(1, w)
            masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        elif kind == 2:
            masks[i] = rng.random((h, w)) < 0.3
        elif i > 0:
            masks[i] = masks[rng.integers(i)]  # duplicate: exact confidence ties
    if n_masks > 2:
        masks[rng.integers(n_masks)] = False  # an empty mask
    levels = rng.integers(0, 3, size=n_masks)
    labels = np.sort(rng.choice(np.arange(1, n_classes + 1), size=k, replace=False))
    return cam, masks, levels, labels


@pytest.mark.parametrize("seed", range(12))
def test_equals_reference_loop(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(3, 30)), int(rng.integers(3, 30))
    cam, masks, levels, labels = random_case(rng, int(rng.integers(1, 12)), h, w, int(rng.integers(0, 4)))
    for p in (0.5, 1.0, 3.0):  # p = 1 with dyadic scores makes bg == class ties
        want_label, want_conf = reference_sams(cam, masks, levels, labels, p)
        got_label, got_conf = sams_seed(cam, masks, levels, labels, p)
        assert got_label.dtype == np.uint8 and got_conf.dtype == np.float32
        np.testing.assert_array_equal(got_label, want_label)
        np.testing.assert_array_equal(got_conf, want_conf)


def test_mask_formats_agree_and_rle_path():
    rng = np.random.default_rng(3)
    cam, masks, levels, labels = random_case(rng, 9, 17, 23, 2)
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    want = sams_seed(cam, masks, levels, labels, 0.7)
    for form in (MaskRuns.from_bool(masks), rles):
        got = sams_seed(cam, form, levels, labels, 0.7)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_ties_and_painting_order_by_hand():
    # two identical whole masks -> identical confidence: the later index paints last
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, :, :2] = 1.0  # class 3 on the left half
    cam[1, :, 2:] = 1.0  # class 5 on the right half
    masks = np.zeros((4, 4, 4), bool)
    masks[0, :, :2] = True  # left: class 3, conf 1
    masks[1, :, 2:] = True  # right: class 5, conf 1
    masks[2] = True  # a part covering the image: both classes tie with bg at 0.5 -> background
    masks[3, :, 1:3] = True  # a middle-strip subpart: the same tie
    levels = np.array([2, 2, 1, 0])
    label, conf = sams_seed(cam, masks, levels, [3, 5], bg_power=1.0)
    # wholes (level 2) land last and cover everything
    np.testing.assert_array_equal(label, np.where(np.arange(4) < 2, 3, 5)[None].repeat(4, 0))
    assert (conf == np.float32(1 / (1 + 1e-7))).all()  # the original's +1e-7 on the span
    # a mask whose two normalised class scores tie at 1 -> the lower class id wins (a second mask on the
    # CAM-free corner makes the scores vary)
    cam2 = np.ones((2, 4, 4), np.float32)
    cam2[:, 0, 0] = 0
    m2 = np.zeros((2, 4, 4), bool)
    m2[0] = True
    m2[0, 0, 0] = False
    m2[1, 0, 0] = True
    label2, _ = sams_seed(cam2, m2, [2, 2], [3, 5], bg_power=1.0)
    assert label2[1, 1] == 3 and label2[0, 0] == 0


def test_uncovered_pixels_are_background_and_absent_classes_never_appear():
    rng = np.random.default_rng(5)
    cam = rng.random((2, 10, 12)).astype(np.float32)
    masks = np.zeros((3, 10, 12), bool)
    masks[0, :5, :5] = masks[1, 5:, 6:] = masks[2, 2:8, 3:9] = True
    label, conf = sams_seed(cam, masks, [2, 1, 0], [2, 6], 2.0)
    uncovered = ~masks.any(0)
    assert (label[uncovered] == 0).all() and (conf[uncovered] == 0).all()
    assert set(np.unique(label)) <= {0, 2, 6}


def test_no_masks_falls_back_to_cam_argmax_and_counts():
    rng = np.random.default_rng(7)
    cam = rng.random((2, 6, 7)).astype(np.float32)
    stats = collections.Counter()
    for masks in (np.zeros((0, 6, 7), bool), np.zeros((2, 6, 7), bool)):
        label, conf = sams_seed(cam, masks, [2] * len(masks), [1, 4], 0.6, stats=stats)
        want = reference_sams(cam, masks, [2] * len(masks), np.array([1, 4]), 0.6)
        np.testing.assert_array_equal(label, want[0])
        np.testing.assert_allclose(conf, want[1], rtol=1e-6)
    assert stats == {"images": 2, "fallback": 2}
    # an empty RLE list needs the image size
    with pytest.raises(FmalibError, match="height, width"):
        sams_seed(cam, [], [], [1, 4], 0.6)
    image = sams_prepare(cam, [], [], [1, 4], image_size=(6, 7))
    assert image.fallback and sams_assign(image, 0.6)[0].shape == (6, 7)


def test_cam_scale_invariance_and_upsampling():
    rng = np.random.default_rng(11)
    cam, masks, levels, labels = random_case(rng, 8, 16, 20, 3)
    # invariant to positive per-class factors up to the 1e-7, i.e. where no two classes tie exactly (the
    # dyadic case has exact ties, which the 1e-7 breaks by span; a continuous CAM has none)
    smooth = rng.random(cam.shape).astype(np.float32)
    base = sams_seed(smooth, masks, levels, labels, 0.8)[0]
    scaled = smooth * np.array([2.0, 0.5, 4.0], np.float32)[:, None, None]
    np.testing.assert_array_equal(sams_seed(scaled, masks, levels, labels, 0.8)[0], base)
    np.testing.assert_array_equal(sams_seed(scaled, masks, levels, labels, 0.8)[0],
                                  reference_sams(scaled, masks, levels, labels, 0.8)[0])
    # a non-negative patch-grid CAM is never upsampled (masks are projected onto its grid) yet gives the
    # seed of its bilinear upsampling; dyadic values and a factor of 4 keep every sum exact
    low = np.maximum(cam[:, ::4, ::4], 0)
    up = upsample_cams(low, (16, 20))
    torch_up = F.interpolate(torch.from_numpy(low)[None], size=(16, 20), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(up, torch_up[0].numpy(), atol=1e-6)
    for p in (0.5, 1.0):
        want = reference_sams(low, masks, levels, labels, p)
        got = sams_seed(low, masks, levels, labels, p)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("seed", range(4))
def test_projected_scores_match_dense_product_any_grid(seed):
    rng = np.random.default_rng(seed)
    big_h, big_w, h, w = *rng.integers(5, 50, 2), *rng.integers(1, 60, 2)  # up- and down-sampling
    low = rng.random((3, h, w)).astype(np.float32)
    masks = rng.random((5, big_h, big_w)) < 0.4
    masks[0] = True
    masks[1, :, : big_w // 2] = True
    up = upsample_cams(low, (big_h, big_w)).astype(np.float64)
    dense = masks.reshape(5, -1) @ up.reshape(3, -1).T / masks.reshape(5, -1).sum(1)[:, None]
    runs = MaskRuns.from_bool(masks)
    np.testing.assert_allclose(mask_cam_scores(low, runs), dense, rtol=1e-5)
    np.testing.assert_allclose(mask_cam_scores(up.astype(np.float32), runs), dense, rtol=1e-5)


def _negative_grid_case(seed):
    """A 4x4 grid CAM with negative patches next to positive ones, upsampled x4 (dyadic: exact sums)."""
    rng = np.random.default_rng(seed)
    low = (rng.integers(-8, 5, size=(3, 4, 4)) / 4).astype(np.float32)
    low[0, 0, 0], low[1, 3, 3] = 1.0, 1.0  # every class has some positive evidence
    cam, masks, levels, labels = random_case(rng, 10, 16, 16, 3)
    return low, masks, levels, labels


@pytest.mark.parametrize("seed", range(4))
def test_negative_grid_cam_is_upsampled_then_relud(seed):
    low, masks, levels, labels = _negative_grid_case(seed)
    nonempty = masks.reshape(len(masks), -1).any(1)
    runs = MaskRuns.from_bool(masks[nonempty])
    flat = masks[nonempty].reshape(nonempty.sum(), -1).astype(np.float64)
    up_relu = reference_upsample_relu(low, (16, 16)).reshape(3, -1).astype(np.float64)
    relu_up = F.interpolate(torch.from_numpy(np.maximum(low, 0))[None], size=(16, 16), mode="bilinear",
                            align_corners=False)[0].numpy().reshape(3, -1)
    want = flat @ up_relu.T / flat.sum(1)[:, None]
    wrong = flat @ relu_up.T / flat.sum(1)[:, None]
    assert np.abs(want - wrong).max() > 0.01  # the case tells the two orders apart
    np.testing.assert_array_equal(mask_cam_scores(low, runs), want)
    for p in (0.5, 1.0, 3.0):
        got = sams_seed(low, masks, levels, labels, p)
        ref = reference_sams(low, masks, levels, labels, p)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    # the same numbers as handing SAMS the CAM already upsampled (raw) to image size
    up_raw = F.interpolate(torch.from_numpy(low)[None], size=(16, 16), mode="bilinear",
                           align_corners=False)[0].numpy()
    np.testing.assert_array_equal(sams_seed(up_raw, masks, levels, labels, 0.7)[0],
                                  sams_seed(low, masks, levels, labels, 0.7)[0])


def test_orders_differ_on_the_seed_by_hand():
    # class 1 is positive on the left patch column and negative on the right one (2 x 2 -> 8 x 8): the
    # strip right of the middle reads -0.25, -0.75 upsampled raw -> ReLU 0, but 0.375, 0.125 if ReLU came
    # first; with p = 6 that strip is background in the original's order and class 1 in the other
    low = np.array([[[1.0, -1.0], [1.0, -1.0]]], np.float32)
    masks = np.zeros((3, 8, 8), bool)
    masks[0, :, :2] = True  # the left edge: 1, 1
    masks[1, :, 4:6] = True  # right of the middle
    masks[2, :, 6:] = True  # the right edge: -1, -1 either way 0
    np.testing.assert_array_equal(mask_cam_scores(low, MaskRuns.from_bool(masks))[:, 0], [1.0, 0.0, 0.0])
    label, _ = sams_seed(low, masks, [2, 2, 2], [1], bg_power=6.0)
    np.testing.assert_array_equal(label, reference_sams(low, masks, [2, 2, 2], np.array([1]), 6.0)[0])
    assert (label[masks[0]] == 1).all() and (label[masks[1]] == 0).all()
    relu_first = upsample_cams(np.maximum(low, 0), (8, 8))
    wrong, _ = reference_sams(relu_first, masks, [2, 2, 2], np.array([1]), 6.0)
    assert (wrong[masks[1]] == 1).all()  # the other order would label the strip


def test_minmax_eps_breaks_class_ties_like_the_original():
    # both classes peak on mask 0, class 5 with a larger span: a plain min-max gives both exactly 1 (the
    # lower id, class 3, would win); the original's (s - min) / (max - min + 1e-7) gives class 5
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, :2] = 0.25  # class 3: 0.25 on mask 0, 0 on mask 1 -> span 0.25
    cam[1, :2] = 1.0  # class 5: span 1
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2] = True
    masks[1, 2:] = True
    label, conf = sams_seed(cam, masks, [2, 2], [3, 5], bg_power=1.0)
    assert (label[:2] == 5).all() and (label[2:] == 0).all()
    assert conf[0, 0] == np.float32(1 / (1 + 1e-7))
    np.testing.assert_array_equal(label, reference_sams(cam, masks, [2, 2], np.array([3, 5]), 1.0)[0])
    # the eps also leaves the top mask a background score > 0: (1e-7 / (span + 1e-7)) ** p
    image = sams_prepare(cam, masks, [2, 2], [3, 5])
    assert image.norm_scores[0].tolist() == [0.25 / (0.25 + 1e-7), 1 / (1 + 1e-7)]


def test_swapped_confident_levels_are_rejected():
    cam = np.ones((1, 4, 4), np.float32)
    masks = np.ones((1, 4, 4), bool)
    for hi, lo in ((0.1, 0.9), (0.5, 0.5)):
        with pytest.raises(FmalibError, match=r"confident_hi.*confident_lo"):
            sams_prepare(cam, masks, [2], [1], confident=(hi, lo))
    assert sams_prepare(cam, masks, [2], [1], confident=(0.9, 0.1)).confident is not None


def test_bad_inputs_raise_one_clear_error():
    cam = np.zeros((2, 5, 5), np.float32)
    masks = np.ones((1, 5, 5), bool)
    with pytest.raises(FmalibError, match="present_cams"):
        sams_seed(np.zeros((6, 5, 5), np.float32), masks, [2], [1, 3], 0.5)
    with pytest.raises(FmalibError, match="levels"):
        sams_seed(cam, masks, [3], [1, 3], 0.5)
    with pytest.raises(FmalibError, match="bg_power"):
        sams_seed(cam, masks, [2], [1, 3], 0.0)
    with pytest.raises(FmalibError, match="repeated"):
        sams_seed(cam, masks, [2], [3, 3], 0.5)
    np.testing.assert_array_equal(present_cams(np.arange(6)[:, None, None] * np.ones((6, 2, 2)), [2, 5])[:, 0, 0],
                                  [1, 4])


def test_choose_bg_power_and_gt_sweep():
    # an object whose CAM is strong on its core (mask 0) and weaker on its rim (mask 1), and background
    # (mask 2): the CAM is sure about the core and the far background only
    h, w = 12, 12
    cam = np.zeros((1, h, w), np.float32)
    cam[0, 3:9, 3:9] = 0.5
    cam[0, 4:8, 4:8] = 1.0
    masks = np.zeros((3, h, w), bool)
    masks[0, 4:8, 4:8] = True
    masks[1, 3:9, 3:9] = True
    masks[1, 4:8, 4:8] = False
    masks[2] = True
    masks[2, 3:9, 3:9] = False
    gt = np.zeros((h, w), np.uint8)
    gt[3:9, 3:9] = 2
    image = sams_prepare(cam, masks, [2, 2, 2], [2], confident=(0.7, 0.1))
    p, table = choose_bg_power([image], [0.25, 0.5, 1.0, 2.0, 4.0])
    # every p agrees fully with the sure pixels (the rim has none): the middle of the plateau
    assert (table["balanced_agreement"] == 1.0).all() and p == 1.0
    # a case with one best p: the rim is sure foreground (>= hi), so small p that leave it bg lose
    sure_rim = sams_prepare(cam, masks, [2, 2, 2], [2], confident=(0.45, 0.1))
    p2, table2 = choose_bg_power([sure_rim], [0.25, 0.5, 2.0, 4.0])
    assert table2["fg_agreement"].tolist()[:2] == [pytest.approx(16 / 36)] * 2 and p2 == 2.0
    sweep = bg_power_sweep([image], [gt], [0.5, 2.0], num_classes=3)
    # the rim's normalised score is 0.5: background at p = 0.5 (0.5^0.5 > 0.5), the object at p = 2
    assert sweep["miou"].tolist()[1] == pytest.approx(1.0) and sweep["miou"].tolist()[0] < 1.0
    with pytest.raises(FmalibError, match="confident"):
        choose_bg_power([sams_prepare(cam, masks, [2, 2, 2], [2])], [1.0])


def test_region_recall_matches_a_plain_iou_loop():
    from fmalib.method.masks import MaskSet
    from fmalib.method.metrics import region_recall
    from fmalib.method.rle import MaskRuns

    rng = np.random.default_rng(3)
    gt = np.zeros((20, 24), np.uint8)
    gt[2:10, 3:12], gt[12:18, 14:22], gt[0, :] = 1, 2, 255
    masks = np.zeros((4, 20, 24), bool)
    masks[0, 2:10, 3:12] = True  # class 1 exactly
    masks[1, 12:18, 14:18] = True  # half of class 2: IoU 0.5
    masks[2] = rng.random((20, 24)) < 0.3
    masks[3, 12:18, 10:22] = True  # class 2 plus as much again: IoU 0.5 too
    ms = MaskSet.from_runs(MaskRuns.from_bool(masks), [2, 1, 0, 2], np.ones(4), np.ones(4))
    for thr in (0.4, 0.5, 0.6, 0.99):
        expect = sum(any((m & (gt == c)).sum() / (m | (gt == c)).sum() >= thr for m in masks) for c in (0, 1, 2))
        assert region_recall(ms, gt, thr) == (expect, 3)
    assert region_recall(ms.select([]), gt) == (0, 3)
