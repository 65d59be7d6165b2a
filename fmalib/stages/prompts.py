"""The prompt stage (docs/method.md §2–3, "Training settings"): SGD on the contexts of a frozen CLIP.

``train_prompts(params, "cls")`` fits the classification prompts with the multi-label contrastive loss;
``train_prompts(params, "seg", seeds_dir=...)`` fits the segmentation prompts with the CAM activation loss on
pixel seeds (``<seeds_dir>/<image id>.png``, palette or grayscale, 255 = ignore).

SGD with momentum, constant warm-up lr then cosine to 0, AMP only on CUDA; batches and augmentation from
``fmalib.stages.prompt_data``; with ``sub_batches`` > 1 each batch is split into that many sub-batches, each
loss averaged over its own sub-batch and divided by ``sub_batches`` before its backward (the original's
gradient accumulation, ``sub_iter_num``). Output dir = workdir/prompts_<stage>/<key>: ``ckpt.pt`` (contexts +
optimizer, every ``ckpt_every`` iterations), ``context.pt`` (contexts only, when finished),
``context_at_<n>.pt`` (the contexts after iteration ``cam_iter`` = n, when that is set below the last: the
CAM stage reads these, as the original's COCO CAMs come from an early checkpoint), ``loss.csv`` (per iteration:
loss, lr, seconds and the mean cosine between foreground prompts, ``fmalib.method.prompts.fg_similarity``);
the run's key and its context files: ``fmalib.stages.prompt_runs``. ``classification_map`` scores trained or
hand prompts as a multi-label classifier over a split.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.cache import atomic_torch_save, atomic_write_text
from ..core.device import get_device
from ..data import open_dataset
from ..method.metrics import average_precision, multi_hot
from ..method.objectives import cls_batch_loss, seg_batch_loss
from ..method.prompts import PromptSet, fg_similarity
from ..models import clip as C
from ..models.checkpoints import load_clip_from_params
from .prompt_data import TrainSet, batch_indices
from .prompt_runs import build_prompts, cam_context, load_context, save_context, train_cache

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ schedule

def lr_at(it: int, iters: int, lr: float, warmup_iters: int, warmup_lr: float) -> float:
    """Constant ``warmup_lr`` for the first ``warmup_iters`` iterations, then cosine from ``lr`` to 0."""
    if it < warmup_iters:
        return float(warmup_lr)
    span = max(1, iters - warmup_iters)
    return 0.5 * float(lr) * (1.0 + math.cos(math.pi * (it - warmup_iters) / span))


def sub_batches(n: int, parts: int) -> list[slice]:
    """The batch's ``parts`` consecutive, equal sub-batches (``params`` checks that ``parts`` divides it)."""
    size = n // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


# ------------------------------------------------------------------------------------------------ the loop

@dataclass
class TrainResult:
    kind: str
    out_dir: Path
    context_path: Path
    csv_path: Path
    cam_context_path: Path  # the contexts the CAM stage reads: context_at_<cam_iter>.pt or context.pt
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


def train_prompts(params, kind: str = "cls", seeds_dir: str | Path | None = None, model=None,
                  progress: bool = True, stop_after: int | None = None, force: bool = False) -> TrainResult:
    """Train the ``kind`` prompts; returns the run's losses and paths (cached: a finished run is loaded).

    Resumes from ``ckpt.pt`` when one is there. ``stop_after`` ends the run early after that many
    iterations (a checkpoint is written) — used to test resuming. ``force`` trains from scratch, replacing
    a finished or interrupted run of the same key. A second process training the same prompts waits for the
    first and reads its result.
    """
    cache = train_cache(params, kind, seeds_dir)
    with cache.exclusive("context", ".pt"):
        return _train(params, kind, cache, seeds_dir, model, progress, stop_after, force)


def _train(params, kind, cache, seeds_dir, model, progress, stop_after, force) -> TrainResult:
    out = cache.dir
    iters = int(params["prompts"][kind]["iters"])
    res = TrainResult(kind, out, out / "context.pt", out / "loss.csv", cam_context(out, params, kind))
    cam_iter = params["prompts"][kind]["cam_iter"]
    if force:
        for path in (res.context_path, out / "ckpt.pt"):
            path.unlink(missing_ok=True)
    if res.context_path.is_file() and res.csv_path.is_file():
        _read_csv(res.csv_path, res)
        log.info("%s prompts: %s", kind, cache.status(0, iters))
        return res

    pr, schedule = params["prompts"], params["prompts"][kind]
    device = get_device(params["device"])
    use_amp = bool(pr["amp"]) and device.type == "cuda"
    model = model if model is not None else load_clip_from_params(params)
    prompts = build_prompts(kind, model, params).to(device)
    opt = torch.optim.SGD(prompts.parameters(), lr=float(schedule["lr"]), momentum=float(pr["momentum"]),
                          weight_decay=float(schedule["weight_decay"]))
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

    ds = open_dataset(params, params["data"]["train_split"])
    seeds_path = Path(seeds_dir) if kind == "seg" else None
    mean, std = C.image_normalization(model)
    data = TrainSet(ds, pr, int(params["seed"]), len(ds.class_names), seeds_path, mean, std)
    batch = int(pr["batch_size"])
    end = iters if stop_after is None else min(iters, start + int(stop_after))
    keys = [[(it, s, i) for s, i in enumerate(batch_indices(len(ds), batch, it, int(params["seed"])))]
            for it in range(start, end)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=keys, num_workers=int(pr["num_workers"]))

    def save_ckpt(it_done: int) -> None:
        atomic_torch_save(ckpt, {"state": prompts.context_state(), "optimizer": opt.state_dict(),
                                 "scaler": scaler.state_dict() if use_amp else {}, "iter": it_done,
                                 **{attr: getattr(res, attr) for attr in CSV_FIELDS}})
        _write_csv(res.csv_path, res)

    log.info("%s prompts: %s; iterations %d..%d, batch %d, %s%s", kind, cache.status(iters - start, iters, force),
             start, end, batch, device, " + AMP" if use_amp else "")
    prompts.train()
    bar = tqdm(loader, total=len(keys), desc=f"{kind} prompts", disable=not progress, initial=0)
    it = start
    t0 = time.perf_counter()
    for images, present, seeds in bar:
        lr = lr_at(it, iters, schedule["lr"], schedule["warmup_iters"], schedule["warmup_lr"])
        for g in opt.param_groups:
            g["lr"] = lr
        images, present, seeds = images.to(device), present.to(device), seeds.to(device)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for part in sub_batches(len(images), int(schedule["sub_batches"])):
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                if kind == "cls":
                    part_loss = cls_batch_loss(model, prompts, images[part], present[part], schedule["loss"])
                else:
                    part_loss = seg_batch_loss(model, prompts, images[part], present[part], seeds[part],
                                               params["cam"]["target"], params["cam"]["target_layer"],
                                               schedule["pairs"])
            part_loss = part_loss / int(schedule["sub_batches"])
            if part_loss.requires_grad:  # a sub-batch without a (image, class) pair gives a constant 0
                scaler.scale(part_loss).backward()
            loss = loss + part_loss.detach()
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
        if it == cam_iter and it < iters:  # saved before the checkpoint at this iteration: a resume has it
            save_context(prompts, res.cam_context_path, kind=kind, iters=it)
        if it % int(pr["ckpt_every"]) == 0 or it == end:
            save_ckpt(it)
    if it >= iters:
        save_context(prompts, res.context_path, kind=kind, iters=iters)
        _write_csv(res.csv_path, res)
        log.info("%s prompts trained: %s (loss %.4f -> %.4f, %.2f it/s)", kind, res.context_path,
                 res.losses[0], res.losses[-1], res.iters_per_s)
    return res


SCORE_BATCH = 32  # images per forward in classification_map


@torch.no_grad()
def classification_map(model, prompts: PromptSet, dataset, limit: int | None = None, progress: bool = True) -> dict:
    """Multi-label classification AP over a split (docs/method.md §1 image embedding), two scorings per class k:

    - ``map``: S_k = cos(image, fg prompt k), the zero-shot score;
    - ``map_vs_bg``: S_k − log Σ_{bg j} e^{S_j} (S scaled by the logit scale), the log-odds of class k against
      the background prompts — the quantity the contrastive loss trains, free of the image-wide offset that
      raw cosines share.

    {"map", "map_vs_bg": means over classes with a positive, "ap", "ap_vs_bg": {class name: AP}, "n_images"}.
    """
    text = prompts()
    scale = C.logit_scale(model).float()
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    scores, labels, pending = [None] * n, [None] * n, {}

    def score(batch: list) -> None:  # images of one input size in one forward (per-op overhead dominates)
        x = torch.cat([inp for _, inp in batch])
        emb = F.normalize(C.encode_image_tokens(model, x).image_embed.float(), dim=-1)
        for (j, _), row in zip(batch, (emb @ text.T).cpu()):
            scores[j] = row

    for j in tqdm(range(n), desc="classification AP", disable=not progress, leave=False):
        item = dataset[j]
        labels[j] = item["labels"]
        inp = C.to_input(model, item["image"])
        group = pending.setdefault(tuple(inp.shape), [])
        group.append((j, inp))
        if len(group) == SCORE_BATCH:
            score(pending.pop(tuple(inp.shape)))
    for group in pending.values():
        score(group)
    cos = torch.stack(scores)
    fg = cos[:, : prompts.n_fg]
    vs_bg = scale * fg - torch.logsumexp(scale * cos[:, prompts.n_fg:], 1, keepdim=True) if prompts.n_bg else fg
    y = multi_hot(labels, prompts.n_fg)
    names = list(getattr(dataset, "class_names", range(1, prompts.n_fg + 1)))
    out = {"n_images": n}
    for key, sc in (("", fg), ("_vs_bg", vs_bg)):
        ap = [average_precision(sc[:, k].numpy(), y[:, k]) for k in range(prompts.n_fg)]
        out[f"map{key}"], out[f"ap{key}"] = float(np.nanmean(ap)), dict(zip(names, ap))
    return out
