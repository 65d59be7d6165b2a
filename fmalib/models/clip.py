"""Load an open_clip CLIP — the real ViT-B-16 or fmalib's tiny self-pretrained one — and expose what the
method needs: patch tokens after ln_post + projection at any input size, the tokens entering the last
block (Grad-CAM target), per-block attention maps, and the text tower run on prompt *embeddings*.

Every model is built by open_clip's own factory; fmalib registers its packaged JSON configs
(``fmalib/models/configs``, e.g. ``fmalib-tiny-clip``) with ``open_clip.add_model_config`` on import, so
``open_clip.create_model_and_transforms("fmalib-tiny-clip", pretrained="assets/tiny_clip.pt")`` loads the
shipped weights exactly as it loads a ViT-B/16 state dict. Checkpoints are read in every form users have
(OpenAI's TorchScript archive, open_clip state dicts, safetensors), checked key by key, so a wrong or truncated
file fails with one message naming the first bad key or shape, and checked for the MLP activation (OpenAI's
weights are QuickGELU: ``ViT-B-16-quickgelu``).
"""
from __future__ import annotations

import contextlib
import math
import hashlib
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import pretrained as P
from open_clip.factory import convert_state_dict
from open_clip.factory import load_state_dict as _oc_load_state_dict
from open_clip.model import resize_pos_embed as oc_resize_pos_embed
from open_clip.model import resize_text_pos_embed
from open_clip.transformer import ResidualAttentionBlock
from PIL import Image

from ..core.errors import FmalibError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_CLIP = "fmalib-tiny-clip"

open_clip.add_model_config(CONFIG_DIR)


def packaged_configs() -> list[str]:
    """Names of the model configs fmalib ships (its tiny CLIPs), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


@dataclass
class VisualOut:
    """What ``encode_image_tokens`` returns (shapes for a batch of B images on an h×w patch grid)."""

    block_input: torch.Tensor  # (B, 1+h*w, W) tokens entering the last block; requires grad when grad is on
    patch_embed: torch.Tensor  # (B, h, w, D) patch tokens after ln_post + proj
    image_embed: torch.Tensor  # (B, D) mean of patch_embed (docs/method.md §1), not normalised
    class_embed: torch.Tensor  # (B, D) the class token after ln_post + proj (what CLS-pooled CLIPs train on)
    attn: list  # last k blocks' attention (B, 1+h*w, 1+h*w), head-averaged, oldest first
    grid: tuple  # (h, w)


# ------------------------------------------------------------------------------------------------ loading

OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI's archives carry these
ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}


class CLIPActivationWarning(UserWarning):
    """The checkpoint does not say its MLP activation, and open_clip knows weights of this architecture
    trained with the other one (e.g. OpenAI's QuickGELU ViT-B/16 beside LAION's GELU ViT-B/16)."""


@dataclass
class ClipCheckpoint:
    """What ``read_clip_checkpoint`` found in a file."""

    path: Path
    state: dict  # key -> tensor, open_clip naming
    format: str  # "torchscript" (OpenAI's archive) | "state_dict" | "safetensors"
    activation: str | None  # "quick_gelu" | "gelu" | None: the file does not say
    activation_source: str  # how ``activation`` was found, for messages


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips hold serialized code (``<name>/code/...``, ``constants.pkl``); torch.save zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _archive_activation(module: torch.nn.Module) -> str | None:
    """The MLP activation of a TorchScript module, from the class names its submodules were traced from."""
    found = {ACTIVATIONS[n] for _, m in module.named_modules() if (n := getattr(m, "original_name", None)) in ACTIVATIONS}
    return found.pop() if len(found) == 1 else None


def read_clip_checkpoint(path: str | os.PathLike) -> ClipCheckpoint:
    """A CLIP checkpoint in any of the forms users have, as an open_clip state dict:

    - OpenAI's TorchScript archive (``ViT-B-16.pt`` as OpenAI ships it): read as open_clip's
      ``load_openai_model`` does (``torch.jit.load``, its ``state_dict()`` minus OpenAI's metadata entries);
      its activation is read from the archive's module classes (OpenAI's: ``QuickGELU``).
    - an open_clip / torch state dict (plain, ``{"state_dict": ...}``- or ``module.``-wrapped, any dtype) or
      ``.safetensors`` file, through open_clip's own reader. These do not record an activation, except a state
      dict taken from an OpenAI archive, which keeps OpenAI's ``input_resolution`` / ``context_length`` /
      ``vocab_size`` entries (QuickGELU).
    An unreadable file is one FmalibError naming the path and every reader tried.
    """
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"CLIP checkpoint {path} does not exist (expected OpenAI's TorchScript archive, e.g. "
                          f"ViT-B-16.pt, an open_clip state dict such as assets/tiny_clip.pt, or .safetensors)")
    tried = []

    def fail() -> FmalibError:
        return FmalibError(f"CLIP checkpoint {path} ({path.stat().st_size} bytes) cannot be read — truncated, "
                           f"corrupt or not a CLIP checkpoint; tried: {'; '.join(tried)}")

    def first_line(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    fmt, activation, source = "state_dict", None, "not recorded in a state dict"
    if _is_torchscript_archive(path):
        fmt = "torchscript"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, not the user's
                archive = torch.jit.load(str(path), map_location="cpu")
            state = dict(archive.state_dict())
        except Exception as exc:  # any failure of the TorchScript reader: one error naming the file
            tried.append(f"torch.jit.load as a TorchScript archive ({first_line(exc)})")
            raise fail() from exc
        activation = _archive_activation(archive)
        source = f"the archive's {'QuickGELU' if activation == 'quick_gelu' else 'GELU'} modules" if activation \
            else "the archive names no single activation module"
        del archive
    else:
        if path.suffix == ".safetensors":
            fmt, reader = "safetensors", "safetensors.torch.load_file"
        else:
            reader = "torch.load(weights_only=True) as a state dict"
        try:
            state = _oc_load_state_dict(str(path), device="cpu", weights_only=True)
        except Exception as exc:  # unpickling / zip / safetensors errors of any kind: still one clear error
            tried.append(f"{reader} ({first_line(exc)})")
            if fmt == "state_dict":
                tried.append("TorchScript archive (not one: no serialized code inside)")
            raise fail() from exc
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            tried.append(f"{reader} (got {type(state).__name__}, not a mapping of tensors)")
            raise fail()
        state = dict(state)
    if any(k in state for k in OPENAI_META_KEYS):
        if activation is None:
            activation, source = "quick_gelu", "OpenAI's metadata entries (a state dict of OpenAI's archive)"
        for k in OPENAI_META_KEYS:
            state.pop(k, None)
    return ClipCheckpoint(path, state, fmt, activation, source)


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


def model_activation(model: torch.nn.Module) -> str | None:
    """"quick_gelu" or "gelu": the MLP activation the built model uses (None if neither or both)."""
    found = {ACTIVATIONS[type(m).__name__] for m in model.modules() if type(m).__name__ in ACTIVATIONS}
    return found.pop() if len(found) == 1 else None


def _twin(name: str, activation: str) -> str | None:
    """open_clip's name of the same architecture with ``activation`` (ViT-B-16 <-> ViT-B-16-quickgelu)."""
    base = name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name
    twin = f"{base}-quickgelu" if activation == "quick_gelu" else base
    return twin if twin in open_clip.list_models() else None


def check_activation(model: torch.nn.Module, name: str, ckpt: ClipCheckpoint) -> None:
    """The model's activation must be the checkpoint's: an error where the file says which it is, a
    CLIPActivationWarning where it does not and open_clip lists weights of this architecture with the other."""
    built = model_activation(model)
    if ckpt.activation is not None and built is not None and ckpt.activation != built:
        twin = _twin(name, ckpt.activation)
        fix = f"set clip.model: {twin}" if twin else f"use a model config with {ckpt.activation}"
        raise FmalibError(f"CLIP checkpoint {ckpt.path} was trained with {ckpt.activation} (found from "
                          f"{ckpt.activation_source}), but clip.model {name!r} builds {built}: {fix}")
    if ckpt.activation is None and built is not None:
        other = [t for t in open_clip.list_pretrained_tags_by_model(name)
                 if bool(open_clip.get_pretrained_cfg(name, t).get("quick_gelu", False)) != (built == "quick_gelu")]
        if other:
            twin = _twin(name, "gelu" if built == "quick_gelu" else "quick_gelu")
            warnings.warn(f"CLIP checkpoint {ckpt.path} ({ckpt.format}) does not record its activation and "
                          f"{name!r} builds {built}, but open_clip lists {name} weights trained with the other "
                          f"activation ({', '.join(other)}). If the file holds those, set clip.model: {twin}",
                          CLIPActivationWarning, stacklevel=3)


class _QuietFactory(logging.Filter):
    """open_clip's factory logs its steps on the root logger, and "Model initialized randomly" for every
    model built with pretrained=None — which is every fmalib load (weights are loaded afterwards)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_factory = record.pathname.endswith(os.path.join("open_clip", "factory.py"))
        return not (from_factory and (record.levelno < logging.WARNING or "initialized randomly" in record.getMessage()))


@contextlib.contextmanager
def _quiet_open_clip():
    root, quiet = logging.getLogger(), _QuietFactory()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def build_clip(name: str) -> torch.nn.Module:
    """The architecture ``name`` at random initialisation, by open_clip's factory, without its log lines."""
    if name not in open_clip.list_models():
        raise FmalibError(f"CLIP model {name!r} is not an open_clip model name (e.g. {TINY_CLIP}, "
                          f"ViT-B-16-quickgelu for OpenAI's ViT-B/16)")
    with _quiet_open_clip():
        return open_clip.create_model(name, pretrained=None, device="cpu")


def load_clip_state_dict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Check key by key, then load as open_clip's ``load_checkpoint`` does (same adaptations, strict)."""
    state = convert_state_dict(model, state)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    check_clip_state_dict(model, state, source)
    oc_resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def load_clip(name: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """A frozen open_clip CLIP in eval mode; ``checkpoint=None`` gives a randomly initialised model.

    ``model.checkpoint_info`` says what was loaded (path, format, activation and how it was found).
    """
    model = build_clip(name)
    model.checkpoint_info = {"path": None, "format": "random init", "activation": model_activation(model),
                             "activation_source": "the model config"}
    if checkpoint is not None:
        ckpt = read_clip_checkpoint(checkpoint)
        load_clip_state_dict(model, ckpt.state, str(checkpoint))
        check_activation(model, name, ckpt)
        model.checkpoint_info = {"path": str(ckpt.path), "format": ckpt.format,
                                 "activation": ckpt.activation or model_activation(model),
                                 "activation_source": ckpt.activation_source if ckpt.activation
                                 else "the model config (the file does not record it)"}
        log.info("loaded CLIP %s from %s (%s)", name, checkpoint, ckpt.format)
    model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def clip_identity(model, name: str) -> dict:
    """What a user checks first about a loaded CLIP (notebook 01): architecture, size, file and activation.

    A file's SHA-256 is compared with the ones in open_clip's download table (OpenAI's URLs carry it), so
    OpenAI's ViT-B/16 as shipped is named as such.
    """
    info = dict(getattr(model, "checkpoint_info", {}) or {})
    v = model.visual
    ident = {"model": name, "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
             "image size": tuple(v.image_size) if isinstance(v.image_size, (tuple, list)) else v.image_size,
             "patch size": patch_size(model), "vision width": int(v.conv1.weight.shape[0]),
             "vision layers": len(v.transformer.resblocks), "embed dim": int(model.text_projection.shape[-1]),
             "activation": info.get("activation"), "activation from": info.get("activation_source"),
             "checkpoint": info.get("path"), "format": info.get("format")}
    if info.get("path"):
        p = Path(info["path"])
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        ident["file MB"] = round(p.stat().st_size / 2**20, 1)
        ident["sha256"] = h.hexdigest()
        ident["known as"] = _known_pretrained(h.hexdigest())
    return ident


def _known_pretrained(sha256: str) -> str | None:
    """"<model> / <tag>" of open_clip's table whose download URL carries this SHA-256 (OpenAI's do)."""
    for model in open_clip.list_models():
        for tag in P.list_pretrained_tags_by_model(model):
            if sha256 in P.get_pretrained_cfg(model, tag).get("url", ""):
                return f"{model} / {tag}"
    return None


def get_tokenizer(name: str):
    """open_clip's tokenizer for ``name`` (the standard BPE tokenizer; context length from the config)."""
    with _quiet_open_clip():
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

def input_size(model, height: int, width: int, max_side: int | None = None) -> tuple[int, int]:
    """(H', W') of ``to_input``: each side rounded **up** to a multiple of the patch size, as the original
    (AlchemyCat ``divisible_by_n(direction='larger')`` in FMA-WSSS ``configs/infer_voc/base.py``: a 500×375
    image → 512×384 at patch 16); with ``max_side``, an image whose long side exceeds it is first scaled down
    (aspect kept), and no side exceeds ``max_side`` rounded down to the patch (at least one patch)."""
    p = patch_size(model)
    h, w = float(height), float(width)
    n_max = None
    if max_side is not None:
        n_max = max(1, int(max_side) // p)
        if max(h, w) > max_side:
            s = max_side / max(h, w)
            h, w = h * s, w * s
    hh, ww = (max(1, math.ceil(round(v, 6) / p)) for v in (h, w))
    if n_max is not None:
        hh, ww = min(hh, n_max), min(ww, n_max)
    return hh * p, ww * p


def to_input(model, image: np.ndarray, max_side: int | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised (1, 3, H', W'), resized to ``input_size`` with PIL's bicubic filter on the
    uint8 image, as the original (AlchemyCat ``scale_img_label`` with ``PIL_mode`` bicubic; PIL widens the
    filter when it shrinks, so a capped large photo is antialiased).

    ``max_side``: cap on the long side (``input_size``; params ``cam.max_side``) — attention memory grows with
    the fourth power of the side; None = no cap."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FmalibError(f"expected a uint8 (H, W, 3) image; got {image.dtype} {image.shape}")
    mean, std = image_normalization(model)
    h, w = image.shape[:2]
    hh, ww = input_size(model, h, w, max_side)
    if (hh, ww) != (h, w):
        image = np.array(Image.fromarray(image).resize((ww, hh), Image.Resampling.BICUBIC))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x.to(next(model.parameters()).device)


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

    Positional embeddings are resized to the input's grid (docs/method.md §1). When grad is enabled and the
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

    tokens = v.ln_post(x)
    if v.proj is not None:
        tokens = tokens @ v.proj
    patch_embed = tokens[:, 1:].reshape(B, h, w, -1)
    return VisualOut(block_input=block_input, patch_embed=patch_embed, image_embed=tokens[:, 1:].mean(dim=1),
                     class_embed=tokens[:, 0], attn=attn, grid=(h, w))


GRADCAM_TARGETS = ("ln1_out", "block_input")


def last_block_embed(model, block_input: torch.Tensor, ln1_out: torch.Tensor | None = None) -> torch.Tensor:
    """(P, 1+h*w, W) tokens entering the last vision block -> (P, D) image embeddings (docs/method.md §1: patch mean).

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


def last_block_value_tokens(model, block_input: torch.Tensor) -> torch.Tensor:
    """(B, h*w, D) each patch's value path through the last block: ``ln_1``, the attention's value and output
    projections, ``ln_post``, ``proj`` (no query-key mixing, no MLP; MaskCLIP's dense readout). This is what a
    Grad-CAM at the last block's ``ln_1`` output weighs patch by patch: its gradient reaches a patch only through
    these projections."""
    v = model.visual
    blk = v.transformer.resblocks[-1]
    attn = blk.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise FmalibError("last_block_value_tokens needs an open_clip block with a packed nn.MultiheadAttention")
    width = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width:]
    values = F.linear(blk.ln_1(block_input[:, 1:]), attn.in_proj_weight[2 * width:], bias)
    tokens = v.ln_post(blk.ls_1(attn.out_proj(values)))
    return tokens @ v.proj if v.proj is not None else tokens


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
