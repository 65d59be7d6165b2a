"""The one place that turns params into models: which CLIP / SAM / SAM 2 checkpoint, what identifies it in cache
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
from .sam2 import load_sam2, require_sam2

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


def sam2_checkpoint(params) -> Path | None:
    """The SAM 2 checkpoint of ``params.sam2`` (masks.generator sam2); None = random init (``checkpoint: null``)."""
    if params["sam2"]["checkpoint"] is None:
        return None
    path = params.resolve_path("sam2.checkpoint")
    if not path.is_file():
        raise FmalibError(f"params sam2.checkpoint: {path} does not exist (SAM 2 {params['sam2']['config']} "
                          f"needs Meta's release file, e.g. sam2.1_hiera_large.pt; sam2.checkpoint: null asks "
                          f"for random weights)")
    return path


def sam2_fingerprint(params) -> dict:
    """What identifies the SAM 2 of ``params.sam2`` in cache keys: config, input size, file content (or seed)."""
    ckpt = sam2_checkpoint(params)
    ident = {"config": params["sam2"]["config"], "image_size": int(params["sam2"]["image_size"])}
    if ckpt is None:
        ident["random_init_seed"] = int(params["seed"])
    else:
        ident.update(file_fingerprint(ckpt))
    return ident


def load_sam2_from_params(params, device: str | None = None):
    """The frozen SAM 2 of ``params.sam2`` through the sam2 package's builder (an FmalibError saying how to
    install it when it is not installed); randomly initialised, seeded by ``params.seed``, when
    ``sam2.checkpoint`` is null."""
    require_sam2()
    ckpt = sam2_checkpoint(params)
    if ckpt is None:
        log.info("sam2.checkpoint is null: a randomly initialised SAM 2 %s (seed %d)", params["sam2"]["config"],
                 int(params["seed"]))
        torch.manual_seed(int(params["seed"]))
    return load_sam2(params["sam2"]["config"], ckpt, int(params["sam2"]["image_size"]), device or params["device"])
