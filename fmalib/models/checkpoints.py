"""The one place that turns params into models: which CLIP / SAM checkpoint, what identifies it in cache
keys, and the loaded, frozen model. Everything downstream receives a model or a fingerprint, never a path.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..core.cache import file_fingerprint
from ..core.device import get_device
from ..core.errors import FmalibError
from . import clip as C
from .sam import load_sam

log = logging.getLogger(__name__)

TINY_SAM = "fmalib_tiny"


def clip_checkpoint(params) -> Path | None:
    """The CLIP checkpoint of ``params.clip``; None = random init (allowed for the tiny CLIP only)."""
    if not params["clip"]["checkpoint"]:
        return None
    path = params.resolve_path("clip.checkpoint")
    if path.is_file():
        return path
    if params["clip"]["model"] == C.TINY_CLIP:
        return None
    raise FmalibError(f"params clip.checkpoint: {path} does not exist ({params['clip']['model']} needs its "
                      f"weights, an open_clip state dict)")


def clip_fingerprint(params) -> dict:
    """What identifies the CLIP of ``params.clip`` in cache keys: model name + file content."""
    ckpt = clip_checkpoint(params)
    ident = {"model": params["clip"]["model"]}
    if ckpt is None:
        ident["random_init_seed"] = int(params["seed"])
    else:
        ident.update(file_fingerprint(ckpt))
    return ident


def load_clip_from_params(params, device: str | None = None):
    """The frozen CLIP of ``params.clip`` (the tiny one randomly initialised, with a warning, while its
    checkpoint is not there)."""
    device = get_device(device or params["device"])
    ckpt = clip_checkpoint(params)
    if ckpt is None:
        log.warning("CLIP checkpoint %s not found: using a randomly initialised %s (seed %d)",
                    params["clip"]["checkpoint"], params["clip"]["model"], int(params["seed"]))
        torch.manual_seed(int(params["seed"]))
    return C.load_clip(params["clip"]["model"], ckpt, device)


def sam_fingerprint(params) -> dict:
    """What identifies the SAM of ``params.sam`` in cache keys; a missing tiny checkpoint means random init."""
    sam = params["sam"]
    ident = {"model_type": sam["model_type"]}
    ckpt = params.resolve_path("sam.checkpoint") if sam["checkpoint"] else None
    if ckpt is not None and ckpt.is_file():
        ident.update(file_fingerprint(ckpt))
    elif sam["model_type"] == TINY_SAM:
        ident["random_init_seed"] = int(params["seed"])
    else:
        raise FmalibError(f"params sam.checkpoint: {ckpt} does not exist (a {sam['model_type']} SAM needs its "
                          f"weights, e.g. sam_vit_h_4b8939.pth)")
    return ident


def load_sam_from_params(params, device: str | None = None):
    """The SAM of ``params.sam`` (random init, with a warning, while the tiny checkpoint is not there)."""
    ident = sam_fingerprint(params)
    device = device or params["device"]
    if "random_init_seed" in ident:
        log.warning("SAM checkpoint %s not found: using a randomly initialised %s (seed %d)",
                    params["sam"]["checkpoint"], params["sam"]["model_type"], ident["random_init_seed"])
        torch.manual_seed(ident["random_init_seed"])
        return load_sam(params["sam"]["model_type"], None, device)
    return load_sam(params["sam"]["model_type"], params.resolve_path("sam.checkpoint"), device)
