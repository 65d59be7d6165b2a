"""Prompt learning on the toy benchmark: do learned prompts beat hand prompts, does CAA help, do seg prompts
beat cls prompts? And how fast does prompt training run?

- classification mAP on val: cls prompts vs the hand prompts ("a clean origami {}.");
- CAM-argmax seed mIoU (CLIP-ES protocol: bg threshold picked on train with GT, reported on val) for hand /
  cls / seg prompts, each without and with CAA;
- training speed (iterations/s) of the params' schedule on this machine; ``--vitb16 N`` also times N
  iterations of ViT-B/16 (random init) at 224 px, batch 16, AMP on CUDA.
The seg prompts are trained on CAM-argmax seeds of the cls CAMs by default (``--seeds sams`` for the
method's SAMS coarse seeds). Numbers mean something only with the pretrained tiny CLIP (assets/tiny_clip.pt).
    python bench/prompts.py [--params params/toy.yaml] [--fast] [--seeds cam_argmax|sams] [--vitb16 3]
    python bench/prompts.py --speed-only   # step timings only, merged into the JSON
    python bench/prompts.py --profile-only [--vitb16 3]   # where an iteration's time goes, merged
Writes reports/bench/prompts.json (reports/bench/prompts-fast.json with --fast).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time

import numpy as np
import torch

import fmalib.study
from fmalib.core.cache import atomic_write_text
from fmalib.core.params import repo_root
from fmalib.data import open_dataset
from fmalib.method.objectives import cls_batch_loss, seg_batch_loss
from fmalib.stages.prompt_runs import build_prompts
from fmalib.models.checkpoints import clip_fingerprint, load_clip_from_params
from fmalib.stages.cam_argmax import argmax_seed_miou
from fmalib.stages.prompt_runs import load_context
from fmalib.stages.prompts import classification_map, train_prompts
from fmalib.stages.pipeline import seg_training_seeds

log = logging.getLogger("bench.prompts")


def step_speed(params, model, stage: str, iters: int, size: int, n_classes: int) -> dict:
    """Iterations/s of prompt training steps (forward, backward, SGD) on random data: batch from params,
    ``size`` px crops, about 1.5 present classes per image; the first iteration is left out."""
    dev = next(model.parameters()).device
    prompts = build_prompts(stage, model, params).to(dev)
    opt = torch.optim.SGD(prompts.parameters(), lr=1e-3, momentum=0.9)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    g = torch.Generator().manual_seed(0)
    b = int(params["prompts"]["batch_size"])
    images = torch.randn(b, 3, size, size, generator=g).to(dev)
    present = torch.zeros(b, n_classes, dtype=torch.bool)
    present[torch.arange(b), torch.randint(0, n_classes, (b,), generator=g)] = True
    present[torch.arange(b // 2), torch.randint(0, n_classes, (b // 2,), generator=g)] = True
    seeds = torch.randint(0, n_classes + 1, (b, size, size), generator=g).to(dev)
    times = []
    for _ in range(iters + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
            loss = (cls_batch_loss(model, prompts, images, present.to(dev)) if stage == "cls" else
                    seg_batch_loss(model, prompts, images, present.to(dev), seeds))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"iters_per_s": float(len(times[1:]) / sum(times[1:])), "device": str(dev), "amp": amp, "batch": b,
            "size": size, "iters_timed": iters, "threads": torch.get_num_threads()}


def vitb16_speed(stage: str, iters: int, device: str) -> dict:
    """ViT-B/16 (random init) at 224 px, batch 16, VOC's 20 classes + 25 bg prompts."""
    from fmalib.core.params import load_params
    from fmalib.models.clip import load_clip

    params = load_params("params/voc.yaml", {"clip.checkpoint": None, "device": device})
    return step_speed(params, load_clip("ViT-B-16", None, torch.device(device)), stage, iters, 224, 20)


def _median_s(fn, n: int) -> float:
    """Median seconds of ``n`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile_step(params, model, size: int, n_classes: int, n: int, dataset=None, seeds_dir=None) -> dict:
    """Where one prompt-training iteration's time goes (median s of ``n``): the frozen image tower (no grad),
    the prompts' text tower forward + backward, the whole loss forward + backward of each stage (tower
    included), and, given a dataset, assembling one augmented batch (``TrainSet``, as ``num_workers: 0``)."""
    from fmalib.models import clip as C
    from fmalib.stages.prompt_data import TrainSet

    dev = next(model.parameters()).device
    b = int(params["prompts"]["batch_size"])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, size, size, generator=g).to(dev)
    present = torch.zeros(b, n_classes, dtype=torch.bool)
    present[torch.arange(b), torch.randint(0, n_classes, (b,), generator=g)] = True
    present[torch.arange(b // 2), torch.randint(0, n_classes, (b // 2,), generator=g)] = True
    seeds = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):  # each present class a band of the crop: about 1.5 (image, class) pairs per image
        for j, c in enumerate(present[i].nonzero().flatten().tolist()):
            seeds[i, j * size // 3:(j + 1) * size // 3] = c + 1
    out: dict = {"batch": b, "size": size, "threads": torch.get_num_threads(), "device": str(dev)}
    with torch.no_grad():
        out["image_tower_s"] = _median_s(lambda: C.encode_image_tokens(model, images), n)
    for stage in ("cls", "seg"):
        prompts = build_prompts(stage, model, params).to(dev)
        out[stage] = {"text_fwd_bwd_s": _median_s(lambda: prompts().sum().backward(), n)}
        loss = (lambda: cls_batch_loss(model, prompts, images, present.to(dev)).backward()) if stage == "cls" else \
            (lambda: seg_batch_loss(model, prompts, images, present.to(dev), seeds.to(dev)).backward())
        out[stage]["loss_fwd_bwd_s"] = _median_s(loss, n)
        if dataset is not None and (stage == "cls" or seeds_dir is not None):
            mean, std = C.image_normalization(model)
            data = TrainSet(dataset, params["prompts"], 0, n_classes, seeds_dir if stage == "seg" else None, mean, std)
            keys = iter(range(10**6))
            out[stage]["data_batch_s"] = _median_s(
                lambda: [data[(next(keys), s, s % len(dataset))] for s in range(b)], n)
    return out


def profiles(params, model, args) -> dict:
    """``profile_step`` on the toy CLIP with the toy's data (and the coarse seeds in its workdir, if made), and
    with ``--vitb16 N`` on a random-init ViT-B/16 at 224 px (VOC's 20 classes), N timed calls each."""
    from fmalib.core.params import load_params
    from fmalib.models.clip import load_clip

    ds = open_dataset(params, params["data"]["train_split"])
    coarse = sorted(params.resolve_path("workdir").glob("seeds_coarse/*/"))
    seeds_dir = next((d for d in coarse if all((d / f"{i}.png").is_file() for i in ds.ids)), None)
    res = {"toy": profile_step(params, model, params["prompts"]["crop_size"], len(ds.class_names), 5, ds, seeds_dir)}
    if args.vitb16:
        voc = load_params("params/voc.yaml", {"clip.checkpoint": None, "device": params["device"]})
        res["vit_b16"] = profile_step(voc, load_clip("ViT-B-16", None, torch.device(params["device"])), 224, 20,
                                      args.vitb16)
    return res


def speeds(params, model, args) -> dict:
    """Step timings of the toy schedule on 1 and 2 CPU threads (+ ViT-B/16 with ``--vitb16 N``)."""
    n_cls = len(params["classes"]["names"])
    res: dict = {"toy_step_speed": {}}
    for threads in sorted({1, 2, args.threads}):
        torch.set_num_threads(threads)
        res["toy_step_speed"][f"{threads}_threads"] = {
            s: step_speed(params, model, s, 10, params["prompts"]["crop_size"], n_cls) for s in ("cls", "seg")}
    torch.set_num_threads(args.threads)
    if args.vitb16:
        res["vit_b16"] = {s: vitb16_speed(s, args.vitb16, params["device"]) for s in ("cls", "seg")}
    return res


def speeds_summary(res: dict) -> dict:
    out = {k: {s: round(v["iters_per_s"], 3) for s, v in d.items()} for k, d in res.get("toy_step_speed", {}).items()}
    out.update({f"vit_b16_{s}": round(v["iters_per_s"], 3) for s, v in res.get("vit_b16", {}).items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--fast", action="store_true", help="the params' fast mode (a smoke run, numbers meaningless)")
    ap.add_argument("--seeds", default="cam_argmax", choices=["cam_argmax", "sams", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vitb16", type=int, default=0, help="also time N ViT-B/16 iterations per stage")
    ap.add_argument("--device", default=None)
    ap.add_argument("--speed-only", action="store_true", help="only the step timings, merged into the JSON")
    ap.add_argument("--profile-only", action="store_true",
                    help="only where an iteration's time goes (tower, text, loss, data), merged into the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = fmalib.study.setup(args.params, fast=args.fast, device=args.device)
    ident = clip_fingerprint(params)
    if "random_init_seed" in ident:
        log.warning("no pretrained CLIP (%s): the quality numbers below are meaningless", params["clip"]["checkpoint"])
    model = load_clip_from_params(params)
    out = repo_root() / "reports" / "bench" / ("prompts-fast.json" if args.fast else "prompts.json")
    if args.profile_only:
        res = json.loads(out.read_text()) if out.is_file() else {}
        res["profile"] = profiles(params, model, args)
        atomic_write_text(out, json.dumps(res, indent=1, default=float))
        print(json.dumps(res["profile"], indent=1))
        return
    if args.speed_only:
        res = json.loads(out.read_text()) if out.is_file() else {}
        res.update(speeds(params, model, args))
        atomic_write_text(out, json.dumps(res, indent=1, default=float))
        print(json.dumps(speeds_summary(res), indent=1))
        return
    res: dict = {"params": str(args.params), "fast": args.fast, "clip": ident, "threads": args.threads,
                 "device": params["device"], "machine": platform.machine(), "torch": torch.__version__}

    t0 = time.perf_counter()
    cls_run = train_prompts(params, "cls", model=model)
    res["train_cls"] = {"iters": len(cls_run.losses), "iters_per_s": cls_run.iters_per_s,
                        "loss_first10": float(np.mean(cls_run.losses[:10])),
                        "loss_last10": float(np.mean(cls_run.losses[-10:])), "batch": params["prompts"]["batch_size"],
                        "fg_similarity_first": cls_run.fg_similarity[0], "fg_similarity_last": cls_run.fg_similarity[-1]}
    val = open_dataset(params, params["data"]["val_split"])
    hand = build_prompts("hand", model, params)
    cls = load_context(build_prompts("cls", model, params), cls_run.context_path)
    res["classification_map"] = {"hand": classification_map(model, hand, val),
                                 "cls": classification_map(model, cls, val)}
    res["seed_miou"] = {k: argmax_seed_miou(params, k, model=model) for k in ("hand", "cls")}

    seeds_dir, seeds_desc = seg_training_seeds(params, args.seeds)
    seg_run = train_prompts(params, "seg", seeds_dir=seeds_dir, model=model)
    res["seg_seeds"] = seeds_desc
    res["train_seg"] = {"iters": len(seg_run.losses), "iters_per_s": seg_run.iters_per_s,
                        "loss_first10": float(np.mean(seg_run.losses[:10])),
                        "loss_last10": float(np.mean(seg_run.losses[-10:])), "batch": params["prompts"]["batch_size"]}
    res["seed_miou"]["seg"] = argmax_seed_miou(params, "seg", seeds_dir=seeds_dir, model=model)
    res.update(speeds(params, model, args))
    res["wall_s"] = time.perf_counter() - t0

    sm = res["seed_miou"]
    res["checks"] = {
        "cls_map_gt_hand": res["classification_map"]["cls"]["map"] > res["classification_map"]["hand"]["map"],
        "cls_seed_gt_hand": sm["cls"]["caa"]["val_miou"] > sm["hand"]["caa"]["val_miou"],
        "caa_gt_no_caa_cls": sm["cls"]["caa"]["val_miou"] > sm["cls"]["no_caa"]["val_miou"],
        "seg_seed_gt_cls": sm["seg"]["caa"]["val_miou"] > sm["cls"]["caa"]["val_miou"],
    }
    summary = {
        "map hand / cls": (res["classification_map"]["hand"]["map"], res["classification_map"]["cls"]["map"]),
        "map vs bg hand / cls": (res["classification_map"]["hand"]["map_vs_bg"],
                                 res["classification_map"]["cls"]["map_vs_bg"]),
        "fg prompt cosine cls, first / last iter": (cls_run.fg_similarity[0], cls_run.fg_similarity[-1]),
        **{f"seed val mIoU {k} (no CAA / CAA)": (v["no_caa"]["val_miou"], v["caa"]["val_miou"]) for k, v in sm.items()},
        "train it/s cls / seg": (res["train_cls"]["iters_per_s"], res["train_seg"]["iters_per_s"]),
    }
    for k, v in summary.items():
        print(f"{k:40s} {v[0]:.4f} / {v[1]:.4f}")
    print(json.dumps(res["checks"]))
    print(json.dumps(speeds_summary(res), indent=1))
    atomic_write_text(out, json.dumps(res, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
