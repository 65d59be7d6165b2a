"""What every notebook and CLI stage calls first: load params (+ fast mode), seed, set up logging."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.params import Params


def setup(params_path: str | os.PathLike, fast: bool = False, overrides: Mapping[str, Any] | None = None,
          device: str | None = None) -> "Params":
    """Params for a run. ``fast`` applies the file's ``fast:`` overlay (a tiny slice for tests and smoke
    runs); explicit ``overrides`` (dotted keys, e.g. ``--set`` or papermill's) and ``device`` are applied last."""
    # imported here: `python -m fmalib --help` loads this package without torch
    from ..core.device import seed_everything
    from ..core.params import fast_overlay, load_params

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    overlays = fast_overlay(load_params(params_path)) if fast else []
    merged.update(overrides or {})
    origins.update(dict.fromkeys(overrides or {}, "--set"))
    if device:
        merged["device"] = device
        origins["device"] = "--device"
    from ..data import with_classes

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    params = with_classes(load_params(params_path, merged, origins, overlays))
    seed_everything(params.seed)
    return params
