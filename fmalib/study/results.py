"""Numbers a notebook reports, kept as JSON beside its executed copy so the HTML report can gather them.

Each notebook calls ``record(out_dir, "coarse_seed_miou", 0.61)``; ``read_results(out_dir)`` returns every
recorded key. One file per notebook stage keeps concurrent or partial reruns from clobbering each other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text
from ..core.params import repo_root


def _results_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "results"


def record(out_dir: str | os.PathLike, group: str, **values: Any) -> dict:
    """Merge ``values`` into results/<group>.json (atomic); returns the group's full mapping."""
    path = _results_dir(out_dir) / f"{group}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, default=float))
    return data


def read_results(out_dir: str | os.PathLike) -> dict[str, dict]:
    """{group: {key: value}} for every results/*.json under out_dir."""
    root = _results_dir(out_dir)
    return {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))} if root.is_dir() else {}


def write_bench(name_or_path: str | os.PathLike, data: dict) -> Path:
    """Print a benchmark's numbers and write them (atomic) to reports/bench/<name>.json, or to the path given."""

    path = Path(name_or_path)
    if path.suffix != ".json":
        path = repo_root() / "reports" / "bench" / f"{name_or_path}.json"
    text = json.dumps(data, indent=1, default=float)
    print(text)
    atomic_write_text(path, text)
    return path
