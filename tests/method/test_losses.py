"""The two prompt losses (docs/method.md §3) against direct formulas on small hand-made cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from fmalib.core.errors import FmalibError
from fmalib.method.losses import (bg_negatives_contrastive_loss, cam_activation_loss, cam_activation_loss_pairs,
                                  multilabel_contrastive_loss)


def _absent_fg_reference(fg, present):
    """docs/method.md §3 by hand: per positive p, -log(e^Sp / (e^Sp + sum over absent n of e^Sn)), mean over pairs."""
    terms = []
    for b in range(len(fg)):
        absent = [n for n in range(len(fg[b])) if not present[b][n]]
        if not absent:
            continue
        for p in range(len(fg[b])):
            if present[b][p]:
                s = math.exp(fg[b][p])
                terms.append(-math.log(s / (s + sum(math.exp(fg[b][n]) for n in absent))))
    return sum(terms) / len(terms)


def test_contrastive_negatives_are_the_absent_classes():
    fg = torch.tensor([[2.0, -1.0, 0.5, 1.5], [0.3, 0.1, 4.0, -0.7]])
    present = torch.tensor([[True, False, True, False], [False, False, True, False]])
    loss = multilabel_contrastive_loss(fg, present)
    assert loss.item() == pytest.approx(_absent_fg_reference(fg.tolist(), present.tolist()), rel=1e-6)
    # image 0, class 0 by hand: negatives are classes 1 and 3; class 2 (present) is not in the denominator
    one = multilabel_contrastive_loss(fg[:1, :2], present[:1, :2])
    assert one.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(-1))), rel=1e-6)
    # raising an absent class raises the loss; raising another present class leaves class 0's term alone
    up = fg.clone()
    up[0, 3] += 3.0
    assert multilabel_contrastive_loss(up, present).item() > loss.item()
    other = fg[:1].clone()
    other[0, 2] += 5.0
    ref = _absent_fg_reference(other.tolist(), present[:1].tolist())
    assert multilabel_contrastive_loss(other, present[:1]).item() == pytest.approx(ref, rel=1e-6)


def test_contrastive_gradient_pushes_absent_down_and_present_up():
    fg = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    present = torch.tensor([[True, False, False]])
    multilabel_contrastive_loss(fg, present).backward()
    assert fg.grad[0, 0] < 0 and (fg.grad[0, 1:] > 0).all()
    # reference gradient: d/dS_p = -(1 - softmax_p), d/dS_n = softmax_n over {p} U absent
    sm = torch.softmax(fg.detach()[0], 0)
    assert torch.allclose(fg.grad[0], torch.tensor([-(1 - sm[0]), sm[1], sm[2]]), atol=1e-6)


def test_contrastive_skips_images_without_positive_or_negative():
    fg = torch.tensor([[1.0, 2.0], [0.5, 0.5], [3.0, 0.0]], requires_grad=True)
    present = torch.tensor([[True, False], [False, False], [True, True]])  # image 1: no positive; 2: no negative
    loss = multilabel_contrastive_loss(fg, present)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + math.e ** 2)), rel=1e-6)
    loss.backward()
    assert fg.grad[1:].abs().sum() == 0 and fg.grad[0, 0] < 0
    empty = multilabel_contrastive_loss(fg, torch.zeros(3, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def _bg_reference(fg, bg, present):
    terms = []
    for b in range(len(fg)):
        for p in range(len(fg[b])):
            if present[b][p] and bg[b]:
                s = math.exp(fg[b][p])
                terms.append(-math.log(s / (s + sum(math.exp(v) for v in bg[b]))))
    return sum(terms) / len(terms)


def test_bg_negatives_ablation_matches_its_formula():
    fg = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.1, 4.0]])
    bg = torch.tensor([[1.0, 0.0], [-2.0, 3.0]])
    present = torch.tensor([[True, False, True], [False, False, True]])
    loss = bg_negatives_contrastive_loss(fg, bg, present)
    assert loss.item() == pytest.approx(_bg_reference(fg.tolist(), bg.tolist(), present.tolist()), rel=1e-6)
    fg2 = fg.clone()
    fg2[0, 1] = 50.0  # absent classes play no part in this variant
    assert bg_negatives_contrastive_loss(fg2, bg, present).item() == pytest.approx(loss.item(), rel=1e-6)
    bg_valid = torch.tensor([[True, False], [False, False]])  # image 1 has no negative
    part = bg_negatives_contrastive_loss(fg, bg, present, bg_valid)
    ref = (-math.log(math.e ** 2 / (math.e ** 2 + math.e)) - math.log(math.exp(0.5) / (math.exp(0.5) + math.e))) / 2
    assert part.item() == pytest.approx(ref, rel=1e-6)


def test_cam_loss_hand_case():
    # one image, one class, no resize: labels [[1, 0], [255, 1]]
    cam = torch.tensor([[[[0.5, -0.2], [0.9, 0.1]]]], requires_grad=True)
    labels = torch.tensor([[[1, 0], [255, 1]]])
    loss = cam_activation_loss(cam, labels, torch.tensor([[True]]))
    # peak over class pixels 0.5: fg |0.5-0.5| + |0.5-0.1| = 0.4; bg relu(-0.2) = 0; 3 valid pixels
    assert loss.item() == pytest.approx(0.4 / 3, rel=1e-6)
    loss.backward()
    g = cam.grad[0, 0]
    assert g[1, 0] == 0  # ignored pixel
    assert g[1, 1] == pytest.approx(-1 / 3)  # pulled up towards the peak
    # bg term pushes positive CAM down outside the class; a negative peak is clamped to 0
    cam2 = torch.tensor([[[[-0.5, 0.7], [0.3, -0.1]]]])
    loss2 = cam_activation_loss(cam2, labels, torch.tensor([[True]]))
    assert loss2.item() == pytest.approx((0.5 + 0.1 + 0.7) / 3, rel=1e-6)


def _cam_reference(cams, labels, present):
    fg = bg = 0.0
    count = 0
    B, C = present.shape
    H, W = labels.shape[1:]
    up = F.interpolate(cams, size=(H, W), mode="bilinear", align_corners=False)
    for b in range(B):
        valid = int((labels[b] != 255).sum())
        for c in range(C):
            if not present[b, c]:
                continue
            count += valid
            vals = [up[b, c, y, x].item() for y in range(H) for x in range(W) if labels[b, y, x] == c + 1]
            m = max(0.0, max(vals)) if vals else 0.0
            for y in range(H):
                for x in range(W):
                    lab, v = int(labels[b, y, x]), up[b, c, y, x].item()
                    if lab == c + 1:
                        fg += abs(m - v)
                    elif lab != 255:
                        bg += max(v, 0.0)
    return fg / count + bg / count


def test_cam_loss_random_case_with_upsampling_matches_loop():
    g = torch.Generator().manual_seed(0)
    cams = torch.randn(2, 3, 3, 4, generator=g)
    labels = torch.randint(0, 4, (2, 6, 8), generator=g)
    labels[0, :2, :3] = 255
    labels[1] = labels[1].clamp(max=2)  # class 3 present in the labels of image 1 but absent from its seed
    present = torch.tensor([[True, False, True], [True, True, True]])
    loss = cam_activation_loss(cams, labels, present)
    assert loss.item() == pytest.approx(_cam_reference(cams, labels, present), rel=1e-5)
    # pair form == dense form
    b, c = present.nonzero(as_tuple=True)
    assert cam_activation_loss_pairs(cams[b, c], labels, b, c + 1).item() == pytest.approx(loss.item(), rel=1e-6)


def test_cam_loss_degenerate_and_bad_input():
    labels = torch.full((1, 4, 4), 255)
    cams = torch.randn(1, 2, 2, 2, requires_grad=True)
    assert cam_activation_loss(cams, labels, torch.tensor([[True, True]])).item() == 0.0
    assert cam_activation_loss(cams, labels, torch.tensor([[False, False]])).item() == 0.0
    with pytest.raises(FmalibError):
        cam_activation_loss(cams, labels, torch.tensor([True, True]))
