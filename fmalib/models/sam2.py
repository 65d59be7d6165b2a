"""Load a SAM 2 through the optional ``sam2`` package's own builder (``sam2.build_sam.build_sam2``).

``sam2`` is optional (``pip install -e ".[sam2]"``, or ``pip install sam2``): everything else in fmalib works
without it, and it is imported inside the functions that need it, so only ``masks.generator: sam2`` asks for it
(``require_sam2`` says how to install it). A model is named by one of the package's configs
(``SAM2_CONFIGS``: SAM 2.1 / SAM 2, Hiera tiny / small / base+ / large); its checkpoint is Meta's release file
(``sam2.1_hiera_large.pt``: ``{"model": state dict}``; a plain state dict is accepted too), checked key by key
before loading. ``image_size`` overrides the config's 1024 px input (the Hiera position embeddings are
interpolated, so any multiple of 32 builds; the tests and the toy bench use 64-128 px at random init).
"""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from ..core.errors import FmalibError
from .sam import check_sam_state_dict

log = logging.getLogger(__name__)

SAM2_CONFIGS = tuple(f"{v}_hiera_{s}" for v in ("sam2.1", "sam2") for s in ("t", "s", "b+", "l"))
SAM2_INSTALL = ('install the optional SAM 2 package: pip install -e ".[sam2]" from the fmalib checkout (or '
                'pip install sam2; it needs torch>=2.5.1 and, without CUDA, builds no extension)')


def require_sam2() -> None:
    """One FmalibError saying how to install ``sam2`` when it is not importable."""
    try:
        import sam2  # noqa: F401  (optional dependency: pip install -e ".[sam2]")
    except ImportError as exc:
        raise FmalibError(f"masks.generator sam2 needs the sam2 package, which is not installed ({exc}); "
                          f"{SAM2_INSTALL}") from exc


def sam2_config_file(config: str) -> str:
    """A config name (``sam2.1_hiera_t``) -> the sam2 package's hydra config path."""
    if config not in SAM2_CONFIGS:
        raise FmalibError(f"params sam2.config {config!r} is unknown; expected one of {', '.join(SAM2_CONFIGS)}")
    return f"configs/{config.split('_')[0]}/{config}.yaml"


def read_sam2_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a SAM 2 checkpoint (Meta's ``{"model": ...}`` or a plain state dict), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"SAM 2 checkpoint {path} does not exist (expected Meta's release file, e.g. "
                          f"sam2.1_hiera_large.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise FmalibError(f"SAM 2 checkpoint {path} ({path.stat().st_size} bytes) cannot be read as a torch "
                          f"file — truncated or corrupt? ({type(exc).__name__})") from exc
    except Exception as exc:  # pickle errors of unknown kinds: still one clear error naming the file
        raise FmalibError(f"SAM 2 checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FmalibError(f"SAM 2 checkpoint {path} is not a state dict of tensors (nor {{'model': state dict}})")
    return dict(state)


def load_sam2(config: str, checkpoint: str | os.PathLike | None = None, image_size: int = 1024,
              device: str | torch.device = "cpu"):
    """A frozen SAM 2 (``SAM2Base``) in eval mode, built by ``sam2.build_sam.build_sam2`` from ``config`` with
    ``model.image_size`` = ``image_size``; weights from ``checkpoint``, or random init when None."""
    require_sam2()
    from sam2.build_sam import build_sam2  # optional dependency (pip install -e ".[sam2]")

    if image_size < 32 or image_size % 32:
        raise FmalibError(f"params sam2.image_size {image_size}: expected a multiple of 32 (Hiera's stride), "
                          f"e.g. 1024 for the released weights")
    model = build_sam2(sam2_config_file(config), None, device="cpu",
                       hydra_overrides_extra=[f"++model.image_size={int(image_size)}"])
    if checkpoint is not None:
        state = read_sam2_checkpoint(checkpoint)
        check_sam_state_dict(model, state, str(checkpoint))
        model.load_state_dict(state, strict=True)
        log.info("loaded SAM 2 %s from %s", config, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def sam2_image_size(model) -> int:
    """The square input side of a SAM 2 (``SAM2Base.image_size``)."""
    return int(model.image_size)
