"""bench/gpu.py's CPU dry run (tiny models, one image, one iteration): the one-GPU benchmark cannot rot unseen."""
from __future__ import annotations

import importlib.util
import json

import torch

from fmalib.core.params import repo_root
from fmalib.segment.compat import detectron2_available


def test_gpu_bench_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", repo_root() / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    out = tmp_path / "gpu.json"
    only = ["masks", "prompts"] + (["stage2"] if detectron2_available() else [])
    try:
        bench.main(["--dry-run", "--out", str(out), "--only", *only])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["failed_sections"] == []
    runs = {(r["precision"], r["thresholds"]): r for r in res["masks"]["runs"]}
    # fp16 too on the GPU; on CPU fp16 autocast is slow, and its code path is bf16's
    assert set(runs) == {("fp32", "paper thresholds"), ("bf16", "paper thresholds"), ("fp32", "thresholds 0")}
    for r in runs.values():
        assert r["fmalib_s_per_image"] > 0 and r["stock_s_per_image"] > 0
    assert runs["fp32", "thresholds 0"]["masks_per_image"]["stock"] > 0  # masks survive: the matching ran
    for stage in ("cls", "seg"):
        assert res["prompts"][stage]["iters_per_s"] > 0
    if "stage2" in only:
        assert res["stage2"]["s_per_iter"] > 0 and res["stage2"]["model"] == "deeplabv3plus R18"
