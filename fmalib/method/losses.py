"""The two prompt-learning losses of docs/method.md §3 (and one named ablation).

- ``multilabel_contrastive_loss`` trains the classification prompts (the original's ``MultiLabelCLLoss``,
  reduce ``pos_mean``): only foreground logits enter; for each (image, present class p),
  −log( e^{S_p} / (e^{S_p} + Σ_{n absent} e^{S_n}) ) — the negatives are the image's absent fg classes, other
  present classes are not in the denominator, and the background prompts are not in the loss at all.
- ``bg_negatives_contrastive_loss``: the same form with the *background prompts* as the negatives — what an
  earlier reading of the paper said. Kept only as the ablation ``prompts.cls.loss: bg_negatives``
  (notebook 07): nothing in it separates one foreground class from another.
- ``cam_activation_loss`` trains the segmentation prompts from pixel seeds: the CAM of each present class
  is pulled up to its own (detached) peak where the seed says that class and pushed to ≤ 0 elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import FmalibError
from ..core.label_ids import IGNORE

CLS_LOSSES = ("absent_fg", "bg_negatives")


def _pairs_loss(pos: torch.Tensor, neg_lse: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean over the True entries of ``pairs`` of −log(e^{S_p} / (e^{S_p} + e^{neg_lse})) = logaddexp − S_p."""
    per_pair = torch.logaddexp(pos, neg_lse.expand_as(pos)) - pos
    return per_pair[pairs].mean()


def multilabel_contrastive_loss(fg_logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean over (image, present class p) pairs of −log(e^{S_p} / (e^{S_p} + Σ_{n absent} e^{S_n})).

    fg_logits (B, C) scaled scores S of the foreground prompts only; present (B, C) bool image labels.
    Only images with at least one present and one absent class count; a batch with none gives 0 (still
    part of the graph, so ``backward`` works).
    """
    if fg_logits.ndim != 2 or present.shape != fg_logits.shape:
        raise FmalibError(f"contrastive loss: expected fg logits (B, C) and present (B, C); got "
                          f"{tuple(fg_logits.shape)} and {tuple(present.shape)}")
    present = present.bool()
    keep = present.any(1) & (~present).any(1)
    pairs = present & keep[:, None]
    if not pairs.any():
        return fg_logits.sum() * 0.0
    s = fg_logits.float()
    neg_lse = torch.logsumexp(s.masked_fill(present, float("-inf")), dim=1, keepdim=True)  # log Σ_absent e^S
    neg_lse = torch.where(keep[:, None], neg_lse, torch.zeros_like(neg_lse))  # rows without negatives: unused
    return _pairs_loss(s, neg_lse, pairs)


def bg_negatives_contrastive_loss(fg_logits: torch.Tensor, bg_logits: torch.Tensor, present: torch.Tensor,
                                  bg_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ablation: mean over (image, present class) pairs of −log softmax over {S_p} ∪ {S_j : j a valid bg prompt}.

    fg_logits (B, C), bg_logits (B, N); present (B, C) bool; bg_valid (B, N) bool, all True by default.
    Absent fg classes play no part. Images with no positive or no valid bg prompt are skipped.
    """
    if fg_logits.ndim != 2 or bg_logits.ndim != 2 or fg_logits.shape[0] != bg_logits.shape[0]:
        raise FmalibError(f"contrastive loss: expected fg (B, C) and bg (B, N) logits, got "
                          f"{tuple(fg_logits.shape)} and {tuple(bg_logits.shape)}")
    if present.shape != fg_logits.shape:
        raise FmalibError(f"contrastive loss: present {tuple(present.shape)} must match fg logits "
                          f"{tuple(fg_logits.shape)}")
    present = present.bool()
    bg_valid = torch.ones_like(bg_logits, dtype=torch.bool) if bg_valid is None else bg_valid.bool()
    keep = present.any(1) & bg_valid.any(1)
    pairs = present & keep[:, None]
    if not pairs.any():
        return fg_logits.sum() * 0.0
    neg_lse = torch.logsumexp(bg_logits.float().masked_fill(~bg_valid, float("-inf")), dim=1, keepdim=True)
    neg_lse = torch.where(keep[:, None], neg_lse, torch.zeros_like(neg_lse))
    return _pairs_loss(fg_logits.float(), neg_lse, pairs)


def cam_activation_loss(cams: torch.Tensor, labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """CAM activation loss (docs/method.md §3) for dense CAMs (B, C, h, w) of every class; only present pairs count.

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
