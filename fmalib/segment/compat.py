"""The one place where fmalib bridges Detectron2 0.6 to today's Python stack; every bridge applies only if missing.

Detectron2's last release (0.6, 2021) predates NumPy 1.24, Pillow 10 and current PyTorch, and the
pure-Python build that ``tools/install_detectron2.sh`` makes from the ``pb1-detectron2`` sdist has no
compiled ops. Semantic segmentation needs none of those ops, but three things stop Detectron2 from importing
or evaluating; each is bridged here at run time, in this process only, and only when absent — nothing in
the installed packages is edited, and a full Detectron2 build with its ``_C`` extension is left untouched:

* ``detectron2._C``: ``detectron2.layers`` and ``detectron2.evaluation`` import the compiled extension at
  import time (deformable conv, rotated boxes, the fast COCO evaluator). Without it we register a
  placeholder module; touching any op on it raises an error that says which op and how to build it.
* ``PIL.Image.LINEAR``: removed in Pillow 10 (an alias of ``BILINEAR``); Detectron2's ``ExtentTransform``
  uses it as a default argument, so ``detectron2.data.transforms`` fails to import without it.
* ``np.int`` / ``np.float`` / ``np.bool``: aliases of the builtins removed in NumPy 1.24 (``np.bool`` came
  back in NumPy 2 as the bool dtype); ``SemSegEvaluator`` and ``build_detection_train_loader``'s class
  histogram use them.

Call :func:`ensure_detectron2` before importing any ``detectron2`` submodule (``fmalib.segment`` does).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import types

import numpy as np
from PIL import Image

from ..core.errors import FmalibError

log = logging.getLogger(__name__)

INSTALL_HINT = ("run `make install` (or `bash tools/install_detectron2.sh .venv/bin/python`); on a GPU "
                "cluster set DETECTRON2_SRC=/path/to/detectron2 to build it with its compiled ops")

#: names of the bridges this process applied (empty with a full Detectron2 on an old stack)
APPLIED: list[str] = []


class _AbsentOps(types.ModuleType):
    """Stands in for ``detectron2._C`` in a pure-Python build; any op lookup names the op and the fix."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"detectron2._C.{name}: this Detectron2 is a pure-Python build without compiled "
                             f"ops (fine for semantic segmentation); for {name} build Detectron2 from source: "
                             f"DETECTRON2_SRC=/path/to/detectron2 bash tools/install_detectron2.sh <python>")


def _bridge_compiled_ops() -> None:
    import detectron2

    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2._C") is not None:
        return
    placeholder = _AbsentOps("detectron2._C", "placeholder for Detectron2's absent compiled ops (fmalib)")
    sys.modules["detectron2._C"] = placeholder
    detectron2._C = placeholder
    APPLIED.append("detectron2._C placeholder")


def _bridge_pillow() -> None:

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
        APPLIED.append("PIL.Image.LINEAR = BILINEAR")


def _bridge_numpy() -> None:

    for name, builtin in (("int", int), ("float", float), ("bool", bool)):
        try:
            getattr(np, name)
        except AttributeError:
            setattr(np, name, builtin)
            APPLIED.append(f"np.{name} = {name}")


def detectron2_available() -> bool:
    """Whether a ``detectron2`` package is installed (without importing it)."""
    return importlib.util.find_spec("detectron2") is not None


def ensure_detectron2():
    """Import Detectron2 with the missing bridges applied (idempotent); a clear error if it is not installed."""
    if not detectron2_available():
        raise FmalibError(f"Detectron2 is not installed in {sys.executable}: {INSTALL_HINT}")
    before = len(APPLIED)
    _bridge_pillow()
    _bridge_numpy()
    _bridge_compiled_ops()
    if len(APPLIED) > before:
        log.info("Detectron2 compatibility bridges applied: %s", ", ".join(APPLIED[before:]))
    import detectron2

    return detectron2
