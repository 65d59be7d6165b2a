"""The mask generators the mask stage can run, by ``params.masks.generator``.

Each entry says how to identify its model in the mask cache's key (``fingerprint``), how to load that model
from the params (``load_model``, in ``fmalib.models.checkpoints``) and how to build the generator around it
(``build``, a class of ``fmalib.method``). Every generator takes the thresholds of ``params.masks``
(``MASK_KEYS``), goes through the same overlap filter and returns the same ``MaskSet`` (RLE counts, level,
score, stability), so the mask cache, SAMS and everything after do not know which one ran.

* ``sam``: segment_anything's SAM of ``params.sam`` and ``fmalib.method.generator.MultiLevelMaskGenerator``
  (the paper's);
* ``sam2``: the optional sam2 package's SAM 2 of ``params.sam2`` (built by its own ``build_sam2``) and
  ``fmalib.method.generator_sam2.MultiLevelSam2MaskGenerator`` (a ``SAM2AutomaticMaskGenerator``). Without
  sam2 installed, loading says how to install it.

Adding one: a generator class in ``method/`` whose ``generate(image)`` returns a ``MaskSet`` with levels, its
model loader and fingerprint in ``models/checkpoints.py``, and an entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import FmalibError
from ..method.generator import MASK_KEYS, MultiLevelMaskGenerator
from ..method.generator_sam2 import MultiLevelSam2MaskGenerator
from ..models.checkpoints import load_sam2_from_params, load_sam_from_params, sam2_fingerprint, sam_fingerprint


@dataclass(frozen=True)
class MaskGeneratorSpec:
    """One registered mask generator (module doc)."""

    name: str
    fingerprint: Callable[[Any], dict]  # params -> JSON-able identity of the model (cache keys)
    load_model: Callable[..., Any]  # (params, device=None) -> the frozen model
    build: Callable[..., Any]  # (model, **mask_arguments(params)) -> object with generate(image) -> MaskSet
    label: str  # what logs and benches call it


GENERATORS: dict[str, MaskGeneratorSpec] = {
    "sam": MaskGeneratorSpec("sam", sam_fingerprint, load_sam_from_params, MultiLevelMaskGenerator,
                             "SAM (segment_anything, params.sam)"),
    "sam2": MaskGeneratorSpec("sam2", sam2_fingerprint, load_sam2_from_params, MultiLevelSam2MaskGenerator,
                              "SAM 2 (sam2 package, params.sam2)"),
}


def generator_spec(params) -> MaskGeneratorSpec:
    """The registry entry of ``params.masks.generator``."""
    name = params["masks"]["generator"]
    if name not in GENERATORS:
        raise FmalibError(f"params masks.generator {name!r} in {getattr(params, 'path', None)}: expected one of "
                          f"{', '.join(GENERATORS)}")
    return GENERATORS[name]


def generator_key(params) -> dict:
    """What identifies the generator in the mask cache's key: its name and its model's fingerprint."""
    spec = generator_spec(params)
    return {"generator": spec.name, "model": spec.fingerprint(params)}


def build_mask_generator(params, model=None, device: str | None = None):
    """The generator of ``params.masks.generator`` with the thresholds of ``params.masks``; ``model`` (already
    loaded, e.g. shared across calls) or the one of the params."""
    spec = generator_spec(params)
    if model is None:
        model = spec.load_model(params, device)
    return spec.build(model, **mask_arguments(params))


def mask_arguments(params) -> dict:
    """The generators' keyword arguments (``MASK_KEYS``) from ``params.masks``."""
    return {k: params["masks"][k] for k in MASK_KEYS}
