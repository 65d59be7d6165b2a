"""CLIP-ES's baseline on cached CAMs: argmax(bg threshold, CAMs) seeds, the threshold picked on the train split's
ground truth (CLIP-ES's own protocol, so the comparison with SAMS favours the baseline), and their mIoU."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.cache import StageCache, atomic_write_text, stable_hash, strict_json
from ..core.code_key import code_digest
from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.labels import write_label_png
from ..method.seed_rules import bg_threshold_sweep, cam_argmax_seeds
from .cams import caa_for, load_cams, run_cam_stage

log = logging.getLogger(__name__)


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
                     ctx_path: str | Path | None = None) -> dict | None:
    """CAM-argmax seed mIoU of ``kind`` CAMs (hand | cls | seg), without and with CAA (CLIP-ES protocol):
    the bg threshold is picked on the train split with its ground truth, the mIoU reported on val. A train
    split without masks (tags only): the threshold is picked on val (``tuned_on``), favouring the baseline
    further; no masks on val either: None (no mIoU exists).

    Runs (or reuses) the CAM stage on both splits. Returns {"no_caa" | "caa": {bg_threshold, tuned_on,
    train_miou (None without train masks), val_miou, val_best_miou, val_table}}.
    """
    data = params["data"]
    splits = (data["train_split"], data["val_split"])
    ds = {s: open_dataset(params, s) for s in splits}
    if not ds[splits[1]].has_masks:
        log.info("CAM-argmax seeds of %s CAMs: val split %r has no masks, no mIoU to report", kind, splits[1])
        return None
    if not ds[splits[0]].has_masks:
        splits = (splits[1], splits[1])  # tune and report on val
    caches = {s: run_cam_stage(params, s, kind, (0, 1), ctx_path=ctx_path, seeds_dir=seeds_dir, model=model)
              for s in splits}  # every image, in this process: the sweep reads them all
    n_cls = len(ds[splits[0]].class_names) + 1
    ts = params["cam"]["bg_thresholds"]
    # the sweeps read every cached map (seconds per split): their result is kept beside the train CAMs, keyed
    # by both caches (content-keyed directories) and the thresholds, so later notebooks reuse it
    memo = caches[splits[0]].dir / ("argmax_eval-" + stable_hash({"val": caches[splits[1]].key, "thresholds": ts,
                                                                  "code": code_digest(__name__)}) + ".json")
    if memo.is_file():
        return json.loads(memo.read_text())
    out = {}
    for caa in (False, True):
        val = bg_threshold_sweep(cached_items(caches[splits[1]], ds[splits[1]], caa), ts, n_cls)
        tune = val if splits[0] == splits[1] else \
            bg_threshold_sweep(cached_items(caches[splits[0]], ds[splits[0]], caa), ts, n_cls)
        t = max(tune, key=lambda k: (np.nan_to_num(tune[k], nan=-1.0), -k))
        out["caa" if caa else "no_caa"] = {"bg_threshold": t, "tuned_on": splits[0],
                                           "train_miou": None if splits[0] == splits[1] else tune[t],
                                           "val_miou": val[t], "val_best_miou": max(val.values()),
                                           "val_table": {str(k): v for k, v in val.items()}}
    atomic_write_text(memo, strict_json(out, sort_keys=True, indent=1))
    log.info("CAM-argmax sweep of %s CAMs cached in %s", kind, memo)
    return json.loads(memo.read_text())  # the same JSON values (NaN as null) whether computed or reused


def cam_argmax_cache(params, split: str, cams: StageCache, caa: bool, thresholds: Sequence[float]) -> StageCache:
    """CAM-argmax seeds of cached CAMs, keyed by the rule that picks the bg threshold (not by the threshold)."""
    key = {"split": split, "cams": {"stage": cams.stage, "key": cams.key}, "caa": caa,
           "bg_threshold": {"rule": "best seed mIoU against the split's ground truth",
                            "grid": [float(t) for t in thresholds]}}
    return StageCache(params.resolve_path("workdir"), "seeds_cam_argmax", key, code=__name__)


def cam_argmax_seed_dir(params, split: str, cams: StageCache, thresholds: Sequence[float] | None = None):
    """The CLIP-ES baseline on the same CAMs: argmax(bg threshold, CAMs) seeds with the threshold tuned on
    ground truth (the baseline's own protocol, so the comparison favours it). Returns (dir, t, {t: mIoU});
    the choice is kept in the cache's meta.json, so a finished run is not swept again."""
    dataset = open_dataset(params, split)
    if not dataset.has_masks:
        raise FmalibError(f"CAM-argmax seeds of split {split!r}: its threshold is tuned against the split's masks, "
                          f"and it has none (tags only); the method's own seeds (SAMS) need none")
    caa = caa_for(params, cams)
    thresholds = thresholds or params["cam"]["bg_thresholds"]
    cache = cam_argmax_cache(params, split, cams, caa, thresholds)
    meta = cache.dir / "meta.json"
    if meta.is_file():
        chosen = json.loads(meta.read_text())
        t = float(chosen["bg_threshold"])
        table = {float(k): float("nan") if v is None else v for k, v in chosen["table"].items()}
    else:
        t, table = select_bg_threshold(cams, dataset, thresholds, caa)
        atomic_write_text(meta, strict_json({"bg_threshold": t, "table": {str(k): v for k, v in table.items()}},
                                            indent=1))
    return write_cam_argmax_seeds(cams, dataset, t, cache.dir, caa), t, table
