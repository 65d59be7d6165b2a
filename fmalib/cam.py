"""Grad-CAM on CLIP with class-aware attention refinement (METHOD §4, CLIP-ES), its per-image cache, and
CAM-argmax seeds.

- ``gradcam``: the target activation is the output of the last vision block's ``ln_1`` (``cam.target_layer:
  ln1_out``, the original's) or the tokens entering that block (``block_input``). Only that block and the
  head (ln_post, proj, patch mean) are replayed, once per (image, class) pair in one batch, so one backward
  gives every pair's gradients; channel weights = gradients averaged over the patch tokens. Raw (no ReLU):
  the seg-prompt loss needs the sign; inference applies ReLU.
- ``caa_affinity`` / ``caa_refine``: mean patch attention of the last k blocks → Sinkhorn → (A+Aᵀ)/2 → A·A;
  each class's CAM is propagated from inside the bounding boxes of its regions above a threshold.
- ``image_cams``: single-scale CAMs of one image (sides rounded to the patch size), min-max normalised.
- ``run_cam_stage``: every image of a split → a compressed float16 npz per image (``StageCache``):
  ``labels`` (K,) fg ids, ``cam`` and ``cam_caa`` (K, h, w) on the patch grid, K = present classes.
- ``cam_argmax_seeds`` / ``bg_threshold_sweep``: CLIP-ES's seed rule argmax(bg threshold, CAMs) and its
  evaluation over a split.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from scipy import ndimage
from tqdm.auto import tqdm

from .cache import StageCache
from .errors import FmalibError
from .metrics import confusion_matrix, mean_iou
from .models import clip as C
from .pretrain.clip_quality import to_input
from .sams import upsample_cams

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ Grad-CAM

def gradcam(model, block_input: torch.Tensor, grid: tuple[int, int], text: torch.Tensor, pair_image: torch.Tensor,
            pair_class: torch.Tensor, allowed: torch.Tensor | None = None, target: str = "prob",
            create_graph: bool = False, target_layer: str = "ln1_out") -> torch.Tensor:
    """Raw Grad-CAMs (P, h, w), one per (image, class) pair.

    block_input (B, 1+h*w, W) tokens entering the last block (its graph, if any, is cut: CLIP is frozen);
    text (K, D) L2-normalised prompt features; pair_class indexes rows of ``text``; allowed (B, K) bool: the
    prompts in image b's softmax (present fg classes + bg prompts; all when None). target "prob" backprops
    the softmax probability, "score" the scaled cosine. ``target_layer`` is the activation A whose gradients
    weight its channels: ``ln1_out`` — the output of the last block's ``ln_1`` (the original's, as CLIP-ES) —
    or ``block_input``, the residual tokens entering that block. CAM = Σ_ch mean_tokens(∂y/∂A) · A over the
    patch tokens. A is detached, so with ``create_graph`` (seg-prompt training) the CAMs are differentiable
    w.r.t. ``text`` through the Grad-CAM weights only (double backward).
    """
    if target not in ("prob", "score"):
        raise FmalibError(f"params cam.target={target!r}; expected 'prob' or 'score'")
    if target_layer not in C.GRADCAM_TARGETS:
        raise FmalibError(f"params cam.target_layer={target_layer!r}; expected one of {C.GRADCAM_TARGETS}")
    pair_image, pair_class = pair_image.long(), pair_class.long()
    h, w = grid
    # double backward (create_graph) needs the composite attention: fused SDPA kernels have no 2nd derivative
    attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), attention:
        x = block_input.detach()[pair_image]
        if target_layer == "ln1_out":
            act = model.visual.transformer.resblocks[-1].ln_1(x).detach().requires_grad_(True)
            emb = C.last_block_embed(model, x, ln1_out=act)
        else:
            act = x.requires_grad_(True)
            emb = C.last_block_embed(model, act)
        emb = F.normalize(emb.float(), dim=-1)
        logits = C.logit_scale(model).float() * emb @ text.float().T
        if target == "prob":
            if allowed is not None:
                logits = logits.masked_fill(~allowed.bool()[pair_image], float("-inf"))
            logits = logits.softmax(dim=-1)
        score = logits.gather(1, pair_class[:, None]).sum()  # pairs are independent rows: one backward
        (grad,) = torch.autograd.grad(score, act, create_graph=create_graph)
    weights = grad[:, 1:].float().mean(dim=1)  # (P, W)
    cam = torch.einsum("pnc,pc->pn", act.detach()[:, 1:].float(), weights)
    return cam.reshape(-1, h, w)


def normalize_cams(cams: torch.Tensor | np.ndarray):
    """Per-map min-max to [0, 1] (CLIP-ES's scale_cam_image, without its absolute eps, so raw CAMs of any
    scale reach exactly 1); a flat map becomes 0."""
    flat = cams.reshape(cams.shape[0], -1)
    if isinstance(cams, torch.Tensor):
        lo, hi = flat.min(1)[0], flat.max(1)[0]
        rng = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    else:
        lo, hi = flat.min(1), flat.max(1)
        rng = np.where(hi > lo, hi - lo, 1)
    shape = (-1,) + (1,) * (cams.ndim - 1)
    return (cams - lo.reshape(shape)) / rng.reshape(shape)


# ------------------------------------------------------------------------------------------------ CAA

def sinkhorn(a: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Alternate column then row normalisation ``n_iters`` times (rows sum to 1 exactly afterwards)."""
    for _ in range(int(n_iters)):
        a = a / a.sum(dim=0, keepdim=True).clamp_min(1e-12)
        a = a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return a


def caa_affinity(attn: Sequence[torch.Tensor], n_iters: int) -> torch.Tensor:
    """Last blocks' attention maps, each (1+hw, 1+hw) (or (1, …)), -> the (hw, hw) CAA transition matrix."""
    if not len(attn):
        raise FmalibError("CAA needs at least one attention map (params cam.caa_last_k ≥ 1)")
    a = torch.stack([t.reshape(t.shape[-2:]) for t in attn]).float().mean(dim=0)[1:, 1:]
    a = sinkhorn(a, n_iters)
    a = (a + a.T) / 2
    return a @ a


def box_mask(cam: np.ndarray, threshold: float) -> np.ndarray:
    """Union of the bounding boxes of the 8-connected regions where cam > threshold · max(cam)."""
    fg = cam > threshold * cam.max()
    out = np.zeros(cam.shape, bool)
    if cam.max() <= 0:
        return out
    lab, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    for sl in ndimage.find_objects(lab):
        if sl is not None:
            out[sl] = True
    return out


CAA_SOURCES = ("normalized", "raw")


def caa_refine(cams: torch.Tensor, affinity: torch.Tensor, threshold: float,
               source: torch.Tensor | None = None) -> torch.Tensor:
    """(K, h, w) normalised CAMs -> refined CAMs: affinity @ (CAM restricted to its boxes), then ReLU and
    min-max.

    The boxes always come from the normalised ``cams``; the map propagated is ``source`` when given (the
    original propagates the raw Grad-CAM for seg prompts) and the normalised CAMs otherwise (cls prompts).
    """
    k, h, w = cams.shape
    masks = torch.from_numpy(np.stack([box_mask(c, threshold) for c in cams.detach().cpu().numpy()])
                             if k else np.zeros((0, h, w), bool)).to(cams.device)
    src = ((cams if source is None else source) * masks).reshape(k, h * w).float()
    refined = (src @ affinity.T).reshape(k, h, w)
    return normalize_cams(refined.clamp(min=0)) if k else refined


# ------------------------------------------------------------------------------------------------ inference

def image_cams(model, text: torch.Tensor, n_fg: int, image: np.ndarray, labels: Sequence[int], cfg,
               threshold: float, caa_source: str = "normalized") -> dict[str, np.ndarray]:
    """CAMs of one uint8 image for its present fg ids ``labels`` (1..C) at single scale.

    text (n_fg + n_bg, D): fg prompts then bg prompts. cfg: params.cam (target, target_layer, caa_last_k,
    sinkhorn_iters). ``caa_source``: the map CAA propagates — ``normalized`` (ReLU + min-max) or ``raw``.
    Returns float32 ``cam`` (ReLU, min-max) and ``cam_caa`` (refined), both (K, h, w), and ``labels``.
    """
    if caa_source not in CAA_SOURCES:
        raise FmalibError(f"params cam.caa_source={caa_source!r}; expected one of {CAA_SOURCES}")
    labels = np.asarray(labels, np.int64)
    x = to_input(model, image)
    n_blocks = len(model.visual.transformer.resblocks)
    k_attn = min(int(cfg["caa_last_k"]), n_blocks)
    with torch.no_grad():
        out = C.encode_image_tokens(model, x, attn_last_k=k_attn)
    h, w = out.grid
    if not len(labels):
        empty = np.zeros((0, h, w), np.float32)
        return {"labels": labels, "cam": empty, "cam_caa": empty}
    allowed = torch.ones(1, text.shape[0], dtype=torch.bool, device=text.device)
    allowed[0, :n_fg] = False
    allowed[0, torch.as_tensor(labels - 1, device=text.device)] = True
    idx = torch.as_tensor(labels - 1, device=text.device)
    raw = gradcam(model, out.block_input, out.grid, text, torch.zeros_like(idx), idx, allowed, cfg["target"],
                  target_layer=cfg["target_layer"])
    cam = normalize_cams(raw.clamp(min=0))
    refined = caa_refine(cam, caa_affinity([a[0] for a in out.attn], cfg["sinkhorn_iters"]), threshold,
                         raw if caa_source == "raw" else None)
    return {"labels": labels, "cam": cam.cpu().numpy().astype(np.float32),
            "cam_caa": refined.cpu().numpy().astype(np.float32)}


def cam_cache(params, split: str, kind: str, ctx_path: str | Path | None = None) -> StageCache:
    """The CAM cache of ``split`` for prompts ``kind`` (hand | cls | seg) with contexts ``ctx_path``."""
    from .train import clip_key, file_fingerprint

    cam = params["cam"]  # only what changes the maps (not use_caa / bg_thresholds, which act downstream)
    cfg = {"target": cam["target"], "caa_last_k": cam["caa_last_k"], "sinkhorn_iters": cam["sinkhorn_iters"],
           "caa_threshold": cam["caa_threshold"][kind], "target_layer": cam["target_layer"],
           "caa_source": cam["caa_source"][kind]}
    key = {"split": split, "kind": kind, "cam": cfg, "classes": params["classes"], "clip": clip_key(params),
           "data": params["data"], "template": params["prompts"]["hand_template"] if kind == "hand" else None,
           "ctx": file_fingerprint(ctx_path) if ctx_path else None}
    return StageCache(params.resolve_path("workdir"), f"cam_{kind}", key)


def run_cam_stage(params, split: str, prompts: str = "cls", shard: tuple[int, int] = (0, 1),
                  ctx_path: str | Path | None = None, seeds_dir: str | Path | None = None, model=None,
                  progress: bool = True) -> StageCache:
    """CAMs of every image of ``split`` (or shard i of n: ids[i::n]) into the stage cache; resumable.

    ``prompts``: "hand" (CLIP-ES baseline) or "cls" / "seg" — trained contexts from ``ctx_path``, by default
    the finished run of ``fmalib.train.train_prompts`` with these params (and ``seeds_dir`` for seg).
    """
    from .data import open_dataset
    from .prompts import build_prompts, load_context
    from .train import load_clip_from_params, trained_context_path

    i, n = int(shard[0]), int(shard[1])
    if not (n >= 1 and 0 <= i < n):
        raise FmalibError(f"shard {shard}: expected (i, n) with 0 <= i < n")
    if prompts != "hand" and ctx_path is None:
        ctx_path = trained_context_path(params, prompts, seeds_dir)
    cache = cam_cache(params, split, prompts, ctx_path)
    ds = open_dataset(params, split)
    todo = [j for j in range(i, len(ds), n) if not cache.has(ds.ids[j])]
    if not todo:
        log.info("CAMs %s/%s shard %d/%d already cached in %s", prompts, split, i, n, cache.dir)
        return cache
    model = model if model is not None else load_clip_from_params(params)
    pset = build_prompts(prompts, model, params)
    if prompts != "hand":
        load_context(pset, ctx_path)
    with torch.no_grad():
        text = pset()
    threshold = float(params["cam"]["caa_threshold"][prompts])
    log.info("CAMs (%s prompts) of %d %s images -> %s", prompts, len(todo), split, cache.dir)
    for j in tqdm(todo, desc=f"CAMs {prompts}/{split}", disable=not progress):
        item = ds[j]
        res = image_cams(model, text, pset.n_fg, item["image"], item["labels"], params["cam"], threshold,
                         params["cam"]["caa_source"][prompts])
        cache.save_npz(item["id"], labels=res["labels"], cam=res["cam"].astype(np.float16),
                       cam_caa=res["cam_caa"].astype(np.float16))
    return cache


def load_cams(cache: StageCache, image_id: str, caa: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(cams float32 (K, h, w), labels (K,)) of one cached image."""
    z = cache.load_npz(image_id)
    return z["cam_caa" if caa else "cam"].astype(np.float32), z["labels"].astype(np.int64)


# ------------------------------------------------------------------------------------------------ seeds

def cam_argmax_seeds(cams: np.ndarray, labels: Sequence[int], bg_threshold: float,
                     size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 label map argmax over (bg_threshold, CAM_1..CAM_K) -> 0 or labels[k] (ties go to background).

    cams (K, h, w) normalised; resized bilinearly to ``size`` first when given.
    """
    cams = np.asarray(cams, np.float32)
    if size is not None:
        cams = upsample_cams(cams, size)
    labels = np.asarray(labels, np.int64)
    if cams.ndim != 3 or len(labels) != cams.shape[0]:
        raise FmalibError(f"cam_argmax_seeds: cams {cams.shape} must be (K, H, W) with K = len(labels) = {len(labels)}")
    if not len(labels):
        return np.zeros(cams.shape[1:], np.uint8)
    keys = np.concatenate([[0], labels]).astype(np.uint8)
    full = np.concatenate([np.full((1,) + cams.shape[1:], bg_threshold, np.float32), cams])
    return keys[full.argmax(axis=0)]


def bg_threshold_sweep(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], thresholds: Sequence[float],
                       num_classes: int) -> dict[float, float]:
    """{threshold: mIoU} of ``cam_argmax_seeds`` over (cams at any size, labels, gt) items; one pass."""
    ts = [float(t) for t in thresholds]
    conf = np.zeros((len(ts), num_classes, num_classes), np.int64)
    for cams, labels, gt in items:
        cams = upsample_cams(cams, gt.shape) if len(labels) else np.zeros((0,) + gt.shape, np.float32)
        top = cams.max(axis=0) if len(labels) else np.full(gt.shape, -np.inf, np.float32)
        cls = np.concatenate([[0], labels])[cams.argmax(axis=0) + 1] if len(labels) else np.zeros(gt.shape, np.int64)
        for i, t in enumerate(ts):
            conf[i] += confusion_matrix(np.where(top > t, cls, 0), gt, num_classes)
    return {t: mean_iou(c) for t, c in zip(ts, conf)}


def cached_items(cache: StageCache, dataset, caa: bool = True, limit: int | None = None):
    """(cams, labels, gt) of a split's cached CAMs, for ``bg_threshold_sweep``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for j in tqdm(range(n), desc=f"{cache.stage} eval", leave=False):
        item = dataset[j]
        cams, labels = load_cams(cache, item["id"], caa)
        yield cams, labels, item["gt"]


def select_bg_threshold(cache: StageCache, dataset, thresholds: Sequence[float],
                        caa: bool = True) -> tuple[float, dict]:
    """The bg threshold with the best seed mIoU on ``dataset`` (CLIP-ES protocol: train split, with GT)."""
    table = bg_threshold_sweep(cached_items(cache, dataset, caa), thresholds, len(dataset.class_names) + 1)
    best = max(table, key=lambda t: (np.nan_to_num(table[t], nan=-1.0), -t))
    return best, table


def write_cam_argmax_seeds(cache: StageCache, dataset, bg_threshold: float, out_dir: str | Path,
                           caa: bool = True) -> Path:
    """``<out_dir>/<id>.png`` CAM-argmax seed maps (image size) of every image of ``dataset``; skips existing."""
    from .data.labels import write_label_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in range(len(dataset)) if not (out_dir / f"{dataset.ids[j]}.png").is_file()]
    log.info("CAM-argmax seeds (bg %.2f, caa=%s) of %d images -> %s", bg_threshold, caa, len(todo), out_dir)
    for j in tqdm(todo, desc="CAM-argmax seeds"):
        item = dataset[j]
        cams, labels = load_cams(cache, item["id"], caa)
        write_label_png(out_dir / f"{item['id']}.png",
                        cam_argmax_seeds(cams, labels, bg_threshold, size=item["image"].shape[:2]))
    return out_dir


def argmax_seed_miou(params, kind: str, seeds_dir: str | Path | None = None, model=None,
                     ctx_path: str | Path | None = None) -> dict:
    """CAM-argmax seed mIoU of ``kind`` CAMs (hand | cls | seg), without and with CAA (CLIP-ES protocol):
    the bg threshold is picked on the train split with its ground truth, the mIoU reported on val.

    Runs (or reuses) the CAM stage on both splits. Returns {"no_caa" | "caa": {bg_threshold, train_miou,
    val_miou, val_best_miou, val_table}}.
    """
    from .data import open_dataset

    data = params["data"]
    splits = (data["train_split"], data["val_split"])
    ds = {s: open_dataset(params, s) for s in splits}
    caches = {s: run_cam_stage(params, s, kind, ctx_path=ctx_path, seeds_dir=seeds_dir, model=model) for s in splits}
    n_cls = len(ds[splits[0]].class_names) + 1
    ts = params["cam"]["bg_thresholds"]
    out = {}
    for caa in (False, True):
        tables = [bg_threshold_sweep(cached_items(caches[s], ds[s], caa), ts, n_cls) for s in splits]
        t = max(tables[0], key=lambda k: (np.nan_to_num(tables[0][k], nan=-1.0), -k))
        out["caa" if caa else "no_caa"] = {"bg_threshold": t, "train_miou": tables[0][t], "val_miou": tables[1][t],
                                           "val_best_miou": max(tables[1].values()),
                                           "val_table": {str(k): v for k, v in tables[1].items()}}
    return out


def cam_panels(item: dict, sources: dict) -> tuple[list, list]:
    """(images, titles) of one figure row: the image, its GT, then per source the max-over-classes CAM.

    sources: {title: (cams (K, h, w), labels)} — e.g. from ``load_cams`` of several CAM caches."""
    from .viz import heatmap, overlay

    image = item["image"]
    images, titles = [image], ["image"]
    if item.get("gt") is not None:
        images.append(overlay(image, item["gt"]))
        titles.append("ground truth")
    for title, (cams, labels) in sources.items():
        heat = upsample_cams(cams, image.shape[:2]).max(axis=0) if len(labels) else np.zeros(image.shape[:2])
        images.append(heatmap(image, heat))
        titles.append(title)
    return images, titles
