"""Seeding and device choice."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import FmalibError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a rerun gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def get_device(name: str):
    """`cpu`, `cuda` or `cuda:N`; asking for CUDA without one is an error, not a silent fallback."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FmalibError(f"params device={name!r} but CUDA is not available; use device: cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise FmalibError(f"params device={name!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(name)
