"""Synthetic benchmark: generation time at the toy params' size and its size on disk.

Writes reports/bench/data.json. Usage: python bench/data.py [--params params/toy.yaml] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from fmalib.core.params import load_params
from fmalib.data.synthetic import generate_sample, sample_size, write_benchmark
from fmalib.study.results import write_bench


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    syn = load_params(args.params).data.synthetic
    size_range = (syn.size_min, syn.size_max)
    out = {"params": args.params, "n_train": syn.n_train, "n_val": syn.n_val, "size_range": list(size_range),
           "cpus": os.cpu_count(), "python": platform.python_version(), "write_s": {}}

    t = time.perf_counter()
    for i in range(100):
        generate_sample(syn.seed, i, sample_size(syn.seed, i, size_range))
    out["generate_sample_ms"] = round((time.perf_counter() - t) * 10, 2)

    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            root = Path(tmp) / f"toy_w{w}"
            t = time.perf_counter()
            write_benchmark(root, syn.n_train, syn.n_val, syn.seed, size_range, workers=w)
            out["write_s"][str(w)] = round(time.perf_counter() - t, 2)
        parts = {"JPEGImages": root / "JPEGImages", "SegmentationClass": root / "SegmentationClass",
                 "annotations.json": root / "annotations.json", "annotations (COCO)": root / "annotations"}
        out["bytes"] = {k: (_du(p) if p.is_dir() else p.stat().st_size) for k, p in parts.items()}
        out["bytes"]["total"] = _du(root)
        out["mib_total"] = round(out["bytes"]["total"] / 2**20, 2)
        sizes = [sample_size(syn.seed, i, size_range) for i in range(syn.n_train)]
        out["non_square_share"] = float(np.mean([h != w for h, w in sizes]))
    write_bench("data", out)
    return out


if __name__ == "__main__":
    main()
