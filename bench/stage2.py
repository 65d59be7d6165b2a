"""Stage 2 speed on CPU: training s/iter of the toy schedule, inference s/image (single scale, multi-scale +
flip), and the toy schedule's projected time for both runs (seeds and GT).

Writes reports/bench/stage2.json. Usage:
    python bench/stage2.py [--params params/toy.yaml] [--iters 30] [--threads 2]
The load average is recorded too: on a shared machine wall-clock timings stretch with it, so CPU seconds
per iteration are reported as well (``toy_projection_cpu_s`` assumes perfect scaling over the threads).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.segment import load_segmenter, read_metrics, train_segmenter
from fmalib.study.results import write_bench


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--iters", type=int, default=30, help="training iterations timed (the first 5 are warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=20, help="val images timed for inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    s2 = base.stage2
    out = {"params": args.params, "model": s2.model, "backbone_depth": s2.backbone_depth,
           "batch_size": s2.batch_size, "crop_size": s2.crop_size, "fpn_channels": s2.fpn_channels,
           "head_channels": s2.head_channels, "toy_iters": s2.iters, "threads": args.threads,
           "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "loadavg_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(args.params, {"workdir": tmp, "stage2.iters": args.iters, "stage2.log_period": 1,
                                           "stage2.checkpoint_period": 10**9})
        run = Path(tmp) / "run"
        t, c = time.perf_counter(), time.process_time()
        train_segmenter(params, None, run, resume=False)
        out["train_wall_s"] = round(time.perf_counter() - t, 2)
        # CPU seconds per iteration (start-up and checkpointing included): robust to other load on the machine
        cpu_iter = (time.process_time() - c) / args.iters
        out["cpu_s_per_iter"] = round(cpu_iter, 4)
        times = [m["time"] for m in read_metrics(run) if "time" in m][5:]
        s_iter = statistics.median(times)
        out["s_per_iter"] = round(s_iter, 4)
        out["iters_per_s"] = round(1 / s_iter, 3)

        ds = open_dataset(params, params.data.val_split)
        images = [ds[i]["image"] for i in range(min(args.images, len(ds)))]
        for name, kw in (("single", {"scales": [1.0], "flip": False}),
                         ("multiscale_flip", {"scales": [0.75, 1.0, 1.25], "flip": True})):
            seg = load_segmenter(params, run, "cpu", crf=False, **kw)
            seg.predict(images[0])
            t = time.perf_counter()
            for img in images:
                seg.predict(img)
            out[f"infer_s_per_image_{name}"] = round((time.perf_counter() - t) / len(images), 4)
        n_val = len(ds)
    single = out["infer_s_per_image_single"] * n_val
    out["toy_projection_s"] = {"train_one_run": round(s2.iters * s_iter, 1), "eval_val_one_run": round(single, 1),
                               "both_runs": round(2 * (s2.iters * s_iter + single), 1)}
    # the same from CPU time: what both runs take where this process has its threads' cores to itself
    out["toy_projection_cpu_s"] = {"train_both_runs": round(2 * s2.iters * cpu_iter / args.threads, 1)}
    out["loadavg_after"] = os.getloadavg()[0]
    write_bench("stage2", out)
    return out


if __name__ == "__main__":
    main()
