"""Stage-2 backbone weights (``stage2.weights``): load what users have and check that it filled the backbone.

Detectron2 loads any checkpoint leniently: keys it cannot place are logged and left at random init, so an
unconverted torchvision ``resnet101.pth`` trains from scratch with exit code 0. ``BackboneCheckpointer``
(the stage-2 trainer's checkpointer) therefore

* converts torchvision's ResNet layout (``conv1`` / ``bn1`` / ``layer1.0.conv1`` / ``downsample.0`` ...) to
  Detectron2's, as Detectron2's ``tools/convert-torchvision-to-d2.py`` does, when ``weights_style`` is
  ``torchvision`` — and refuses such a file under another style, whose pixel conventions it does not have;
* counts, after loading ``stage2.weights``, the backbone's ResNet tensors the file filled: none is an error
  naming the file and the style, fewer than all a warning; the count goes into the run's ``done.json``.

MSRA's ``R-50.pkl`` / ``R-101.pkl`` and the DeepLab ``R-52.pkl`` / ``R-103.pkl`` of Detectron2's model zoo
(Caffe2 blob names, or Detectron2 names with ``__author__``) are converted by Detectron2's own name-matching
heuristics and checked the same way.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..core.errors import FmalibError
from .compat import ensure_detectron2

log = logging.getLogger(__name__)

# what each weights_style expects, for messages
STYLE_FILES = {
    "torchvision": "a torchvision ResNet state dict (e.g. resnet101-63fe2227.pth), converted on load",
    "msra": "Detectron2's ImageNet MSRA weights (ImageNetPretrained/MSRA/R-101.pkl)",
    "deeplab": "Detectron2's DeepLab ImageNet weights with the deeplab stem (DeepLab/R-103.pkl)",
}
_RESNET_KEY = re.compile(r"^backbone\.(bottom_up\.)?(stem|res[2-5])\.")


def is_torchvision_resnet(state) -> bool:
    """torchvision's ResNet naming: stem ``conv1`` / ``bn1`` and ``layerN.B.*`` blocks."""
    return "conv1.weight" in state and "bn1.weight" in state and any(k.startswith("layer1.") for k in state)


def torchvision_to_detectron2(state) -> dict:
    """Detectron2's tools/convert-torchvision-to-d2.py renaming; the classifier (``fc``) is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        k = key if "layer" in key else f"stem.{key}"
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = value.detach().cpu().numpy() if hasattr(value, "detach") else value
    return out


def backbone_keys(model) -> list[str]:
    """The ResNet tensors of a stage-2 model (FPN's ``backbone.bottom_up.*`` or DeepLab's ``backbone.*``)."""
    return [k for k in model.state_dict() if _RESNET_KEY.match(k) and not k.endswith("num_batches_tracked")]


def checkpointer_class():
    """Defined on first use: Detectron2 must be imported after fmalib's compatibility bridges."""
    ensure_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    class BackboneCheckpointer(DetectionCheckpointer):
        """DetectionCheckpointer that converts and checks ``weights`` (resumed checkpoints load as usual)."""

        def __init__(self, model, save_dir="", *, weights: str | None, weights_style: str, **checkpointables):
            super().__init__(model, save_dir, **checkpointables)
            self.weights = str(Path(weights).resolve()) if weights else None
            self.weights_style = weights_style
            self.backbone_report: dict | None = None
            self._loading_weights = False

        def _load_file(self, filename):
            self._loading_weights = self.weights is not None and os.path.realpath(filename) == self.weights
            loaded = super()._load_file(filename)
            if not self._loading_weights or not is_torchvision_resnet(loaded["model"]):
                return loaded
            if self.weights_style != "torchvision":
                raise FmalibError(
                    f"stage2.weights {filename} is a torchvision ResNet state dict (conv1 / bn1 / layer1... keys) "
                    f"but stage2.weights_style is {self.weights_style!r}, which expects "
                    f"{STYLE_FILES[self.weights_style]}: set weights_style: torchvision (fmalib converts the "
                    f"layout on load and feeds RGB inputs normalised as torchvision's)")
            log.info("stage 2: converting torchvision ResNet weights %s to Detectron2's layout", filename)
            return {"model": torchvision_to_detectron2(loaded["model"]), "__author__": "torchvision",
                    "matching_heuristics": True}

        def _load_model(self, checkpoint):
            incompatible = super()._load_model(checkpoint)
            if self._loading_weights:
                self._loading_weights = False
                keys = backbone_keys(self.model)
                missing = set(incompatible.missing_keys)
                matched = [k for k in keys if k not in missing]
                self.backbone_report = {"file": self.weights, "weights_style": self.weights_style,
                                        "matched": len(matched), "backbone_tensors": len(keys)}
                if not matched:
                    raise FmalibError(
                        f"stage2.weights {self.weights} filled none of the backbone's {len(keys)} ResNet tensors "
                        f"(weights_style {self.weights_style!r} expects {STYLE_FILES[self.weights_style]}); "
                        f"training would start from random init. Other layouts: " + "; ".join(
                            f"{s}: {d}" for s, d in STYLE_FILES.items() if s != self.weights_style))
                if len(matched) < len(keys):
                    log.warning("stage 2: %s filled %d of the backbone's %d ResNet tensors (weights_style %s); "
                                "first left at random init: %s", self.weights, len(matched), len(keys),
                                self.weights_style, sorted(set(keys) - set(matched))[:5])
                else:
                    log.info("stage 2: %s filled all %d backbone ResNet tensors", self.weights, len(keys))
            return incompatible

    return BackboneCheckpointer
