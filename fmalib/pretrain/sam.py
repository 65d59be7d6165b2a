"""Pretrain the tiny SAM (``fmalib_tiny``) with point prompts on the synthetic benchmark's region masks.

Every pixel of a synthetic image belongs to one *whole* region (an object instance, or the visible part of
a background stuff band) and one *part* (a part of a multi-part object; the whole itself otherwise). A
point prompt on a pixel has two valid answers, its part and its whole, and SAM's outputs are trained to
give them at fixed levels, the order docs/method.md §5 reads them in (multimask output index = level):

    multimask 0 (subpart) = part,  multimask 1 (part) = part,  multimask 2 (whole) = whole,
    single-mask token     = whole.

The data hold no level finer than parts, so subpart and part share a target (on a ball or on stuff all
levels are the whole, as SAM answers an unambiguous point). Fixed levels rather than SAM's min-loss
assignment keep "output 2 = the object" true for every point, which is what the whole-mask bonus and the
overlap filter of §5 rely on. The IoU head regresses, for every output, the IoU of its binarised mask
with the best valid answer for the point (part or whole): automatic mask generation keeps a mask when it
is *some* valid region, so that is the quantity its pred-IoU threshold must be calibrated to.

Point prompts fall on objects (an instance, one of its parts, a pixel) or uniformly over the image (mostly
stuff, as the automatic generator's grid lands). From scratch, stuff points from step 0 kept the masks a
constant per-point size prior for 400 steps, while object-only points localised within 40 (measured), so
the first ``object_only_steps`` use objects only.

Images are drawn on the fly from the benchmark generator at indices from ``index_offset`` on, outside the
train and val splits (the study's images never reach its frozen SAM), so the run is
a pure function of (params, step): resuming from the last checkpoint gives the same bytes as a straight
run. ``python -m fmalib.pretrain.sam --params params/toy.yaml``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from tqdm.auto import tqdm

from ..core.cache import atomic_write_bytes, stable_hash, torch_bytes
from ..core.code_key import code_digest
from ..core.device import seed_everything
from ..core.errors import FmalibError
from ..core.params import Params, load_params
from ..data.synthetic import check_outside_splits, generate_sample, sample_size, split_sizes
from ..models.sam import TINY_SAM_CONFIG, build_sam_tiny, load_sam
from .regions import PAD, region_maps
from .sam_quality import sam_quality

log = logging.getLogger(__name__)


def pretrain_config(params: Params) -> dict:
    """foundation.sam of ``params``, checked key by key (names the file and dotted key on error)."""
    if params["data"]["kind"] != "synthetic":
        raise FmalibError(f"{params.path}: SAM pretraining needs data.kind: synthetic (got {params['data']['kind']!r})")
    if params["sam"]["model_type"] != "fmalib_tiny":
        raise FmalibError(f"{params.path}: SAM pretraining trains sam.model_type fmalib_tiny, not {params['sam']['model_type']!r}")
    cfg = params["foundation"]["sam"]
    where = str(params.path or "params")
    check_outside_splits(cfg["index_offset"], cfg["steps"] * cfg["batch_size"], split_sizes(params),
                         f"{where}: foundation.sam.index_offset")
    return dict(cfg)


# ------------------------------------------------------------------------------------------- regions

@dataclass
class PointRegions:
    """One image in the model's input frame: resized so the longest side is ``size``, padded bottom/right."""

    image: np.ndarray  # uint8 (S, S, 3), zero padding
    whole: np.ndarray  # uint8 (S, S) whole-region index, PAD outside the image
    part: np.ndarray  # uint8 (S, S) part index, PAD outside the image
    n_instances: int
    hw: tuple[int, int]  # resized image size inside the padded frame


def to_model_frame(sample, size: int) -> PointRegions:
    """Resize exactly as ``SamPredictor.set_image`` does (ResizeLongestSide, PIL bilinear); maps nearest."""
    whole, part, n_inst = region_maps(sample)
    image = ResizeLongestSide(size).apply_image(sample.image)
    h, w = image.shape[:2]

    def fit(a: np.ndarray, fill: int) -> np.ndarray:
        out = np.full((size, size) + a.shape[2:], fill, a.dtype)
        out[:h, :w] = a
        return out

    def nearest(m: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) if m.shape != (h, w) else m

    return PointRegions(fit(image, 0), fit(nearest(whole), PAD), fit(nearest(part), PAD), n_inst, (h, w))


def sample_points(reg: PointRegions, n: int, rng: np.random.Generator, object_fraction: float = 0.5) -> np.ndarray:
    """(n, 2) int (x, y) pixels: ``round(n · object_fraction)`` on instances — an instance, then one of its
    parts, then a pixel, uniformly, so small parts (wheels, doors) get points too — the rest uniform over
    the image (as the automatic generator's grid lands, mostly on stuff)."""
    ys, xs = np.nonzero(reg.whole != PAD)
    n_obj = int(round(n * object_fraction)) if reg.n_instances else 0
    pick = rng.integers(0, len(ys), n - n_obj)
    pts = [np.stack([xs[pick], ys[pick]], 1)]
    for _ in range(n_obj):
        inst = reg.whole == rng.integers(reg.n_instances)
        parts = np.unique(reg.part[inst])
        py, px = np.nonzero(inst & (reg.part == parts[rng.integers(len(parts))]))
        j = rng.integers(len(py))
        pts.append(np.array([[px[j], py[j]]]))
    return np.concatenate(pts).astype(np.int64)


def point_targets(reg: PointRegions, pts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool (n, S, S) part and whole masks of the regions under each (x, y) point."""
    whole = torch.from_numpy(reg.whole)
    part = torch.from_numpy(reg.part)
    wi = torch.from_numpy(reg.whole[pts[:, 1], pts[:, 0]].astype(np.int64))
    pi = torch.from_numpy(reg.part[pts[:, 1], pts[:, 0]].astype(np.int64))
    return part[None] == pi[:, None, None].to(torch.uint8), whole[None] == wi[:, None, None].to(torch.uint8)


# ------------------------------------------------------------------------------------------- model step

LEVEL_TARGETS = ("whole", "part", "part", "whole")  # decoder tokens: single, multimask 0, 1, 2


def init_for_training(model: Sam, seed: int) -> Sam:
    """segment_anything initialises the absolute position embedding to zeros (it always loads weights);
    from scratch it needs SAM's ViT init, a truncated normal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pe = model.image_encoder.pos_embed
        if pe is not None:
            pe.copy_(torch.randn(pe.shape, generator=g).clamp_(-2, 2) * 0.02)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def decode_points(model: Sam, embeddings: torch.Tensor, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All four decoder outputs for single positive points at the decoder's low resolution (S/2).

    ``points[i]`` is (P_i, 2) float (x, y) in the input frame for image i. Returns logits (ΣP, 4, S/2, S/2)
    and predicted IoUs (ΣP, 4); index 0 is the single-mask token, 1..3 SAM's multimask outputs. The loss
    is taken at this resolution against area-downsampled targets: upsampling first made the loss half
    of a training step's CPU time (measured) for boundaries the bilinear upsampling smooths anyway.
    """
    pe = model.prompt_encoder.get_dense_pe()
    logits, ious = [], []
    for emb, xy in zip(embeddings, points):
        labels = torch.ones(len(xy), 1, dtype=torch.int)
        sparse, dense = model.prompt_encoder(points=(xy[:, None, :], labels), boxes=None, masks=None)
        low, iou = model.mask_decoder.predict_masks(emb[None], pe, sparse, dense)
        logits.append(low)
        ious.append(iou)
    return torch.cat(logits), torch.cat(ious)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask mean binary cross-entropy. With SAM's 20:1 focal:dice a from-scratch model predicted
    empty masks for every point at step 100 (focal's α = 0.25 down-weights the positives); with BCE + dice
    it had started to predict masks by then (measured, same data)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks over the last two dims (0 / 0 counts as 0)."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return inter / union.clamp(min=1)


def sam_point_loss(logits: torch.Tensor, iou_pred: torch.Tensor, part: torch.Tensor, whole: torch.Tensor,
                   valid: torch.Tensor, cfg: Mapping) -> tuple[torch.Tensor, dict]:
    """bce·w_b + dice·w_d on every output against its level's target, + w_iou · MSE of the IoU head
    against the IoU of the binarised output with the point's best valid region (part or whole).

    ``part``/``whole``/``valid`` are bool (N, S, S) in the input frame; they are area-downsampled to the
    logits' resolution (soft targets; IoUs on the targets binarised at 0.5).
    """
    k = part.shape[-1] // logits.shape[-1]
    part, whole, valid = (F.avg_pool2d(t[:, None].float(), k)[:, 0] for t in (part, whole, valid))
    by_name = {"part": part, "whole": whole}
    target = torch.stack([by_name[n] for n in LEVEL_TARGETS], 1)  # (N, 4, s, s)
    bce = bce_loss(logits, target).mean()
    dice = dice_loss(logits, target).mean()
    with torch.no_grad():
        part, whole, valid = part > 0.5, whole > 0.5, valid > 0.5
        binary = (logits > 0) & valid[:, None]
        actual = torch.maximum(mask_iou(binary, part[:, None]), mask_iou(binary, whole[:, None]))
    iou_mse = F.mse_loss(iou_pred, actual)
    loss = cfg["bce_weight"] * bce + cfg["dice_weight"] * dice + cfg["iou_weight"] * iou_mse
    whole_iou = mask_iou(binary[:, 3], whole).mean()
    return loss, {"loss": loss.item(), "bce": bce.item(), "dice": dice.item(), "iou_mse": iou_mse.item(),
                  "whole_iou": whole_iou.item()}


def object_fraction(cfg: Mapping, step: int) -> float:
    """Share of point prompts on objects: all of them for the first ``object_only_steps`` (from scratch,
    large stuff targets first pull the masks to a constant size prior and localisation starts late), then
    ``object_point_fraction``."""
    return 1.0 if step < cfg["object_only_steps"] else cfg["object_point_fraction"]


def make_batch(params: Params, cfg: Mapping, step: int, size: int):
    """Images and point targets of training step ``step`` — a pure function of (params, step)."""

    seed, syn = cfg["seed"], params["data"]["synthetic"]
    size_range = (syn["size_min"], syn["size_max"])
    rng = np.random.default_rng([seed, step, 1])
    images, points, parts, wholes, valid = [], [], [], [], []
    for j in range(cfg["batch_size"]):
        index = cfg["index_offset"] + step * cfg["batch_size"] + j  # outside the splits (pretrain_config)
        s = generate_sample(syn["seed"], index, sample_size(syn["seed"], index, size_range))
        reg = to_model_frame(s, size)
        pts = sample_points(reg, cfg["points_per_image"], rng, object_fraction(cfg, step))
        p, w = point_targets(reg, pts)
        images.append(reg.image)
        points.append(torch.from_numpy(pts).float())
        parts.append(p)
        wholes.append(w)
        valid.append(torch.from_numpy(reg.whole != PAD))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    valid_t = torch.stack(valid)
    return x, valid_t, points, torch.cat(parts), torch.cat(wholes), \
        torch.cat([v.expand(len(p), -1, -1) for v, p in zip(valid_t, points)])


def normalize_padded(model: Sam, x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``Sam.preprocess`` on images already padded: normalise, then zero the padding, as SamPredictor
    (which pads after normalising) feeds the encoder."""
    return (x - model.pixel_mean) / model.pixel_std * inside[:, None]


def lr_at(step: int, cfg: Mapping) -> float:
    """Linear warm-up, then cosine to 0."""
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    t = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_step(model: Sam, opt: torch.optim.Optimizer, batch, cfg: Mapping, step: int) -> dict:
    x, inside, points, part, whole, valid = batch
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    emb = model.image_encoder(normalize_padded(model, x, inside))
    logits, iou_pred = decode_points(model, emb, points)
    loss, stats = sam_point_loss(logits, iou_pred, part, whole, valid, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return stats


# ------------------------------------------------------------------------------------------- driver

def state_dir(params: Params, cfg: Mapping) -> Path:
    """``workdir/foundation/sam/<key>``: the resumable state of one pretraining, keyed by what changes the
    weights (not where they are saved, in which precision, or how often it checkpoints and evaluates)."""
    key = {"cfg": {k: v for k, v in cfg.items() if k not in ("checkpoint_every", "output", "fp16", "eval")},
           "arch": TINY_SAM_CONFIG, "data": params["data"]["synthetic"],
           "code": code_digest("fmalib.pretrain.sam")}  # not __name__: run as __main__ too
    return params.resolve_path("workdir") / "foundation" / "sam" / stable_hash(key)


def _save_state(path: Path, model: Sam, opt, step: int, history: list) -> None:
    atomic_write_bytes(path, torch_bytes({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                           "history": history}))


def save_weights(model: Sam, path: Path, fp16: bool) -> Path:
    """The shipped checkpoint: a plain state dict, as ``sam_vit_h_4b8939.pth`` is."""
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, torch_bytes(state))


def export_from_state(params: Params, output: str | Path | None = None, steps: int | None = None) -> Path:
    """Write the weights of the last checkpoint of this params' run (an interrupted run's best so far)."""

    cfg = pretrain_config(params)
    if steps is not None:
        cfg["steps"] = int(steps)
    ckpt = state_dir(params, cfg) / "state.pt"
    if not ckpt.is_file():
        raise FmalibError(f"no SAM pretraining checkpoint at {ckpt} for these params")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = build_sam_tiny()
    model.load_state_dict(state["model"])
    out = Path(output) if output is not None else params.resolve_path("foundation.sam.output")
    save_weights(model.eval(), out, cfg["fp16"])
    log.info("exported step %d of %d from %s to %s", state["step"], cfg["steps"], ckpt, out)
    return out


def pretrain_sam(params: Params, steps: int | None = None, output: str | Path | None = None,
                 evaluate: bool = True) -> dict:
    """Train (resuming from the last checkpoint in the state dir), save the weights, report quality."""

    cfg = pretrain_config(params)
    if steps is not None:
        cfg["steps"] = int(steps)
    out = Path(output) if output is not None else params.resolve_path("foundation.sam.output")
    sdir = state_dir(params, cfg)
    sdir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg["seed"])
    model = init_for_training(build_sam_tiny(), cfg["seed"])
    size = model.image_encoder.img_size
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start, history = 0, []
    ckpt = sdir / "state.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, history = int(state["step"]), list(state["history"])
        log.info("resuming SAM pretraining at step %d from %s", start, ckpt)
    log.info("SAM pretraining: %d steps × %d images × %d points, state in %s", cfg["steps"], cfg["batch_size"],
             cfg["points_per_image"], sdir)
    t0, n_img = time.time(), 0
    bar = tqdm(range(start, cfg["steps"]), desc="pretrain tiny SAM", initial=start, total=cfg["steps"])
    for step in bar:
        stats = train_step(model, opt, make_batch(params, cfg, step, size), cfg, step)
        history.append([step] + [stats[k] for k in ("loss", "bce", "dice", "iou_mse", "whole_iou")])
        n_img += cfg["batch_size"]
        if step % 25 == 0 or step == cfg["steps"] - 1:
            recent = np.mean([h[5] for h in history[-25:]])
            bar.set_postfix(loss=f"{stats['loss']:.3f}", iou_mse=f"{stats['iou_mse']:.4f}", whole_iou=f"{recent:.3f}")
            log.info("step %d loss %.4f bce %.4f dice %.4f iou_mse %.4f whole_iou(25) %.3f lr %.2e img/s %.1f",
                     step, stats["loss"], stats["bce"], stats["dice"], stats["iou_mse"], recent,
                     lr_at(step, cfg), n_img / (time.time() - t0))
        if (step + 1) % cfg["checkpoint_every"] == 0 and step + 1 < cfg["steps"]:
            _save_state(ckpt, model, opt, step + 1, history)
    train_s = time.time() - t0
    if start < cfg["steps"]:
        _save_state(ckpt, model, opt, cfg["steps"], history)
    model.eval()
    save_weights(model, out, cfg["fp16"])
    log.info("wrote tiny SAM weights to %s (%.1f MB)", out, out.stat().st_size / 1e6)
    report = {"steps": cfg["steps"], "images_seen": cfg["steps"] * cfg["batch_size"], "train_seconds_this_run": train_s,
              "img_per_s": n_img / train_s if n_img else None, "weights": str(out),
              "weights_mb": out.stat().st_size / 1e6, "state_dir": str(sdir)}
    if evaluate:
        report["quality"] = sam_quality(load_sam("fmalib_tiny", out), params)
    (sdir / "report.json").write_text(json.dumps(report, indent=1))
    log.info("SAM pretraining report: %s", json.dumps(report))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--steps", type=int, default=None, help="override foundation.sam.steps (smoke runs)")
    ap.add_argument("--output", default=None, help="override foundation.sam.output")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--export-only", action="store_true", help="write the weights of the last checkpoint and stop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the CPU is shared)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.export_only:
        return {"weights": str(export_from_state(load_params(args.params), args.output, args.steps))}
    report = pretrain_sam(load_params(args.params), args.steps, args.output, evaluate=not args.no_eval)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
