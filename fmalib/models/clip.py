"""Load an open_clip CLIP — the real ViT-B-16 or fmalib's tiny self-pretrained one — and expose what the
method needs: patch tokens after ln_post + projection at any input size, the tokens entering the last
block (Grad-CAM target), per-block attention maps, and the text tower run on prompt *embeddings*.

Every model is built by open_clip's own factory; fmalib registers its packaged JSON configs
(``fmalib/models/configs``, e.g. ``fmalib-tiny-clip``) with ``open_clip.add_model_config`` on import, so
``open_clip.create_model_and_transforms("fmalib-tiny-clip", pretrained="assets/tiny_clip.pt")`` loads the
shipped weights exactly as it loads a ViT-B/16 state dict. A checkpoint is checked key by key first, so a
wrong or truncated file fails with one message naming the first bad key or shape.
"""
from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as _oc_load_state_dict
from open_clip.transformer import ResidualAttentionBlock

from ..errors import FmalibError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_CLIP = "fmalib-tiny-clip"

open_clip.add_model_config(CONFIG_DIR)


@dataclass
class VisualOut:
    """What ``encode_image_tokens`` returns (shapes for a batch of B images on an h×w patch grid)."""

    block_input: torch.Tensor  # (B, 1+h*w, W) tokens entering the last block; requires grad when grad is on
    patch_embed: torch.Tensor  # (B, h, w, D) patch tokens after ln_post + proj
    image_embed: torch.Tensor  # (B, D) mean of patch_embed (METHOD §1), not normalised
    attn: list  # last k blocks' attention (B, 1+h*w, 1+h*w), head-averaged, oldest first
    grid: tuple  # (h, w)


# ------------------------------------------------------------------------------------------------ loading

def read_clip_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from disk through open_clip's reader (unwraps ``state_dict`` / ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"CLIP checkpoint {path} does not exist (expected an open_clip state dict, e.g. "
                          f"assets/tiny_clip.pt or a ViT-B/16 .pt)")
    try:
        state = _oc_load_state_dict(str(path), device="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise FmalibError(f"CLIP checkpoint {path} ({path.stat().st_size} bytes) cannot be read as a torch "
                          f"state dict — truncated or corrupt? ({type(exc).__name__}: {msg})") from exc
    except Exception as exc:  # unpickling errors of other kinds: still one clear error naming the file
        raise FmalibError(f"CLIP checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FmalibError(f"CLIP checkpoint {path} is not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def check_clip_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """One FmalibError naming the first missing / unexpected key or mismatched shape.

    The vision positional embedding may differ in length (open_clip's loader resizes it to the model's grid).
    """
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise FmalibError(f"CLIP checkpoint {source} lacks key {key!r} (shape {tuple(ref.shape)}): a "
                              f"checkpoint of another model or a truncated one ({len(state)} of "
                              f"{len(expected)} keys present)")
        got = tuple(state[key].shape)
        if got != tuple(ref.shape) and not (key == "visual.positional_embedding" and got[1:] == ref.shape[1:]):
            raise FmalibError(f"CLIP checkpoint {source}: key {key!r} has shape {got}, the model expects "
                              f"{tuple(ref.shape)} — a checkpoint of a different model")
    for key in state:
        if key not in expected:
            raise FmalibError(f"CLIP checkpoint {source} has unexpected key {key!r}: a checkpoint of a "
                              f"different model")


def load_clip(name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """A frozen open_clip CLIP in eval mode; ``checkpoint=None`` gives a randomly initialised model."""
    if name not in open_clip.list_models():
        raise FmalibError(f"CLIP model {name!r} is not an open_clip model name (e.g. {TINY_CLIP}, ViT-B-16)")
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
    if checkpoint is not None:
        # check first (open_clip's strict load fails with a long multi-key message), then load through
        # open_clip.load_checkpoint — what create_model_and_transforms(name, pretrained=path) calls
        check_clip_state_dict(model, read_clip_checkpoint(checkpoint), str(checkpoint))
        open_clip.load_checkpoint(model, str(checkpoint))
        log.info("loaded CLIP %s from %s", name, checkpoint)
    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name`` (the standard BPE tokenizer; context length from the config)."""
    return open_clip.get_tokenizer(name)


def image_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's preprocessing, for images scaled to [0, 1]."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN
    std = cfg.get("std") or open_clip.OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def patch_size(model) -> int:
    p = model.visual.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def logit_scale(model) -> torch.Tensor:
    """The temperature multiplier exp(logit_scale) (a 0-d tensor)."""
    return model.logit_scale.exp()


def token_embedding(model, tokens: torch.Tensor) -> torch.Tensor:
    """(K, L) token ids -> (K, L, W) embeddings, the input ``encode_text_embeddings`` expects."""
    return model.token_embedding(tokens)


# ------------------------------------------------------------------------------------------------ towers

def resize_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int], src_grid: tuple[int, int] | None = None):
    """(1+N, W) class + patch positional embedding -> (1+h*w, W), patch part resized bilinearly.

    The source grid is square (sqrt N) unless given.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = pos_embed.shape[0] - 1
    if src_grid is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise FmalibError(f"positional embedding has {n} patch positions, not a square grid; pass src_grid")
        src_grid = (side, side)
    sh, sw = int(src_grid[0]), int(src_grid[1])
    if sh * sw != n:
        raise FmalibError(f"positional embedding has {n} patch positions, not a {sh}x{sw} grid")
    if (sh, sw) == (h, w):
        return pos_embed
    patch = pos_embed[1:].reshape(1, sh, sw, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=(h, w), mode="bilinear", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:1], patch], dim=0)


def _block_with_attn(blk: ResidualAttentionBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ResidualAttentionBlock.forward that also returns its head-averaged attention map."""
    y = blk.ln_1(x)
    a, weights = blk.attn(y, y, y, need_weights=True, average_attn_weights=True)
    x = x + blk.ls_1(a)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, weights


def encode_image_tokens(model, images: torch.Tensor, attn_last_k: int = 0) -> VisualOut:
    """Run the vision tower on normalised images (B, 3, H, W), H and W multiples of the patch size.

    Positional embeddings are resized to the input's grid (METHOD §1). When grad is enabled and the
    input does not require grad (frozen CLIP), ``block_input`` is made a leaf that requires grad, so
    ``torch.autograd.grad(score, out.block_input)`` gives Grad-CAM's gradients.
    """
    v = model.visual
    if getattr(v, "attn_pool", None) is not None or getattr(v, "final_ln_after_pool", False):
        raise FmalibError("encode_image_tokens supports ViTs without attentional pooling / final_ln_after_pool")
    if images.ndim != 4 or images.shape[1] != 3:
        raise FmalibError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
    p = patch_size(model)
    B, _, H, W = images.shape
    if H % p or W % p:
        raise FmalibError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    h, w = H // p, W // p
    blocks = v.transformer.resblocks
    k = int(attn_last_k)
    if not 0 <= k <= len(blocks):
        raise FmalibError(f"attn_last_k={k}; the vision tower has {len(blocks)} blocks")
    if k and not all(isinstance(b, ResidualAttentionBlock) for b in blocks[-k:]):
        raise FmalibError("attention maps need open_clip ResidualAttentionBlock vision blocks")

    dtype = v.conv1.weight.dtype
    x = v.conv1(images.to(dtype)).flatten(2).transpose(1, 2)  # (B, h*w, W)
    cls = v.class_embedding.to(x.dtype).expand(B, 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + resize_pos_embed(v.positional_embedding, (h, w), v.grid_size).to(x.dtype)
    x = v.ln_pre(x)  # patch dropout is skipped: identity in eval, and tokens must keep the grid
    if not v.transformer.batch_first:  # pragma: no cover - open_clip ViTs are batch-first
        raise FmalibError("encode_image_tokens expects a batch-first open_clip transformer")

    attn: list[torch.Tensor] = []
    n = len(blocks)
    for i, blk in enumerate(blocks):
        if i == n - 1:
            if torch.is_grad_enabled() and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            block_input = x
        if i >= n - k:
            x, a = _block_with_attn(blk, x)
            attn.append(a)
        else:
            x = blk(x)

    tokens = v.ln_post(x[:, 1:])
    if v.proj is not None:
        tokens = tokens @ v.proj
    patch_embed = tokens.reshape(B, h, w, -1)
    return VisualOut(block_input=block_input, patch_embed=patch_embed, image_embed=tokens.mean(dim=1),
                     attn=attn, grid=(h, w))


GRADCAM_TARGETS = ("ln1_out", "block_input")


def last_block_embed(model, block_input: torch.Tensor, ln1_out: torch.Tensor | None = None) -> torch.Tensor:
    """(P, 1+h*w, W) tokens entering the last vision block -> (P, D) image embeddings (METHOD §1: patch mean).

    With ``ln1_out`` given, it replaces the block's ``ln_1(block_input)`` — the normalised tokens its attention
    reads — while the residual stream still carries ``block_input``: a gradient w.r.t. ``ln1_out`` then flows
    through the attention only, exactly as a hook on ``resblocks[-1].ln_1`` sees it in the full forward.
    """
    v = model.visual
    blk = v.transformer.resblocks[-1]
    a = blk.ln_1(block_input) if ln1_out is None else ln1_out
    x = block_input + blk.ls_1(blk.attention(q_x=a))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    tokens = v.ln_post(x[:, 1:])
    if v.proj is not None:
        tokens = tokens @ v.proj
    return tokens.mean(dim=1)


def encode_text_embeddings(model, token_embeds: torch.Tensor, eot_idx: torch.Tensor) -> torch.Tensor:
    """Text tower from (K, L, W) token embeddings: + positional, transformer, ln_final, EOT token, projection.

    Equals ``model.encode_text(tokens)`` when ``token_embeds = token_embedding(model, tokens)`` and
    ``eot_idx = tokens.argmax(-1)``; L may be shorter than the context length.
    """
    K, L, _ = token_embeds.shape
    if L > model.positional_embedding.shape[0]:
        raise FmalibError(f"prompt length {L} exceeds the text context length {model.positional_embedding.shape[0]}")
    cast = model.transformer.get_cast_dtype()
    x = token_embeds.to(cast) + model.positional_embedding[:L].to(cast)
    mask = model.attn_mask[:L, :L] if model.attn_mask is not None else None
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(K, device=x.device), eot_idx.to(x.device).long()]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
