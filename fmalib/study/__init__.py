"""What every notebook and CLI stage calls first: load params (+ fast mode), seed, set up logging."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ..core.device import seed_everything
from ..core.params import Params, load_params


def setup(params_path: str | os.PathLike, fast: bool = False, overrides: Mapping[str, Any] | None = None,
          device: str | None = None) -> Params:
    """Params for a run. ``fast`` applies the file's own ``fast:`` overrides (a tiny slice for tests and smoke
    runs); explicit ``overrides`` (dotted keys) and ``device`` are applied last."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if fast:
        merged.update(load_params(params_path).fast)
        origins.update(dict.fromkeys(merged, "fast:"))
    merged.update(overrides or {})
    origins.update(dict.fromkeys(overrides or {}, "--set"))
    if device:
        merged["device"] = device
        origins["device"] = "--device"
    params = load_params(params_path, merged, origins)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    seed_everything(params.seed)
    return params
