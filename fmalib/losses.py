"""The two prompt-learning losses of METHOD §3.

- ``multilabel_contrastive_loss`` trains the classification prompts: for each (image, present class p),
  −log( e^{S_p} / (e^{S_p} + Σ_{j∈bg} e^{S_j}) ); only the background prompts are negatives, absent fg
  classes are masked out (and other present classes are not negatives either).
- ``cam_activation_loss`` trains the segmentation prompts from pixel seeds: the CAM of each present class
  is pulled up to its own (detached) peak where the seed says that class and pushed to ≤ 0 elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import FmalibError

IGNORE = 255


def multilabel_contrastive_loss(fg_logits: torch.Tensor, bg_logits: torch.Tensor, present: torch.Tensor,
                                bg_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (image, present class) pairs of −log softmax over {S_p} ∪ {S_j : j a valid bg prompt}.

    fg_logits (B, C), bg_logits (B, N) — scaled scores S; present (B, C) bool image labels;
    bg_valid (B, N) bool, all True by default. Images with no positive or no negative are skipped; a batch
    with no pair gives 0 (still part of the graph, so ``backward`` works).
    """
    if fg_logits.ndim != 2 or bg_logits.ndim != 2 or fg_logits.shape[0] != bg_logits.shape[0]:
        raise FmalibError(f"contrastive loss: expected fg (B, C) and bg (B, N) logits, got "
                          f"{tuple(fg_logits.shape)} and {tuple(bg_logits.shape)}")
    if present.shape != fg_logits.shape:
        raise FmalibError(f"contrastive loss: present {tuple(present.shape)} must match fg logits "
                          f"{tuple(fg_logits.shape)}")
    present = present.bool()
    if bg_valid is None:
        bg_valid = torch.ones_like(bg_logits, dtype=torch.bool)
    bg_valid = bg_valid.bool()
    keep = present.any(1) & bg_valid.any(1)  # images with at least one positive and one negative
    pairs = present & keep[:, None]
    if not pairs.any():
        return fg_logits.sum() * 0.0
    neg = bg_logits.float().masked_fill(~bg_valid, float("-inf"))
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (B, 1): log Σ_j e^{S_j}
    pos = fg_logits.float()
    # −log(e^{S_p} / (e^{S_p} + e^{lse})) = logaddexp(S_p, lse) − S_p
    per_pair = torch.logaddexp(pos, neg_lse.expand_as(pos)) - pos
    return per_pair[pairs].mean()


def cam_activation_loss(cams: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """CAM activation loss (METHOD §3) for dense CAMs (B, C, h, w) of every class; only present pairs count.

    labels (B, H, W) ints: 0 background, 1..C classes, 255 ignore; present (B, C) bool. See
    ``cam_activation_loss_pairs`` for the formula.
    """
    if cams.ndim != 4 or present.shape != cams.shape[:2]:
        raise FmalibError(f"cam loss: expected cams (B, C, h, w) and present (B, C); got {tuple(cams.shape)} "
                          f"and {tuple(present.shape)}")
    b, c = present.bool().nonzero(as_tuple=True)
    return cam_activation_loss_pairs(cams[b, c], labels, b, c + 1)


def cam_activation_loss_pairs(cams: torch.Tensor, labels: torch.Tensor, pair_image: torch.Tensor,
                              pair_class: torch.Tensor) -> torch.Tensor:
    """CAM activation loss over P (image, present class) pairs.

    cams (P, h, w) raw CAMs (no ReLU) of class ``pair_class[p]`` (1..C) on image ``pair_image[p]``;
    labels (B, H, W). Each CAM is upsampled bilinearly to (H, W). With R = pixels labelled c,
    V = non-255 pixels and m = max(0, max_R CAM) (detached):
        fg = Σ_pairs Σ_R |m − CAM|,  bg = Σ_pairs Σ_{V \\ R} max(CAM, 0),  n = Σ_pairs |V of the pair's image|,
        loss = fg / n + bg / n.
    No pair or no valid pixel gives 0 (in the graph).
    """
    if cams.ndim != 3 or labels.ndim != 3 or pair_image.shape != pair_class.shape or len(pair_image) != len(cams):
        raise FmalibError(f"cam loss: expected cams (P, h, w), labels (B, H, W), P image/class indices; got "
                          f"{tuple(cams.shape)}, {tuple(labels.shape)}, {tuple(pair_image.shape)}, "
                          f"{tuple(pair_class.shape)}")
    if len(cams) == 0:
        return cams.sum() * 0.0
    lab = labels[pair_image.long()].long()  # (P, H, W)
    cam = F.interpolate(cams[:, None].float(), size=lab.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    region = lab == pair_class.long()[:, None, None]
    valid = lab != IGNORE
    count = valid.sum()
    if count == 0:
        return cams.sum() * 0.0
    peak = cam.detach().masked_fill(~region, float("-inf")).amax(dim=(1, 2)).clamp(min=0)  # -inf → 0 if R empty
    fg = ((peak[:, None, None] - cam).abs() * region).sum()
    bg = (cam.clamp(min=0) * (valid & ~region)).sum()
    return fg / count + bg / count
