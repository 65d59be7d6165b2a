"""Grad-CAM on a frozen CLIP (docs/method.md §4, CLIP-ES).

- ``gradcam``: the target activation is the output of the last vision block's ``ln_1`` (``cam.target_layer:
  ln1_out``, the original's) or the tokens entering that block (``block_input``). Only that block and the
  head (ln_post, proj, patch mean) are replayed, once per (image, class) pair in one batch, so one backward
  gives every pair's gradients; channel weights = gradients averaged over the patch tokens. Raw (no ReLU):
  the seg-prompt loss needs the sign; inference applies ReLU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core.errors import FmalibError
from ..models import clip as C


def gradcam(model, block_input: torch.Tensor, grid: tuple[int, int], text: torch.Tensor, pair_image: torch.Tensor,
            pair_class: torch.Tensor, allowed: torch.Tensor | None = None, target: str = "prob",
            create_graph: bool = False, target_layer: str = "ln1_out") -> torch.Tensor:
    """Raw Grad-CAMs (P, h, w), one per (image, class) pair.

    block_input (B, 1+h*w, W) tokens entering the last block (its graph, if any, is cut: CLIP is frozen);
    text (K, D) L2-normalised prompt features; pair_class indexes rows of ``text``; allowed (B, K) bool: the
    prompts in image b's softmax (present fg classes + bg prompts; all when None). target "prob" backprops
    the softmax probability, "score" the scaled cosine. ``target_layer`` is the activation A whose gradients
    weight its channels: ``ln1_out`` — the output of the last block's ``ln_1`` (the original's, as CLIP-ES) —
    or ``block_input``, the residual tokens entering that block. CAM = Σ_ch mean_tokens(∂y/∂A) · A over the
    patch tokens. A is detached, so with ``create_graph`` (seg-prompt training) the CAMs are differentiable
    w.r.t. ``text`` through the Grad-CAM weights only (double backward).
    """
    if target not in ("prob", "score"):
        raise FmalibError(f"gradcam: target={target!r}; expected 'prob' or 'score'")
    if target_layer not in C.GRADCAM_TARGETS:
        raise FmalibError(f"gradcam: target_layer={target_layer!r}; expected one of {C.GRADCAM_TARGETS}")
    pair_image, pair_class = pair_image.long(), pair_class.long()
    h, w = grid
    # double backward (create_graph) needs the composite attention: fused SDPA kernels have no 2nd derivative
    attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), attention:
        x = block_input.detach()[pair_image]
        if target_layer == "ln1_out":
            act = model.visual.transformer.resblocks[-1].ln_1(x).detach().requires_grad_(True)
            emb = C.last_block_embed(model, x, ln1_out=act)
        else:
            act = x.requires_grad_(True)
            emb = C.last_block_embed(model, act)
        emb = F.normalize(emb.float(), dim=-1)
        logits = C.logit_scale(model).float() * emb @ text.float().T
        if target == "prob":
            logits = masked_softmax(logits, None if allowed is None else allowed.bool()[pair_image])
        score = logits.gather(1, pair_class[:, None]).sum()  # pairs are independent rows: one backward
        (grad,) = torch.autograd.grad(score, act, create_graph=create_graph)
    weights = grad[:, 1:].float().mean(dim=1)  # (P, W)
    cam = torch.einsum("pnc,pc->pn", act.detach()[:, 1:].float(), weights)
    return cam.reshape(-1, h, w)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """The original's softmax over the allowed entries (AlchemyCat ``MaskedSoftmax``): e^(x − max over **all**
    entries) · mask / (Σ + eps); a plain softmax without a mask. Unlike a −inf fill it shifts by the largest
    logit, allowed or not: a far larger excluded logit drives every allowed probability towards 0."""
    if mask is None:
        return logits.softmax(dim=-1)
    e = torch.exp(logits - logits.max(dim=-1, keepdim=True)[0]) * mask
    return e / (e.sum(dim=-1, keepdim=True) + eps)
