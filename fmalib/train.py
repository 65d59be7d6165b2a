"""Prompt training (METHOD §2–3, "Training settings"): SGD on the contexts of a frozen CLIP.

``train_prompts(params, "cls")`` fits the classification prompts with the multi-label contrastive loss;
``train_prompts(params, "seg", seeds_dir=...)`` fits the segmentation prompts with the CAM activation loss on
pixel seeds (``<seeds_dir>/<image id>.png``, palette or grayscale, 255 = ignore).

SGD with momentum, constant warm-up lr then cosine to 0, AMP only on CUDA. Augmentation scaled to the
crop: colour jitter, rescale so the long side falls in ``long_side`` (short side ≥ crop, bicubic), random
crop, horizontal flip; seeds follow the geometry (nearest). Each iteration's batch and augmentation come
from RNGs seeded by (seed, iteration), so a run resumed from its checkpoint gives the same bytes as an
uninterrupted one. Output dir = workdir/prompts_<stage>/<key>: ``ckpt.pt`` (contexts + optimizer, every
``ckpt_every`` iterations), ``context.pt`` (contexts only, when finished), ``loss.csv`` (per iteration: loss,
lr, seconds and the mean cosine between foreground prompts, ``fmalib.prompts.fg_similarity``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from tqdm.auto import tqdm

from .cache import StageCache, atomic_path, atomic_write_text
from .errors import FmalibError
from .losses import CLS_LOSSES, bg_negatives_contrastive_loss, cam_activation_loss_pairs, multilabel_contrastive_loss
from .models import clip as C
from .prompts import PromptSet, build_prompts, fg_similarity, load_context, save_context
from .utils import get_device

log = logging.getLogger(__name__)

STAGES = ("cls", "seg")
IGNORE = 255


# ------------------------------------------------------------------------------------------------ identity

def file_fingerprint(path: str | Path | None) -> dict | None:
    """Content hash for files up to 256 MB (tiny CLIP, contexts); size + mtime for bigger ones."""
    if path is None:
        return None
    path = Path(path)
    st = path.stat()
    if st.st_size <= 256 * 2**20:
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _clip_checkpoint(params) -> Path | None:
    """The CLIP checkpoint of ``params.clip``; None = random init (allowed for the tiny CLIP only)."""
    if not params["clip"]["checkpoint"]:
        return None
    path = params.resolve_path("clip.checkpoint")
    if path.is_file():
        return path
    if params["clip"]["model"] == C.TINY_CLIP:
        return None
    raise FmalibError(f"params clip.checkpoint: {path} does not exist ({params['clip']['model']} needs its "
                      f"weights, an open_clip state dict)")


def clip_key(params) -> dict:
    """What identifies the CLIP of ``params.clip`` in cache keys."""
    ckpt = _clip_checkpoint(params)
    ident = {"model": params["clip"]["model"]}
    if ckpt is None:
        ident["random_init_seed"] = int(params["seed"])
    else:
        ident.update(file_fingerprint(ckpt))
    return ident


def load_clip_from_params(params, device: str | None = None):
    """The frozen CLIP of ``params.clip`` (the tiny one randomly initialised, with a warning, while its
    checkpoint is not there)."""
    device = get_device(device or params["device"])
    ckpt = _clip_checkpoint(params)
    if ckpt is None:
        log.warning("CLIP checkpoint %s not found: using a randomly initialised %s (seed %d)",
                    params["clip"]["checkpoint"], params["clip"]["model"], int(params["seed"]))
        torch.manual_seed(int(params["seed"]))
    return C.load_clip(params["clip"]["model"], ckpt, device)


def _dir_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.glob("*.png")):
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def train_cache(params, stage: str, seeds_dir: str | Path | None = None) -> StageCache:
    """Output dir of a training run: keyed by everything that changes its result."""
    if stage not in STAGES:
        raise FmalibError(f"prompt stage {stage!r}; expected one of {STAGES}")
    pr = params["prompts"]
    common = {k: v for k, v in pr.items() if k not in STAGES + ("ckpt_every", "num_workers")}
    seeds = None
    if stage == "seg":
        if seeds_dir is None:
            raise FmalibError("train_prompts(stage='seg') needs seeds_dir: a folder of <image id>.png seed maps")
        seeds_dir = Path(seeds_dir)
        if not seeds_dir.is_dir():
            raise FmalibError(f"seeds_dir {seeds_dir} does not exist (expected <image id>.png seed label maps)")
        seeds = _dir_fingerprint(seeds_dir)
    key = {"stage": stage, "prompts": common, "stage_cfg": pr[stage], "classes": params["classes"],
           "clip": clip_key(params), "data": params["data"], "seed": int(params["seed"]), "seeds": seeds,
           "device": get_device(params["device"]).type}
    if stage == "seg":  # the seg loss differentiates Grad-CAMs of this target
        key["cam_target"] = params["cam"]["target"]
        key["cam_target_layer"] = params["cam"]["target_layer"]
    return StageCache(params.resolve_path("workdir"), f"prompts_{stage}", key)


def trained_context_path(params, stage: str, seeds_dir: str | Path | None = None) -> Path:
    """context.pt of the finished ``train_prompts(params, stage, seeds_dir)`` run; an error if not trained."""
    path = train_cache(params, stage, seeds_dir).dir / "context.pt"
    if not path.is_file():
        raise FmalibError(f"no trained {stage} prompts at {path}: run fmalib.train.train_prompts(params, "
                          f"{stage!r}{', seeds_dir=...' if stage == 'seg' else ''}) first")
    return path


# ------------------------------------------------------------------------------------------------ schedule

def lr_at(it: int, iters: int, lr: float, warmup_iters: int, warmup_lr: float) -> float:
    """Constant ``warmup_lr`` for the first ``warmup_iters`` iterations, then cosine from ``lr`` to 0."""
    if it < warmup_iters:
        return float(warmup_lr)
    span = max(1, iters - warmup_iters)
    return 0.5 * float(lr) * (1.0 + math.cos(math.pi * (it - warmup_iters) / span))


def batch_indices(n: int, batch: int, it: int, seed: int) -> list[int]:
    """Dataset indices of iteration ``it``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    if n == 0:
        raise FmalibError("prompt training: the training split is empty")
    out, pos = [], it * batch
    while len(out) < batch:
        epoch, off = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch - len(out), n - off)
        out.extend(perm[off:off + take].tolist())
        pos += take
    return out


# ------------------------------------------------------------------------------------------------ augmentation

def color_jitter(x: torch.Tensor, rng: np.random.Generator, strength: Sequence[float]) -> torch.Tensor:
    """torchvision ColorJitter semantics (brightness, contrast, saturation, hue; random order) with ``rng``."""
    b, c, s, h = (float(v) for v in strength)
    ops = []
    if b > 0:
        f = rng.uniform(max(0.0, 1 - b), 1 + b)
        ops.append(lambda t, f=f: TF.adjust_brightness(t, f))
    if c > 0:
        f = rng.uniform(max(0.0, 1 - c), 1 + c)
        ops.append(lambda t, f=f: TF.adjust_contrast(t, f))
    if s > 0:
        f = rng.uniform(max(0.0, 1 - s), 1 + s)
        ops.append(lambda t, f=f: TF.adjust_saturation(t, f))
    if h > 0:
        f = rng.uniform(-h, h)
        ops.append(lambda t, f=f: TF.adjust_hue(t, f))
    for k in rng.permutation(len(ops)):
        x = ops[k](x)
    return x


def augment(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator,
            cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (H, W, 3) [+ uint8 (H, W) seeds] -> float (3, S, S) in [0, 1] [+ long (S, S)], S = cfg.crop_size.

    Colour jitter; rescale (bicubic) so the long side is uniform in cfg.long_side and the short side ≥ S;
    random S×S crop (padding with 0 / ignore if ever needed); horizontal flip with p = 0.5 if cfg.flip.
    """
    crop = int(cfg["crop_size"])
    lo, hi = (int(v) for v in cfg["long_side"])
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    x = color_jitter(x, rng, cfg["color_jitter"]).clamp(0, 1)
    h, w = image.shape[:2]
    scale = max(rng.integers(lo, hi + 1) / max(h, w), crop / min(h, w))
    nh, nw = max(crop, int(round(h * scale))), max(crop, int(round(w * scale)))
    x = TF.resize(x, [nh, nw], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    y = None
    if label is not None:
        if label.shape != (h, w):
            raise FmalibError(f"seed map is {label.shape}, its image {(h, w)}; expected equal sizes")
        y = TF.resize(torch.from_numpy(np.ascontiguousarray(label))[None], [nh, nw],
                      interpolation=InterpolationMode.NEAREST)[0].long()
    top, left = int(rng.integers(0, nh - crop + 1)), int(rng.integers(0, nw - crop + 1))
    x = x[:, top:top + crop, left:left + crop]
    y = y[top:top + crop, left:left + crop] if y is not None else None
    if cfg["flip"] and rng.random() < 0.5:
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    return x, y


class _TrainSet(torch.utils.data.Dataset):
    """Items keyed by (iteration, slot, dataset index) so augmentation is seeded per item."""

    def __init__(self, dataset, cfg, seed: int, num_classes: int, seeds_dir: Path | None, mean, std):
        self.ds, self.cfg, self.seed, self.C, self.seeds_dir = dataset, cfg, seed, num_classes, seeds_dir
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        from .data.labels import read_label_png

        it, slot, idx = key
        item = self.ds[idx]
        seed_map = None
        if self.seeds_dir is not None:
            path = self.seeds_dir / f"{item['id']}.png"
            if not path.is_file():
                raise FmalibError(f"seed map {path} missing for training image {item['id']!r}")
            seed_map = read_label_png(path)
        x, y = augment(item["image"], seed_map, np.random.default_rng([self.seed, it, slot]), self.cfg)
        present = torch.zeros(self.C, dtype=torch.bool)
        present[torch.as_tensor(np.asarray(item["labels"], np.int64) - 1)] = True
        return (x - self.mean) / self.std, present, (y if y is not None else torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ losses per batch

def cls_batch_loss(model, prompts: PromptSet, images: torch.Tensor, present: torch.Tensor,
                   loss: str = "absent_fg") -> torch.Tensor:
    """Multi-label contrastive loss of a batch (image tower without grad: CLIP is frozen).

    ``loss``: ``absent_fg`` — fg logits only, negatives the absent classes (METHOD §3, the original's);
    ``bg_negatives`` — the background prompts as negatives (ablation)."""
    if loss not in CLS_LOSSES:
        raise FmalibError(f"params prompts.cls.loss={loss!r}; expected one of {CLS_LOSSES}")
    with torch.no_grad():
        emb = F.normalize(C.encode_image_tokens(model, images).image_embed.float(), dim=-1)
    logits = C.logit_scale(model).float() * emb @ prompts().T
    n = prompts.n_fg
    if loss == "absent_fg":
        return multilabel_contrastive_loss(logits[:, :n], present)
    return bg_negatives_contrastive_loss(logits[:, :n], logits[:, n:], present)


SEG_PAIRS = ("crop", "image")


def seg_pairs(present: torch.Tensor, seeds: torch.Tensor, pairs: str = "crop") -> torch.Tensor:
    """(B, C) bool: the (image, class) pairs of the CAM loss and the classes in its Grad-CAM softmax.

    ``crop``: the classes present in the augmented, cropped seed map (VOC; a class cropped out of view gives
    no pair); ``image``: the image-level labels (the original's COCO setting)."""
    if pairs not in SEG_PAIRS:
        raise FmalibError(f"params prompts.seg.pairs={pairs!r}; expected one of {SEG_PAIRS}")
    if pairs == "image":
        return present.bool()
    ids = torch.arange(1, present.shape[1] + 1, device=seeds.device)
    return (seeds.reshape(len(seeds), -1, 1) == ids).any(dim=1)


def seg_batch_loss(model, prompts: PromptSet, images: torch.Tensor, present: torch.Tensor, seeds: torch.Tensor,
                   target: str = "prob", target_layer: str = "ln1_out", pairs: str = "crop") -> torch.Tensor:
    """CAM activation loss of a batch: raw Grad-CAMs of the pairs' classes, differentiable in the contexts."""
    from .cam import gradcam

    with torch.no_grad():
        out = C.encode_image_tokens(model, images)
    text = prompts()
    chosen = seg_pairs(present, seeds, pairs)
    b, c = chosen.nonzero(as_tuple=True)
    allowed = torch.cat([chosen, torch.ones(len(chosen), prompts.n_bg, dtype=torch.bool, device=chosen.device)], 1)
    cams = gradcam(model, out.block_input, out.grid, text, b, c, allowed, target, create_graph=True,
                   target_layer=target_layer)
    return cam_activation_loss_pairs(cams, seeds, b, c + 1)


# ------------------------------------------------------------------------------------------------ the loop

@dataclass
class TrainResult:
    stage: str
    out_dir: Path
    context_path: Path
    csv_path: Path
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    seconds: list = field(default_factory=list)  # wall time of each iteration
    fg_similarity: list = field(default_factory=list)  # mean cosine between fg prompts after each iteration

    @property
    def iters_per_s(self) -> float:
        """Training speed, the first iteration (warm-up of kernels and caches) left out."""
        t = self.seconds[1:] or self.seconds
        return float(len(t) / sum(t)) if t and sum(t) > 0 else float("nan")


CSV_COLUMNS = {"loss": "losses", "lr": "lrs", "seconds": "seconds", "fg_similarity": "fg_similarity"}  # column: field
CSV_FIELDS = tuple(CSV_COLUMNS.values())


def _write_csv(path: Path, res: "TrainResult") -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["iter", *CSV_COLUMNS])
    for i, row in enumerate(zip(*(getattr(res, f) for f in CSV_FIELDS))):
        w.writerow([i] + [f"{v:.6f}" if col == "seconds" else repr(float(v)) for col, v in zip(CSV_COLUMNS, row)])
    atomic_write_text(path, buf.getvalue())


def _read_csv(path: Path, res: "TrainResult") -> None:
    rows = list(csv.DictReader(path.read_text().splitlines()))
    for col, attr in CSV_COLUMNS.items():
        setattr(res, attr, [float(r.get(col) or "nan") for r in rows])  # runs logged before a column: NaN


def train_prompts(params, stage: str = "cls", seeds_dir: str | Path | None = None, model=None,
                  progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Train the ``stage`` prompts; returns the run's losses and paths (cached: a finished run is loaded).

    Resumes from ``ckpt.pt`` when one is there. ``stop_after`` ends the run early after that many
    iterations (a checkpoint is written) — used to test resuming.
    """
    from .data import open_dataset

    cache = train_cache(params, stage, seeds_dir)
    out = cache.dir
    res = TrainResult(stage, out, out / "context.pt", out / "loss.csv")
    if res.context_path.is_file() and res.csv_path.is_file():
        _read_csv(res.csv_path, res)
        log.info("%s prompts already trained: %s", stage, res.context_path)
        return res

    pr, cfg = params["prompts"], params["prompts"][stage]
    device = get_device(params["device"])
    use_amp = bool(pr["amp"]) and device.type == "cuda"
    model = model if model is not None else load_clip_from_params(params)
    prompts = build_prompts(stage, model, params).to(device)
    opt = torch.optim.SGD(prompts.parameters(), lr=float(cfg["lr"]), momentum=float(pr["momentum"]),
                          weight_decay=float(cfg["weight_decay"]))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start = 0
    ckpt = out / "ckpt.pt"
    if ckpt.is_file():
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        load_context(prompts, ckpt)
        opt.load_state_dict(blob["optimizer"])
        if use_amp and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        start = int(blob["iter"])
        for attr in CSV_FIELDS:
            setattr(res, attr, list(blob.get(attr, [float("nan")] * start)))
        log.info("resuming %s prompt training at iteration %d from %s", stage, start, ckpt)

    ds = open_dataset(params, params["data"]["train_split"])
    seeds_path = Path(seeds_dir) if stage == "seg" else None
    mean, std = C.image_normalization(model)
    data = _TrainSet(ds, pr, int(params["seed"]), len(ds.class_names), seeds_path, mean, std)
    iters, batch = int(cfg["iters"]), int(pr["batch_size"])
    end = iters if stop_after is None else min(iters, start + int(stop_after))
    keys = [[(it, s, i) for s, i in enumerate(batch_indices(len(ds), batch, it, int(params["seed"])))]
            for it in range(start, end)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=keys, num_workers=int(pr["num_workers"]))

    def save_ckpt(it_done: int) -> None:
        with atomic_path(ckpt) as tmp:
            torch.save({"state": prompts.context_state(), "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict() if use_amp else {}, "iter": it_done,
                        **{attr: getattr(res, attr) for attr in CSV_FIELDS}}, tmp)
        _write_csv(res.csv_path, res)

    log.info("training %s prompts: iterations %d..%d of %d, batch %d, %s%s -> %s", stage, start, end, iters,
             batch, device, " + AMP" if use_amp else "", out)
    prompts.train()
    bar = tqdm(loader, total=len(keys), desc=f"{stage} prompts", disable=not progress, initial=0)
    it = start
    t0 = time.perf_counter()
    for images, present, seeds in bar:
        lr = lr_at(it, iters, cfg["lr"], cfg["warmup_iters"], cfg["warmup_lr"])
        for g in opt.param_groups:
            g["lr"] = lr
        images, present, seeds = images.to(device), present.to(device), seeds.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            if stage == "cls":
                loss = cls_batch_loss(model, prompts, images, present, cfg["loss"])
            else:
                loss = seg_batch_loss(model, prompts, images, present, seeds, params["cam"]["target"],
                                      params["cam"]["target_layer"], cfg["pairs"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            res.fg_similarity.append(fg_similarity(prompts(), prompts.n_fg))
        t1 = time.perf_counter()
        res.losses.append(float(loss.detach()))
        res.lrs.append(lr)
        res.seconds.append(t1 - t0)
        t0 = t1
        bar.set_postfix(loss=f"{res.losses[-1]:.4f}")
        it += 1
        if it % int(pr["ckpt_every"]) == 0 or it == end:
            save_ckpt(it)
    if it >= iters:
        save_context(prompts, res.context_path, stage=stage, iters=iters)
        _write_csv(res.csv_path, res)
        log.info("%s prompts trained: %s (loss %.4f -> %.4f, %.2f it/s)", stage, res.context_path,
                 res.losses[0], res.losses[-1], res.iters_per_s)
    return res


def seg_training_seeds(params, source: str = "auto") -> tuple[Path, str]:
    """(seeds dir, description) of the pixel seeds that train the seg prompts (from the cls-prompt CAMs).

    ``sams``: the method's coarse SAMS seeds (``fmalib.seeds.pipeline_seeds(params, "coarse")``: SAM masks +
    CAMs, GT-free). ``cam_argmax``: CLIP-ES's argmax(bg threshold, CAMs) seeds with the threshold picked on
    the train split's ground truth (``fmalib.seeds.cam_argmax_seed_dir``) — a stand-in, labelled as such.
    ``auto``: SAMS when its stage imports (segment_anything, fmalib.masks), else CAM argmax.
    """
    if source not in ("auto", "sams", "cam_argmax"):
        raise FmalibError(f"seg seeds source {source!r}; expected auto, sams or cam_argmax")
    if source in ("auto", "sams"):
        try:
            from .seeds import pipeline_seeds
        except ImportError as exc:
            if source == "sams":
                raise FmalibError(f"SAMS seeds need fmalib.seeds / fmalib.masks: {exc}") from exc
            log.warning("SAMS seeds unavailable (%s): training the seg prompts on CAM-argmax seeds", exc)
        else:
            seeds = pipeline_seeds(params, "coarse")
            return Path(seeds.dir), f"SAMS coarse seeds (bg power p = {seeds.bg_power:.3g})"
    from .cam import run_cam_stage
    from .seeds import cam_argmax_seed_dir

    split = params["data"]["train_split"]
    cams = run_cam_stage(params, split, "cls")
    out, t, _ = cam_argmax_seed_dir(params, split, cams)
    return Path(out), f"CAM-argmax seeds of the cls CAMs (bg threshold {t:.2f}, picked on train GT)"
