"""SAMS seeds of a split: cached SAM masks + CAMs of any method -> a folder of palette-PNG pseudo-labels.

``make_seeds(params, split, cam_source, stage)`` is the stage behind notebooks 04 (coarse seeds, from the
cls-prompt CAMs; they train the seg prompts) and 06 (fine seeds, from the seg-prompt CAMs; they train
stage 2). ``cam_source`` is a CAM ``StageCache`` of ``fmalib.stages.cams`` (its CAA-refined maps when
``params.cam.use_caa``) or any callable ``image_id -> (cams (K, h, w), labels (K,))`` — CAMs of another
method, on any grid (see ``fmalib.method.sams``). The background power is ``params.sams.bg_power_<stage>``: a
number, or ``auto`` = ``fmalib.method.sams.choose_bg_power`` on the first ``params.sams.power_images`` images of
the split (no ground truth). Output: ``workdir/seeds_<stage>/<key>/<image id>.png`` + ``meta.json``
(p and its criterion table; the same for every shard) + ``fallback-<i>of<n>.json`` (each shard's mask-less
images), keyed by masks, CAMs, sams params and p; resumable, shardable (``stages.shards``).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..core.cache import StageCache, atomic_write_text, stray_files, strict_json
from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.labels import read_label_png, write_label_png
from ..method.masks import MaskSet
from ..method.metrics import ConfusionMeter
from ..method.sams import SamsImage, bg_power_sweep, choose_bg_power, sams_assign, sams_prepare
from .cams import load_cams, run_cam_stage, select_bg_threshold, write_cam_argmax_seeds
from .masks import load_masks, mask_cache, run_mask_stage
from .shards import fill_command, require_cached, resolve_shard, shard_indices

log = logging.getLogger(__name__)

STAGES = ("coarse", "fine")
CamLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def cam_loader(cam_source, caa: bool = True) -> tuple[CamLoader, Any]:
    """(image_id -> (cams, labels), a JSON-able identity of the source for cache keys)."""
    if isinstance(cam_source, StageCache):
        return (lambda image_id: load_cams(cam_source, image_id, caa)), \
            {"stage": cam_source.stage, "key": cam_source.key, "caa": caa}
    if callable(cam_source):
        ident = getattr(cam_source, "cache_key", None) or getattr(cam_source, "__qualname__", repr(cam_source))
        return cam_source, {"callable": ident}
    raise FmalibError(f"cam_source must be a CAM StageCache (fmalib.stages.cams.run_cam_stage) or a callable "
                      f"image_id -> (cams, labels); got {type(cam_source).__name__}")


def select_levels(masks: MaskSet, levels: Sequence[int]) -> MaskSet:
    """The masks of the given levels (params.sams.levels; an ablation drops some)."""
    return masks.select(np.isin(masks.levels, np.asarray(levels)))


def prepare(masks: MaskSet, cams: np.ndarray, labels: np.ndarray, levels: Sequence[int],
            confident: tuple[float, float] | None = None) -> SamsImage:
    """One image's ``SamsImage`` from its cached masks and CAMs."""
    masks = select_levels(masks, levels)
    return sams_prepare(cams, masks.runs(), masks.levels, labels, (masks.height, masks.width), confident)


def bg_power_rule(params, stage: str, bg_power: float | str | None = None) -> float | str:
    """How p is set: an explicit number, or params.sams.bg_power.<stage> — a number or ``auto`` (checked when
    the params were loaded)."""
    value = params["sams"]["bg_power"][stage] if bg_power is None else bg_power
    return value if isinstance(value, str) else float(value)


def resolve_bg_power(params, stage: str, dataset, masks_cache: StageCache, load_cam: CamLoader,
                     rule: float | str = "auto"):
    """(p, criterion table or None): a number stays; ``auto`` picks p by ``choose_bg_power`` over the first
    ``params.sams.power_images`` images of the split (no ground truth)."""
    if not isinstance(rule, str):
        return float(rule), None
    cfg = params["sams"]
    n = min(int(cfg["power_images"]), len(dataset))
    images = []
    for j in tqdm(range(n), desc=f"bg power ({stage})", leave=False):
        image_id = dataset.ids[j]
        cams, labels = load_cam(image_id)
        images.append(prepare(load_masks(masks_cache, image_id), cams, labels, cfg["levels"],
                              (cfg["confident_hi"], cfg["confident_lo"])))
    p, table = choose_bg_power(images, cfg["power_grid"])
    log.info("SAMS %s: bg power %.3g chosen without ground truth on %d images (balanced agreement %.3f)",
             stage, p, n, float(table["balanced_agreement"].max()))
    return p, table


@dataclass
class SeedSet:
    """A folder of seed PNGs and how it was made."""

    dir: Path
    stage: str
    bg_power: float
    power_table: Any = None  # DataFrame of choose_bg_power, or None for a fixed p
    stats: collections.Counter = field(default_factory=collections.Counter)

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.png"

    @property
    def fallback_images(self) -> int:
        """Images without a SAM mask (painted by the per-pixel CAM rule), over every run and shard of this
        cache (the union of the shards' ``fallback-<i>of<n>.json`` id lists)."""
        files = sorted(self.dir.glob("fallback-*.json"))
        if not files:
            return self.stats["fallback"]
        return len(set().union(*(json.loads(f.read_text()) for f in files)))


def seed_cache(params, split: str, stage: str, masks_cache: StageCache, cam_ident, rule: float | str) -> StageCache:
    """Keyed by the rule that sets p (``auto`` — its inputs, power_images and power_grid, are in params.sams —
    or the number), not by the chosen p: a finished stage is found without recomputing the choice."""
    cfg = params["sams"]
    sams = {"levels": cfg["levels"]}
    if isinstance(rule, str):  # what choose_bg_power looks at; a fixed p reads none of it
        sams.update({k: cfg[k] for k in ("power_grid", "confident_hi", "confident_lo", "power_images")})
    key = {"split": split, "masks": masks_cache.key, "cams": cam_ident, "sams": sams, "bg_power": rule}
    return StageCache(params.resolve_path("workdir"), f"seeds_{stage}", key, code=__name__)


def make_seeds(params, split: str, cam_source, stage: str = "fine", *, shard: tuple[int, int] | None = None,
               bg_power: float | str | None = None, force: bool = False) -> SeedSet:
    """SAMS seeds of every image of ``split`` (or of one shard) as palette PNGs; resumable.

    Needs the split's masks cached (``fmalib.stages.masks.run_mask_stage``) and, for a CAM ``StageCache``
    source, its CAMs of every image: an incomplete cache is refused, naming the missing ids. ``shard`` None: the
    launcher's (torchrun, SLURM array; ``stages.shards.resolve_shard``), else every image. Concurrent shards
    share ``meta.json`` (its content does not depend on the shard) and count fallbacks per shard."""
    if stage not in STAGES:
        raise FmalibError(f"make_seeds: stage {stage!r}; expected one of {STAGES}")
    shard = resolve_shard(shard)
    dataset = open_dataset(params, split)
    masks_cache = mask_cache(params, split)
    require_cached(masks_cache, dataset.ids, f"SAM masks ({split} split)",
                   f"`{fill_command(params, 'masks', split)}`")
    if isinstance(cam_source, StageCache):
        kind = cam_source.stage.removeprefix("cam_")
        require_cached(cam_source, dataset.ids, f"{kind} CAMs ({split} split)",
                       f"fmalib.stages.cams.run_cam_stage(params, {split!r}, {kind!r}) (`"
                       f"{fill_command(params, 'seeds')}` runs it in one process)")
    load_cam, cam_ident = cam_loader(cam_source, bool(params["cam"].get("use_caa", True)))
    rule = bg_power_rule(params, stage, bg_power)
    cache = seed_cache(params, split, stage, masks_cache, cam_ident, rule)
    meta_path = cache.dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "bg_power" in meta and not force:  # chosen by an earlier (finished or interrupted) run of this cache
        p = float(meta["bg_power"])
        table = pd.DataFrame(meta["power_table"]) if meta.get("power_table") else None
        log.info("SAMS %s: bg power %.3g from %s", stage, p, meta_path)
    else:  # every shard chooses the same p from the same (complete) caches: meta.json is the same for all
        p, table = resolve_bg_power(params, stage, dataset, masks_cache, load_cam, rule)
    meta = {"stage": stage, "split": split, "bg_power": p,
            "bg_power_rule": "fixed" if table is None else "auto: fmalib.method.sams.choose_bg_power",
            "power_table": None if table is None else table.to_dict("list")}
    text = strict_json(meta, indent=1, sort_keys=True)
    if force or not meta_path.is_file() or meta_path.read_text() != text:
        atomic_write_text(meta_path, text)
    result = SeedSet(cache.dir, stage, p, table)
    fallback_path = cache.dir / f"fallback-{shard[0]}of{shard[1]}.json"  # this shard's mask-less images
    fallback = set() if force or not fallback_path.is_file() else set(json.loads(fallback_path.read_text()))
    if force and fallback_path.is_file():
        atomic_write_text(fallback_path, "[]")
    mine = shard_indices(len(dataset), shard)
    todo = [j for j in mine if force or not cache.has(dataset.ids[j], ".png")]
    log.info("SAMS %s seeds of %s shard %d/%d (p=%.3g): %s", stage, split, shard[0], shard[1], p,
             cache.status(len(todo), len(mine), force))
    levels = params["sams"]["levels"]
    ids = [dataset.ids[j] for j in todo]
    for image_id in tqdm(cache.claim_each(ids, ".png", force=force), total=len(ids), desc=f"SAMS {stage} seeds"):
        cams, labels = load_cam(image_id)
        image = prepare(load_masks(masks_cache, image_id), cams, labels, levels)
        label, _ = sams_assign(image, p, result.stats)
        if image.fallback:  # recorded before its PNG lands: a killed run cannot lose it
            fallback.add(image_id)
            atomic_write_text(fallback_path, json.dumps(sorted(fallback)))
        write_label_png(cache.path(image_id, ".png"), label)
    stray = stray_files(cache.dir, "*.png")
    if stray:
        log.warning("SAMS %s: %s holds %d temporary file(s) of an interrupted write (or of a process writing now), "
                    "not seeds and not part of any fingerprint: %s", stage, cache.dir, len(stray),
                    ", ".join(p.name for p in stray[:5]))
    if result.stats["fallback"]:
        log.warning("SAMS %s: %d images had no SAM mask and fell back to the CAM argmax", stage,
                    result.stats["fallback"])
    return result


def evaluate_seeds(dataset, seed_dir: str | Path, limit: int | None = None) -> np.ndarray:
    """Confusion matrix (K + 1, K + 1) of the seed PNGs against the split's ground truth."""
    seed_dir = Path(seed_dir)
    meter = ConfusionMeter(len(dataset.class_names) + 1)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for j in tqdm(range(n), desc="seeds vs GT", leave=False):
        path = seed_dir / f"{dataset.ids[j]}.png"
        if not path.is_file():
            raise FmalibError(f"seed map {path} missing for image {dataset.ids[j]!r}")
        meter.add(read_label_png(path), dataset.load_gt(j))
    return meter.matrix


def seed_power_sweep(params, split: str, cam_source, powers: Sequence[float] | None = None,
                     limit: int | None = None):
    """Seed mIoU against ground truth for every p (the ablation; ``make_seeds`` never uses it)."""
    dataset = open_dataset(params, split)
    masks_cache = mask_cache(params, split)
    load_cam, _ = cam_loader(cam_source, bool(params["cam"].get("use_caa", True)))
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images, gts = [], []
    for j in tqdm(range(n), desc="bg power sweep (GT)", leave=False):
        cams, labels = load_cam(dataset.ids[j])
        images.append(prepare(load_masks(masks_cache, dataset.ids[j]), cams, labels, params["sams"]["levels"]))
        gts.append(dataset.load_gt(j))
    return bg_power_sweep(images, gts, powers or params["sams"]["power_grid"], len(dataset.class_names) + 1)


def pipeline_seeds(params, stage: str, split: str | None = None, seeds_dir: str | Path | None = None,
                   force: bool = False) -> SeedSet:
    """The method's seeds (METHOD §5): ``coarse`` = SAMS on the cls-prompt CAMs; ``fine`` = SAMS on the
    seg-prompt CAMs, the seg prompts trained on ``seeds_dir`` (default: the coarse seeds). Runs (or reuses
    from the caches) the mask stage, the CAM stage and the seeds; the prompts must be trained already
    (notebooks 03 and 05, ``fmalib.stages.prompts.train_prompts``). One process, every image (shard (0, 1)
    whatever the launcher: each stage needs the previous one complete). ``force`` recomputes this stage's
    CAMs and seeds (the masks have their own ``force``: ``run_mask_stage``; the coarse seeds under fine ones
    are reused)."""
    split = split or params["data"]["train_split"]
    whole = (0, 1)
    run_mask_stage(params, split, whole)
    if stage == "coarse":
        cams = run_cam_stage(params, split, "cls", whole, force=force)
    elif stage == "fine":
        seeds_dir = seeds_dir or pipeline_seeds(params, "coarse", split).dir
        cams = run_cam_stage(params, split, "seg", whole, seeds_dir=seeds_dir, force=force)
    else:
        raise FmalibError(f"pipeline_seeds: stage {stage!r}; expected one of {STAGES}")
    return make_seeds(params, split, cams, stage, shard=whole, force=force)


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
    caa = bool(params["cam"].get("use_caa", True))
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


def seg_training_seeds(params, source: str = "auto") -> tuple[Path, str]:
    """(seeds dir, description) of the pixel seeds that train the seg prompts (from the cls-prompt CAMs).

    ``sams``: the method's coarse SAMS seeds (``pipeline_seeds(params, "coarse")``: SAM masks +
    CAMs, GT-free). ``cam_argmax``: CLIP-ES's argmax(bg threshold, CAMs) seeds with the threshold picked on
    the train split's ground truth (``cam_argmax_seed_dir``) — a stand-in, labelled as such.
    ``auto``: SAMS (segment_anything is a hard dependency, so ``auto`` is ``sams``).
    """
    if source not in ("auto", "sams", "cam_argmax"):
        raise FmalibError(f"seg seeds source {source!r}; expected auto, sams or cam_argmax")
    if source in ("auto", "sams"):
        seeds = pipeline_seeds(params, "coarse")
        return Path(seeds.dir), f"SAMS coarse seeds (bg power p = {seeds.bg_power:.3g})"
    split = params["data"]["train_split"]
    cams = run_cam_stage(params, split, "cls", (0, 1))  # every image: the seeds below read them all
    out, t, _ = cam_argmax_seed_dir(params, split, cams)
    return Path(out), f"CAM-argmax seeds of the cls CAMs (bg threshold {t:.2f}, picked on train GT)"
