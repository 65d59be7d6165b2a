"""Details a plausible bug would get wrong while every piece still looks right: the CAM loss's peak is a
constant in the gradient, the GT-free background-power criterion counts every class's sure pixels, and each
threshold is strict or not as the original's code compares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmalib.method.caa import scoremap_boxes
from fmalib.method.losses import cam_activation_loss_pairs
from fmalib.method.sams import confident_pixels, power_agreement, sams_prepare, sams_seed
from fmalib.method.scores import min_max_norm
from fmalib.method.seed_rules import bg_threshold_sweep, cam_argmax_seeds


def test_cam_loss_gradient_treats_the_peak_as_a_constant():
    # one pair, no resize: class-1 pixels hold 0.9 (the peak), 0.4, 0.1; a background pixel 0.3; one ignored
    cam = torch.tensor([[[0.9, 0.4, 0.3], [0.1, 0.7, 0.2]]], requires_grad=True)
    labels = torch.tensor([[[1, 1, 0], [1, 255, 0]]])
    loss = cam_activation_loss_pairs(cam, labels, torch.tensor([0]), torch.tensor([1]))
    loss.backward()
    n = 5  # valid pixels
    want = torch.tensor([[[0.0, -1 / n, 1 / n], [-1 / n, 0.0, 1 / n]]])
    # a peak carried in the graph would add +2/n at the peak pixel (two class pixels below it pull it down)
    assert torch.allclose(cam.grad, want, atol=1e-7)
    assert loss.item() == pytest.approx(((0.9 - 0.4) + (0.9 - 0.1) + 0.3 + 0.2) / n, rel=1e-6)


def _reference_agreement(cam, masks, levels, labels, powers, hi, lo):
    """The criterion by its definition, a pixel at a time: each class's CAM ReLU'd, then min-max scaled as the
    original's cam2score, (x - min) / (max - min + 1e-7); a pixel is sure foreground of class c when c's map is the top one there and >= hi, sure background when
    every map is <= lo; per p, the share of sure pixels SAMS labels that way, then the mean of the two."""
    pos = [np.maximum(c.astype(np.float64), 0) for c in cam]
    norm = np.stack([(c - c.min()) / (c.max() - c.min() + 1e-7) for c in pos])
    rows = []
    for p in powers:
        label, _ = sams_seed(cam, masks, levels, labels, p)
        fg_hit = fg_n = bg_hit = bg_n = 0
        for y in range(cam.shape[1]):
            for x in range(cam.shape[2]):
                top = int(np.argmax(norm[:, y, x]))
                if norm[top, y, x] >= hi:
                    fg_n += 1
                    fg_hit += label[y, x] == labels[top]
                if (norm[:, y, x] <= lo).all():
                    bg_n += 1
                    bg_hit += label[y, x] == 0
        rows.append((fg_hit / fg_n + bg_hit / bg_n) / 2)
    return rows


def test_bg_power_criterion_counts_every_class():
    h, w = 10, 14
    cam = np.zeros((2, h, w), np.float32)
    cam[0, 1:6, 1:6], cam[0, 2:5, 2:5] = 0.5, 1.0  # class 3: strong core, weak rim
    cam[1, 4:9, 8:13], cam[1, 5:8, 9:12] = 0.3, 2.0  # class 5: another scale; its rim is sure only at lo hi
    cam[1] += 0.2  # and a positive floor (a raw map): divided by its max alone, nothing would be sure bg
    masks = np.zeros((5, h, w), bool)
    masks[0, 2:5, 2:5] = masks[1, 1:6, 1:6] = True
    masks[2, 5:8, 9:12] = masks[3, 4:9, 8:13] = True
    masks[4] = True
    levels, labels, powers = [1, 2, 1, 2, 2], [3, 5], [0.3, 1.0, 3.0]
    for hi, lo in ((0.7, 0.05), (0.12, 0.05)):
        image = sams_prepare(cam, masks, levels, labels, confident=(hi, lo))
        got = power_agreement([image], powers)["balanced_agreement"].tolist()
        assert got == pytest.approx(_reference_agreement(cam, masks, levels, labels, powers, hi, lo), abs=1e-12)


def test_threshold_boundaries_strict_or_not_as_the_original():
    # CAA boxes: uint8 score strictly above int(t * max) (scoremap2bbox's cv2.threshold, THRESH_BINARY)
    score = np.zeros((3, 8), np.float32)
    score[1, 1], score[1, 5] = 1.0, 102 / 255 + 1e-6  # 102 = int(0.4 * 255): on the threshold, not above
    assert scoremap_boxes(score, 0.4) == [(1, 1, 2, 2)]
    score[1, 5] = 103 / 255 + 1e-6
    assert scoremap_boxes(score, 0.4) == [(1, 1, 2, 2), (5, 1, 6, 2)]
    # sure pixels: >= hi and <= lo, both inclusive (the thresholds placed exactly on two pixels' scores)
    cam = np.array([[[1.0, 0.7, 0.6999, 0.1, 0.1001, 0.0]]], np.float32)
    on = min_max_norm(cam)[0, 0]
    fg, bg = confident_pixels(cam, np.array([4]), hi=float(on[1]), lo=float(on[3]))
    assert fg.tolist() == [[4, 4, 0, 0, 0, 0]] and bg.tolist() == [[False, False, False, True, False, True]]
    # scored as min-max, not divided by the max: a floor of 0.5 makes the 0.75 pixel the map's middle
    fg, bg = confident_pixels(np.array([[[1.0, 0.75, 0.5]]], np.float32), np.array([2]), hi=0.6, lo=0.1)
    assert fg.tolist() == [[2, 0, 0]] and bg.tolist() == [[False, False, True]]
    # CAM argmax: a class beats the background threshold only strictly, in the seeds and in the sweep alike
    cams = np.array([[[0.0, 0.25, 0.5, 1.0]]], np.float32)
    t = float(np.float32(0.5) / np.float32(1 + 1e-7))  # the score of 0.5 after min-max with the 1e-7
    seeds = cam_argmax_seeds(cams, [2], t)
    assert seeds.tolist() == [[0, 0, 0, 2]]
    gt_all_bg_but_last = np.array([[0, 0, 0, 2]], np.uint8)
    assert bg_threshold_sweep([(cams, np.array([2]), gt_all_bg_but_last)], [t], 3)[t] == pytest.approx(1.0)
