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


def _checkpoint(params, section: str, needs: str) -> Path | None:
    """``params.<section>.checkpoint`` as a path; None = random init, only when asked for (``checkpoint: null``).
    A path that is not a file is an error naming the key, the path and what belongs there (``needs``)."""
    if params[section]["checkpoint"] is None:
        return None
    path = params.resolve_path(f"{section}.checkpoint")
    if not path.is_file():
        raise FmalibError(f"params {section}.checkpoint: {path} does not exist ({needs}; {section}.checkpoint: "
                          f"null asks for random weights)")
    return path


def _fingerprint(params, ckpt: Path | None, ident: dict) -> dict:
    """``ident`` (what names the architecture) + the checkpoint's content, or the seed of a random init."""
    ident = dict(ident)
    if ckpt is None:
        ident["random_init_seed"] = int(params["seed"])
    else:
        ident.update(file_fingerprint(ckpt))
    return ident


def _seed_random_init(params, ckpt: Path | None, section: str, what: str) -> None:
    """A null checkpoint: log it and seed torch so the random weights are the same every run."""
    if ckpt is None:
        log.info("%s.checkpoint is null: a randomly initialised %s (seed %d)", section, what, int(params["seed"]))
        torch.manual_seed(int(params["seed"]))


def clip_checkpoint(params) -> Path | None:
    """The CLIP checkpoint of ``params.clip`` (None: random init, ``checkpoint: null``)."""
    return _checkpoint(params, "clip", f"{params['clip']['model']} needs its weights, an open_clip state dict; "
                                       f"`make foundation` rebuilds the tiny one")


def clip_fingerprint(params) -> dict:
    """What identifies the CLIP of ``params.clip`` in cache keys: model name + file content."""
    return _fingerprint(params, clip_checkpoint(params), {"model": params["clip"]["model"]})


def load_clip_from_params(params, device: str | None = None):
    """The frozen CLIP of ``params.clip`` (randomly initialised, seeded by ``params.seed``, when
    ``clip.checkpoint`` is null)."""
    device = get_device(device or params["device"])
    ckpt = clip_checkpoint(params)
    _seed_random_init(params, ckpt, "clip", params["clip"]["model"])
    return C.load_clip(params["clip"]["model"], ckpt, device)


def sam_checkpoint(params) -> Path | None:
    """The SAM checkpoint of ``params.sam`` (None: random init, ``checkpoint: null``)."""
    return _checkpoint(params, "sam", f"a {params['sam']['model_type']} SAM needs its weights, e.g. "
                                      f"sam_vit_h_4b8939.pth; `make foundation` rebuilds the tiny one")


def sam_fingerprint(params) -> dict:
    """What identifies the SAM of ``params.sam`` in cache keys: model type + file content (or the seed)."""
    return _fingerprint(params, sam_checkpoint(params), {"model_type": params["sam"]["model_type"]})


def load_sam_from_params(params, device: str | None = None):
    """The frozen SAM of ``params.sam`` (randomly initialised, seeded by ``params.seed``, when
    ``sam.checkpoint`` is null)."""
    ckpt = sam_checkpoint(params)
    _seed_random_init(params, ckpt, "sam", params["sam"]["model_type"])
    return load_sam(params["sam"]["model_type"], ckpt, device or params["device"])


def sam2_checkpoint(params) -> Path | None:
    """The SAM 2 checkpoint of ``params.sam2`` (masks.generator sam2; None: random init, ``checkpoint: null``)."""
    return _checkpoint(params, "sam2", f"SAM 2 {params['sam2']['config']} needs Meta's release file, e.g. "
                                       f"sam2.1_hiera_large.pt")


def sam2_fingerprint(params) -> dict:
    """What identifies the SAM 2 of ``params.sam2`` in cache keys: config, input size, file content (or seed)."""
    return _fingerprint(params, sam2_checkpoint(params),
                        {"config": params["sam2"]["config"], "image_size": int(params["sam2"]["image_size"])})


def load_sam2_from_params(params, device: str | None = None):
    """The frozen SAM 2 of ``params.sam2`` through the sam2 package's builder (an FmalibError saying how to
    install it when it is not installed); randomly initialised, seeded by ``params.seed``, when
    ``sam2.checkpoint`` is null."""
    require_sam2()
    ckpt = sam2_checkpoint(params)
    _seed_random_init(params, ckpt, "sam2", f"SAM 2 {params['sam2']['config']}")
    return load_sam2(params["sam2"]["config"], ckpt, int(params["sam2"]["image_size"]), device or params["device"])
