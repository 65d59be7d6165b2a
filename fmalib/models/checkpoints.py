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

def clip_checkpoint(params) -> Path | None:
    """The CLIP checkpoint of ``params.clip``; None = random init, only when asked for (``checkpoint: null``)."""
    if params["clip"]["checkpoint"] is None:
        return None
    path = params.resolve_path("clip.checkpoint")
    if not path.is_file():
        raise FmalibError(f"params clip.checkpoint: {path} does not exist ({params['clip']['model']} needs its "
                          f"weights, an open_clip state dict; `make foundation` rebuilds the tiny one; "
                          f"clip.checkpoint: null asks for random weights)")
    return path


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
    """The frozen CLIP of ``params.clip`` (randomly initialised, seeded by ``params.seed``, when
    ``clip.checkpoint`` is null)."""
    device = get_device(device or params["device"])
    ckpt = clip_checkpoint(params)
    if ckpt is None:
        log.info("clip.checkpoint is null: a randomly initialised %s (seed %d)", params["clip"]["model"],
                 int(params["seed"]))
        torch.manual_seed(int(params["seed"]))
    return C.load_clip(params["clip"]["model"], ckpt, device)


def sam_checkpoint(params) -> Path | None:
    """The SAM checkpoint of ``params.sam``; None = random init, only when asked for (``checkpoint: null``)."""
    if params["sam"]["checkpoint"] is None:
        return None
    path = params.resolve_path("sam.checkpoint")
    if not path.is_file():
        raise FmalibError(f"params sam.checkpoint: {path} does not exist (a {params['sam']['model_type']} SAM "
                          f"needs its weights, e.g. sam_vit_h_4b8939.pth; `make foundation` rebuilds the tiny one; "
                          f"sam.checkpoint: null asks for random weights)")
    return path


def sam_fingerprint(params) -> dict:
    """What identifies the SAM of ``params.sam`` in cache keys: model type + file content (or the seed)."""
    ckpt = sam_checkpoint(params)
    ident = {"model_type": params["sam"]["model_type"]}
    if ckpt is None:
        ident["random_init_seed"] = int(params["seed"])
    else:
        ident.update(file_fingerprint(ckpt))
    return ident


def load_sam_from_params(params, device: str | None = None):
    """The frozen SAM of ``params.sam`` (randomly initialised, seeded by ``params.seed``, when
    ``sam.checkpoint`` is null)."""
    ckpt = sam_checkpoint(params)
    if ckpt is None:
        log.info("sam.checkpoint is null: a randomly initialised %s (seed %d)", params["sam"]["model_type"],
                 int(params["seed"]))
        torch.manual_seed(int(params["seed"]))
    return load_sam(params["sam"]["model_type"], ckpt, device or params["device"])
