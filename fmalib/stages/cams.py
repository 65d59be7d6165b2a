"""The CAM stage: every image of a split → its CAMs for hand, cls or seg prompts, one compressed npz per image
(``StageCache``): ``labels`` (K,) fg ids, ``cam`` (raw Grad-CAMs) and ``cam_caa`` (raw CAA output), float32
(K, h, w) on the patch grid, K = present classes — raw, as the original saves them; every consumer scores
them (``method.scores.cam_scores`` or SAMS). float32: a raw map's scale can be far below float16's
resolution. Resumable, shardable. CLIP-ES's CAM-argmax baseline over these caches:
``fmalib.stages.cam_argmax``."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.cache import StageCache, file_fingerprint
from ..data import open_dataset
from ..data.fingerprint import split_key
from ..method.image_cams import image_cams
from ..models.checkpoints import clip_fingerprint, load_clip_from_params
from ..models.clip import input_size, patch_size
from .prompt_runs import build_prompts, load_context, trained_context_path
from .shards import launcher_device, resolve_shard, shard_indices

log = logging.getLogger(__name__)


def cam_cache(params, split: str, kind: str, ctx_path: str | Path | None = None) -> StageCache:
    """The CAM cache of ``split`` for prompts ``kind`` (hand | cls | seg) with contexts ``ctx_path``."""
    settings = cam_arguments(params, kind)  # what changes the maps (not use_caa / bg_thresholds: downstream)
    # how the prompts are built: the hand template, or the learned layout (the contexts' file alone does not
    # say how they are placed around the class names)
    pr = params["prompts"]
    prompt = {"hand": {"template": pr["hand_template"]}, "cls": {"n_ctx": pr["n_ctx"]},
              "seg": {"n_ctx": pr["n_ctx"], "layout": pr["seg"]["layout"]}}[kind]
    key = {"split": split, "kind": kind, "cam": settings, "classes": params["classes"], "clip": clip_fingerprint(params),
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


def caa_for(params, cams: StageCache) -> bool:
    """Whether downstream stages read the CAA-refined maps of a CAM cache: ``cam.use_caa`` of its prompt kind
    (the cache's stage is ``cam_<kind>``)."""
    return bool(params["cam"]["use_caa"][cams.stage.removeprefix("cam_")])


def cam_arguments(params, kind: str) -> dict:
    """``image_cams``' keyword arguments from ``params.cam`` for the prompt kind ``kind``."""
    cam = params["cam"]
    return {"target": cam["target"], "target_layer": cam["target_layer"], "caa_last_k": cam["caa_last_k"],
            "sinkhorn_iters": cam["sinkhorn_iters"][kind], "threshold": float(cam["caa_threshold"][kind]),
            "caa_source": cam["caa_source"][kind], "max_side": cam["max_side"]}


def run_cam_stage(params, split: str, kind: str = "cls", shard: tuple[int, int] | None = None,
                  ctx_path: str | Path | None = None, seeds_dir: str | Path | None = None, model=None,
                  progress: bool = True, force: bool = False) -> StageCache:
    """CAMs of every image of ``split`` (or shard i of n: ids[i::n]) into the stage cache; resumable.

    ``kind``: "hand" (CLIP-ES baseline) or "cls" / "seg" — trained contexts from ``ctx_path``, by default
    the finished run of ``fmalib.stages.prompts.train_prompts`` with these params (and ``seeds_dir`` for seg).
    ``shard`` None: the launcher's (torchrun, SLURM array; ``stages.shards.resolve_shard``), else every image.
    ``force`` recomputes images already cached.
    """
    shard = resolve_shard(shard)
    if kind != "hand" and ctx_path is None:
        ctx_path = trained_context_path(params, kind, seeds_dir)
    cache = cam_cache(params, split, kind, ctx_path)
    ds = open_dataset(params, split)
    mine = shard_indices(len(ds), shard)
    todo = [j for j in mine if force or not cache.has(ds.ids[j])]
    log.info("CAMs %s/%s shard %d/%d: %s", kind, split, *shard, cache.status(len(todo), len(mine), force))
    if not todo:
        return cache
    model = model if model is not None else load_clip_from_params(params, launcher_device(params["device"]))
    pset = build_prompts(kind, model, params)
    if kind != "hand":
        load_context(pset, ctx_path)
    with torch.no_grad():
        text = pset()
    index = {ds.ids[j]: j for j in todo}
    for image_id in tqdm(cache.claim_each(list(index), force=force), total=len(todo), desc=f"CAMs {kind}/{split}",
                         disable=not progress):
        item = ds[index[image_id]]
        warn_tiny_image(model, item["id"], item["image"].shape[:2], params["cam"]["max_side"])
        res = image_cams(model, text, pset.n_fg, item["image"], item["labels"], **cam_arguments(params, kind))
        cache.save_npz(item["id"], labels=res["labels"], cam=res["cam"], cam_caa=res["cam_caa"])
    return cache


def load_cams(cache: StageCache, image_id: str, caa: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(raw cams float32 (K, h, w), labels (K,)) of one cached image."""
    z = cache.load_npz(image_id)
    return z["cam_caa" if caa else "cam"].astype(np.float32), z["labels"].astype(np.int64)
