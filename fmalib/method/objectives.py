"""The per-batch objectives of prompt training (docs/method.md §3) on a frozen CLIP: the multi-label contrastive loss
of the cls prompts and the CAM activation loss of the seg prompts, whose (image, class) pairs come from the
cropped seed map."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import FmalibError
from ..models import clip as C
from .cam import gradcam
from .losses import CLS_LOSSES, bg_negatives_contrastive_loss, cam_activation_loss_pairs, multilabel_contrastive_loss
from .prompts import PromptSet


def cls_batch_loss(model, prompts: PromptSet, images: torch.Tensor, present: torch.Tensor,
                   loss: str = "absent_fg") -> torch.Tensor:
    """Multi-label contrastive loss of a batch (image tower without grad: CLIP is frozen).

    ``loss``: ``absent_fg`` — fg logits only, negatives the absent classes (docs/method.md §3, the original's);
    ``bg_negatives`` — the background prompts as negatives (ablation)."""
    if loss not in CLS_LOSSES:
        raise FmalibError(f"cls loss={loss!r}; expected one of {CLS_LOSSES}")
    with torch.no_grad():
        emb = F.normalize(C.encode_image_tokens(model, images).image_embed.float(), dim=-1)
    logits = C.logit_scale(model).float() * emb @ prompts().T
    n = prompts.n_fg
    if loss == "absent_fg":
        return multilabel_contrastive_loss(logits[:, :n], present)
    return bg_negatives_contrastive_loss(logits[:, :n], logits[:, n:], present)


SEG_PAIRS = ("crop", "image")


def seg_pairs(present: torch.Tensor, seeds: torch.Tensor, pairs: str = "crop") -> torch.Tensor:
    """(B, C) bool: the (image, class) pairs of the CAM loss and the classes in its Grad-CAM softmax.

    ``crop``: the classes present in the augmented, cropped seed map (VOC; a class cropped out of view gives
    no pair); ``image``: the image-level labels (the original's COCO setting)."""
    if pairs not in SEG_PAIRS:
        raise FmalibError(f"seg pairs={pairs!r}; expected one of {SEG_PAIRS}")
    if pairs == "image":
        return present.bool()
    ids = torch.arange(1, present.shape[1] + 1, device=seeds.device)
    return (seeds.reshape(len(seeds), -1, 1) == ids).any(dim=1)


def seg_batch_loss(model, prompts: PromptSet, images: torch.Tensor, present: torch.Tensor, seeds: torch.Tensor,
                   target: str = "prob", target_layer: str = "ln1_out", pairs: str = "crop") -> torch.Tensor:
    """CAM activation loss of a batch: raw Grad-CAMs of the pairs' classes, differentiable in the contexts."""
    with torch.no_grad():
        out = C.encode_image_tokens(model, images)
    text = prompts()
    chosen = seg_pairs(present, seeds, pairs)
    b, c = chosen.nonzero(as_tuple=True)
    allowed = torch.cat([chosen, torch.ones(len(chosen), prompts.n_bg, dtype=torch.bool, device=chosen.device)], 1)
    cams = gradcam(model, out.block_input, out.grid, text, b, c, allowed, target, create_graph=True,
                   target_layer=target_layer)
    return cam_activation_loss_pairs(cams, seeds, b, c + 1)
