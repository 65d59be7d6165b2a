"""The CAM stage: every image of a split → its CAMs for hand, cls or seg prompts, one compressed float16 npz per
image (``StageCache``): ``labels`` (K,) fg ids, ``cam`` and ``cam_caa`` (K, h, w) on the patch grid, K =
present classes; resumable, shardable. Also CLIP-ES's CAM-argmax seeds over a cached split and their mIoU
under CLIP-ES's protocol (bg threshold picked on the train split's ground truth)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.cache import StageCache, atomic_write_text, file_fingerprint, stable_hash, strict_json
from ..data import open_dataset
from ..data.fingerprint import split_key
from ..data.labels import write_label_png
from ..method.image_cams import image_cams
from ..method.seed_rules import bg_threshold_sweep, cam_argmax_seeds
from ..models.checkpoints import clip_fingerprint, load_clip_from_params
from ..models.clip import input_size, patch_size
from .prompt_runs import build_prompts, load_context, trained_context_path
from .shards import launcher_device, resolve_shard, shard_indices

log = logging.getLogger(__name__)


def cam_cache(params, split: str, kind: str, ctx_path: str | Path | None = None) -> StageCache:
    """The CAM cache of ``split`` for prompts ``kind`` (hand | cls | seg) with contexts ``ctx_path``."""
    cam = params["cam"]  # only what changes the maps (not use_caa / bg_thresholds, which act downstream)
    cfg = {"target": cam["target"], "caa_last_k": cam["caa_last_k"], "sinkhorn_iters": cam["sinkhorn_iters"],
           "caa_threshold": cam["caa_threshold"][kind], "target_layer": cam["target_layer"],
           "caa_source": cam["caa_source"][kind], "max_side": cam["max_side"]}
    # how the prompts are built: the hand template, or the learned layout (the contexts' file alone does not
    # say how they are placed around the class names)
    pr = params["prompts"]
    prompt = {"hand": {"template": pr["hand_template"]}, "cls": {"n_ctx": pr["n_ctx"]},
              "seg": {"n_ctx": pr["n_ctx"], "layout": pr["seg"]["layout"]}}[kind]
    key = {"split": split, "kind": kind, "cam": cfg, "classes": params["classes"], "clip": clip_fingerprint(params),
           "data": split_key(params, split), "prompt": prompt, "ctx": file_fingerprint(ctx_path) if ctx_path else None}
    return StageCache(params.resolve_path("workdir"), f"cam_{kind}", key, code=__name__)


def warn_tiny_image(model, image_id: str, size: tuple[int, int], max_side: int | None = None) -> bool:
    """Log a warning for an image smaller than one CLIP patch on a side (True then): it is upsampled to the
    patch; on a one-patch grid its CAMs are 0 (min-max of a single value), so its seeds are all background."""
    p = patch_size(model)
    if min(size) >= p:
        return False
    hh, ww = input_size(model, *size, max_side)
    grid = (hh // p, ww // p)
    log.warning("image %r is %dx%d px, smaller than one CLIP patch (%d px) on a side: CLIP sees it upsampled to "
                "%dx%d (a %dx%d patch grid)%s", image_id, size[0], size[1], p, hh, ww, *grid,
                "; one patch has no spatial CAM (all 0 after min-max): its seeds are all background"
                if grid == (1, 1) else "")
    return True


def cam_arguments(params, prompts: str) -> dict:
    """``image_cams``' keyword arguments from ``params.cam`` for the prompt kind ``prompts``."""
    cam = params["cam"]
    return {"target": cam["target"], "target_layer": cam["target_layer"], "caa_last_k": cam["caa_last_k"],
            "sinkhorn_iters": cam["sinkhorn_iters"], "threshold": float(cam["caa_threshold"][prompts]),
            "caa_source": cam["caa_source"][prompts], "max_side": cam["max_side"]}


def run_cam_stage(params, split: str, prompts: str = "cls", shard: tuple[int, int] | None = None,
                  ctx_path: str | Path | None = None, seeds_dir: str | Path | None = None, model=None,
                  progress: bool = True, force: bool = False) -> StageCache:
    """CAMs of every image of ``split`` (or shard i of n: ids[i::n]) into the stage cache; resumable.

    ``prompts``: "hand" (CLIP-ES baseline) or "cls" / "seg" — trained contexts from ``ctx_path``, by default
    the finished run of ``fmalib.stages.prompts.train_prompts`` with these params (and ``seeds_dir`` for seg).
    ``shard`` None: the launcher's (torchrun, SLURM array; ``stages.shards.resolve_shard``), else every image.
    ``force`` recomputes images already cached.
    """
    shard = resolve_shard(shard)
    if prompts != "hand" and ctx_path is None:
        ctx_path = trained_context_path(params, prompts, seeds_dir)
    cache = cam_cache(params, split, prompts, ctx_path)
    ds = open_dataset(params, split)
    mine = shard_indices(len(ds), shard)
    todo = [j for j in mine if force or not cache.has(ds.ids[j])]
    log.info("CAMs %s/%s shard %d/%d: %s", prompts, split, *shard, cache.status(len(todo), len(mine), force))
    if not todo:
        return cache
    model = model if model is not None else load_clip_from_params(params, launcher_device(params["device"]))
    pset = build_prompts(prompts, model, params)
    if prompts != "hand":
        load_context(pset, ctx_path)
    with torch.no_grad():
        text = pset()
    index = {ds.ids[j]: j for j in todo}
    for image_id in tqdm(cache.claim_each(list(index), force=force), total=len(todo), desc=f"CAMs {prompts}/{split}",
                         disable=not progress):
        item = ds[index[image_id]]
        warn_tiny_image(model, item["id"], item["image"].shape[:2], params["cam"]["max_side"])
        res = image_cams(model, text, pset.n_fg, item["image"], item["labels"], **cam_arguments(params, prompts))
        cache.save_npz(item["id"], labels=res["labels"], cam=res["cam"].astype(np.float16),
                       cam_caa=res["cam_caa"].astype(np.float16))
    return cache


def load_cams(cache: StageCache, image_id: str, caa: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(cams float32 (K, h, w), labels (K,)) of one cached image."""
    z = cache.load_npz(image_id)
    return z["cam_caa" if caa else "cam"].astype(np.float32), z["labels"].astype(np.int64)


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
    data = params["data"]
    splits = (data["train_split"], data["val_split"])
    ds = {s: open_dataset(params, s) for s in splits}
    caches = {s: run_cam_stage(params, s, kind, (0, 1), ctx_path=ctx_path, seeds_dir=seeds_dir, model=model)
              for s in splits}  # every image, in this process: the sweep reads them all
    n_cls = len(ds[splits[0]].class_names) + 1
    ts = params["cam"]["bg_thresholds"]
    # the sweeps read every cached map (seconds per split): their result is kept beside the train CAMs, keyed
    # by both caches (content-keyed directories) and the thresholds, so later notebooks reuse it
    memo = caches[splits[0]].dir / f"argmax_eval-{stable_hash({'val': caches[splits[1]].key, 'thresholds': ts})}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    out = {}
    for caa in (False, True):
        tables = [bg_threshold_sweep(cached_items(caches[s], ds[s], caa), ts, n_cls) for s in splits]
        t = max(tables[0], key=lambda k: (np.nan_to_num(tables[0][k], nan=-1.0), -k))
        out["caa" if caa else "no_caa"] = {"bg_threshold": t, "train_miou": tables[0][t], "val_miou": tables[1][t],
                                           "val_best_miou": max(tables[1].values()),
                                           "val_table": {str(k): v for k, v in tables[1].items()}}
    atomic_write_text(memo, strict_json(out, sort_keys=True, indent=1))
    log.info("CAM-argmax sweep of %s CAMs cached in %s", kind, memo)
    return json.loads(memo.read_text())  # the same JSON values (NaN as null) whether computed or reused

