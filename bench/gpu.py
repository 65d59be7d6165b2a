"""One GPU, one command, at most ~8 minutes: the paper-sized work of the study, measured -> reports/bench/gpu.json.

1. masks — fmalib's multi-level generator vs segment_anything's stock ``SamAutomaticMaskGenerator`` (bench/masks.py's
   ``compare_with_stock``) with SAM ViT-H at random init (the weights do not change the compute), on synthetic
   500x375 images (VOC's size), params/voc.yaml's mask settings (32x32 points, one crop layer, 0.86 / 0.92),
   ``min_mask_region_area`` 0 for both (the stock clean-up needs OpenCV); s/image in fp32 and with the image
   encoder (nearly all the FLOPs) under bf16 and fp16 autocast; the decoder and post-processing stay fp32. A
   random SAM passes few masks through the paper's thresholds, so fp32 is also run with every threshold at 0
   (every mask survives: the post-processing's upper bound).
2. prompts — ViT-B/16 (random init) prompt-training iterations/s at 224 px, batch 16, fp16 AMP, for the cls
   and the seg stage (bench/prompts.py's ``step_speed``: the per-batch losses of fmalib.method.objectives).
3. stage 2 — Detectron2 DeepLabV3+ R101 (params/voc.yaml's stage2, random init, BN on one GPU) training
   s/iter at crop 512, batch 8, fp16 AMP: forward, backward and SGD on random batches (no data loading).

Each section is timed on its own and errors are recorded, not fatal (exit status 1 if any); ``--budget-s``
skips what would start after the budget. ``--dry-run``: the same code in CI size on CPU (tiny SAM and CLIP,
one 128x96 image, no fp16, one iteration, DeepLabV3+ R18 at crop 64; well under a minute) -> --out (default
reports/bench/gpu-dry-run.json); tests/test_bench.py runs it, so this script cannot rot.

On a bare GPU machine with its own PyTorch (torch, torchvision, numpy, scipy, pandas, pillow, pyyaml, regex,
timm, huggingface_hub, safetensors, tqdm, matplotlib) and no package registry, carry the rest as wheels:
``bash tools/gpu_wheels.sh`` (here, with PyPI) writes gpu_wheels/ (git-ignored): the pure-Python
open_clip_torch, ftfy, wcwidth, segment_anything, the Detectron2 wheel from .cache/detectron2 (make install
builds it) with fvcore, iopath, yacs, termcolor, tabulate, cloudpickle, portalocker, omegaconf, hydra-core,
antlr4-python3-runtime, and the compiled pycocotools and grimp (cache keys need it), built for the device's
Python, default 3.12. Then, in the
repo root there (carry gpu_wheels):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site gpu_wheels/*.whl && PYTHONPATH=/tmp/site:. python3 bench/gpu.py
fmalib itself runs from the checkout (PYTHONPATH=.); nothing is downloaded (random-init models only).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/masks.py, bench/prompts.py
import masks as mask_bench  # noqa: E402
import prompts as prompt_bench  # noqa: E402

from fmalib.core.params import load_params, repo_root  # noqa: E402
from fmalib.data.synthetic import generate_sample  # noqa: E402
from fmalib.models.checkpoints import load_clip_from_params  # noqa: E402
from fmalib.models.clip import load_clip  # noqa: E402
from fmalib.models.sam import load_sam  # noqa: E402
from fmalib.study.results import write_bench  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync_for(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


@contextlib.contextmanager
def encoder_autocast(model, dtype):
    """Run SAM's image encoder under autocast (``dtype``; None: fp32), its output back in fp32."""
    if dtype is None:
        yield
        return
    encoder = model.image_encoder
    forward = encoder.forward
    device_type = next(model.parameters()).device.type

    def autocast_forward(x):
        with torch.autocast(device_type=device_type, dtype=dtype):
            return forward(x).float()

    encoder.forward = autocast_forward
    try:
        yield
    finally:
        del encoder.forward


def images_500x375(n: int, size=(375, 500)):
    return [generate_sample(0, 6_000_000 + i, size).image for i in range(n)]


def mask_section(device, dry: bool, n_images: int, budget) -> dict:
    if dry:
        torch.manual_seed(0)
        model = load_sam("fmalib_tiny", None, device)
        cfg = dict(load_params("params/toy.yaml")["masks"], points_per_side=4)
        images, model_name = images_500x375(1, (96, 128)), "fmalib_tiny (random init)"
    else:
        torch.manual_seed(0)
        model = load_sam("vit_h", None, device)
        cfg = dict(load_params("params/voc.yaml")["masks"])
        images, model_name = images_500x375(n_images), "vit_h (random init)"
    runs = [(p, "paper thresholds", cfg) for p in PRECISIONS if not (dry and p == "fp16")]  # CPU fp16: slow
    runs.append(("fp32", "thresholds 0", dict(cfg, pred_iou_thresh=0.0, stability_score_thresh=0.0)))
    out = {"model": model_name, "note": "min_mask_region_area 0 for both (the stock clean-up needs OpenCV); "
                                        "autocast wraps the image encoder only", "runs": []}
    sync = sync_for(device)
    for precision, thresholds, c in runs:
        if budget():
            out["runs"].append({"precision": precision, "thresholds": thresholds, "skipped": "over --budget-s"})
            continue
        t0 = time.perf_counter()
        with encoder_autocast(model, PRECISIONS[precision]):
            res = mask_bench.compare_with_stock(model, c, images, warm_up=not dry, sync=sync)
        out["runs"].append({"precision": precision, "thresholds": thresholds, **res,
                            "wall_s": time.perf_counter() - t0})
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    return out


def prompt_section(device, dry: bool, iters: int) -> dict:
    out = {}
    if dry:
        params = load_params("params/toy.yaml", {"prompts.batch_size": 2, "device": str(device)})
        model = load_clip_from_params(params)
        for stage in ("cls", "seg"):
            out[stage] = prompt_bench.step_speed(params, model, stage, iters, params["prompts"]["crop_size"],
                                                 len(params["classes"]["names"]))
        out["model"] = params["clip"]["model"]
        return out
    params = load_params("params/voc.yaml", {"clip.checkpoint": None, "device": str(device)})
    torch.manual_seed(0)
    model = load_clip("ViT-B-16", None, device)
    for stage in ("cls", "seg"):
        out[stage] = prompt_bench.step_speed(params, model, stage, iters, 224, len(params["classes"]["names"]))
    out["model"] = "ViT-B-16 (random init)"
    return out


def stage2_section(device, dry: bool, iters: int, warm_up: int) -> dict:
    from fmalib.segment.compat import ensure_detectron2  # bench script, not fmalib: detectron2 is optional
    from fmalib.segment.config import build_config

    ensure_detectron2()
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    if dry:
        s2 = dict(load_params("params/toy.yaml")["stage2"], model="deeplabv3plus", backbone_depth=18,
                  batch_size=2, crop_size=64, head_channels=32, amp=False)
        n_classes = 7
    else:
        voc = load_params("params/voc.yaml")
        s2 = dict(voc["stage2"], weights=None, norm="BN", batch_size=8, crop_size=512, amp=True)
        n_classes = len(voc["classes"]["names"]) + 1
    cfg = build_config(s2, n_classes, device=str(device), seed=0)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    amp = bool(s2["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    g = torch.Generator().manual_seed(0)
    crop, b = int(s2["crop_size"]), int(s2["batch_size"])
    batch = [{"image": torch.randint(0, 256, (3, crop, crop), generator=g).float(),
              "sem_seg": torch.randint(0, n_classes, (crop, crop), generator=g)} for _ in range(b)]
    sync = sync_for(device)
    times, losses = [], []
    for it in range(warm_up + iters):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        if it >= warm_up:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    out = {"model": f"{s2['model']} R{s2['backbone_depth']}", "crop": crop, "batch": b, "amp_fp16": amp,
           "norm": cfg.MODEL.RESNETS.NORM, "iters_timed": iters, "warm_up": warm_up,
           "s_per_iter": sum(times) / len(times), "s_per_iter_min": min(times), "loss_last": losses[-1],
           "note": "random batches already on the host (no data loading), random init"}
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CI size on CPU: tiny models, 1 image, 1 iteration")
    ap.add_argument("--out", default=None, help="default reports/bench/gpu.json (gpu-dry-run.json with --dry-run)")
    ap.add_argument("--mask-images", type=int, default=3, help="timed 500x375 images per mask run")
    ap.add_argument("--prompt-iters", type=int, default=20)
    ap.add_argument("--stage2-iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=420.0, help="no new mask run starts after this")
    ap.add_argument("--only", nargs="+", choices=["masks", "prompts", "stage2"], default=None)
    args = ap.parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        args.mask_images, args.prompt_iters, args.stage2_iters = 1, 1, 1
        torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared CPU
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        sys.exit("bench/gpu.py: no CUDA device; use --dry-run for the CPU smoke run")
    out_path = args.out or str(repo_root() / "reports" / "bench" / ("gpu-dry-run.json" if args.dry_run else "gpu.json"))
    start = time.perf_counter()
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(),
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    sections = {"masks": lambda: mask_section(device, args.dry_run, args.mask_images,
                                              lambda: time.perf_counter() - start > args.budget_s),
                "prompts": lambda: prompt_section(device, args.dry_run, args.prompt_iters),
                "stage2": lambda: stage2_section(device, args.dry_run, args.stage2_iters, 0 if args.dry_run else 3)}
    failed = []
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception as exc:  # one section's failure must not cost the others' device time
            failed.append(name)
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        result[name]["section_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    result["wall_s"] = time.perf_counter() - start
    result["failed_sections"] = failed
    write_bench(out_path, result)
    if failed:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
