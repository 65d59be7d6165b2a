"""SAMS seeds of a split: cached SAM masks + CAMs of any method -> a folder of palette-PNG pseudo-labels.

``make_seeds(params, split, cam_source, kind)`` is the stage behind notebooks 04 (coarse seeds, from the
cls-prompt CAMs; they train the seg prompts) and 06 (fine seeds, from the seg-prompt CAMs; they train
stage 2). ``cam_source`` is a CAM ``StageCache`` of ``fmalib.stages.cams`` (its CAA-refined maps when
``params.cam.use_caa.<prompt kind>``) or any callable ``image_id -> (cams (K, h, w), labels (K,))`` — CAMs of another
method, on any grid (see ``fmalib.method.sams``). The background power is ``params.sams.bg_power.<kind>``: a
number, or ``auto`` = ``fmalib.method.sams.choose_bg_power`` on the first ``params.sams.power_images`` images of
the split (no ground truth). Output: ``workdir/seeds_<kind>/<key>/<image id>.png`` + ``meta.json``
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
from ..data.labels import write_label_png
from ..method.masks import MaskSet
from ..method.sams import SamsImage, choose_bg_power, sams_assign, sams_prepare
from .cams import caa_for, load_cams
from .masks import load_masks, mask_cache
from .shards import fill_command, require_cached, resolve_shard, shard_indices

log = logging.getLogger(__name__)

KINDS = ("coarse", "fine")
CamLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def cam_loader(params, cam_source) -> tuple[CamLoader, Any]:
    """(image_id -> (cams, labels), a JSON-able identity of the source for cache keys); a CAM cache gives its
    CAA-refined maps where ``cam.use_caa`` of its prompt kind is on."""
    if isinstance(cam_source, StageCache):
        caa = caa_for(params, cam_source)
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


def bg_power_rule(params, kind: str, bg_power: float | str | None = None) -> float | str:
    """How p is set: an explicit number, or params.sams.bg_power.<kind> — a number or ``auto`` (checked when
    the params were loaded)."""
    value = params["sams"]["bg_power"][kind] if bg_power is None else bg_power
    return value if isinstance(value, str) else float(value)


def resolve_bg_power(params, kind: str, dataset, masks_cache: StageCache, load_cam: CamLoader,
                     rule: float | str = "auto"):
    """(p, criterion table or None): a number stays; ``auto`` picks p by ``choose_bg_power`` over the first
    ``params.sams.power_images`` images of the split (no ground truth)."""
    if not isinstance(rule, str):
        return float(rule), None
    sams = params["sams"]
    n = min(int(sams["power_images"]), len(dataset))
    images = []
    for j in tqdm(range(n), desc=f"bg power ({kind})", leave=False):
        image_id = dataset.ids[j]
        cams, labels = load_cam(image_id)
        images.append(prepare(load_masks(masks_cache, image_id), cams, labels, sams["levels"],
                              (sams["confident_hi"], sams["confident_lo"])))
    p, table = choose_bg_power(images, sams["power_grid"])
    log.info("SAMS %s: bg power %.3g chosen without ground truth on %d images (balanced agreement %.3f)",
             kind, p, n, float(table["balanced_agreement"].max()))
    return p, table


@dataclass
class SeedSet:
    """A folder of seed PNGs and how it was made."""

    dir: Path
    kind: str
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


def seed_cache(params, split: str, kind: str, masks_cache: StageCache, cam_ident, rule: float | str) -> StageCache:
    """Keyed by the rule that sets p (``auto`` — its inputs, power_images and power_grid, are in params.sams —
    or the number), not by the chosen p: a finished stage is found without recomputing the choice."""
    opts = params["sams"]
    sams = {"levels": opts["levels"]}
    if isinstance(rule, str):  # what choose_bg_power looks at; a fixed p reads none of it
        sams.update({k: opts[k] for k in ("power_grid", "confident_hi", "confident_lo", "power_images")})
    key = {"split": split, "masks": masks_cache.key, "cams": cam_ident, "sams": sams, "bg_power": rule}
    return StageCache(params.resolve_path("workdir"), f"seeds_{kind}", key, code=__name__)


def make_seeds(params, split: str, cam_source, kind: str = "fine", *, shard: tuple[int, int] | None = None,
               bg_power: float | str | None = None, force: bool = False) -> SeedSet:
    """SAMS seeds of every image of ``split`` (or of one shard) as palette PNGs; resumable.

    Needs the split's masks cached (``fmalib.stages.masks.run_mask_stage``) and, for a CAM ``StageCache``
    source, its CAMs of every image: an incomplete cache is refused, naming the missing ids. ``shard`` None: the
    launcher's (torchrun, SLURM array; ``stages.shards.resolve_shard``), else every image. Concurrent shards
    share ``meta.json`` (its content does not depend on the shard) and count fallbacks per shard."""
    if kind not in KINDS:
        raise FmalibError(f"make_seeds: kind {kind!r}; expected one of {KINDS}")
    shard = resolve_shard(shard)
    dataset = open_dataset(params, split)
    masks_cache = mask_cache(params, split)
    require_cached(masks_cache, dataset.ids, f"SAM masks ({split} split)",
                   f"`{fill_command(params, 'masks', split)}`")
    if isinstance(cam_source, StageCache):
        prompt_kind = cam_source.stage.removeprefix("cam_")
        require_cached(cam_source, dataset.ids, f"{prompt_kind} CAMs ({split} split)",
                       f"fmalib.stages.cams.run_cam_stage(params, {split!r}, {prompt_kind!r}) (`"
                       f"{fill_command(params, 'seeds')}` runs it in one process)")
    load_cam, cam_ident = cam_loader(params, cam_source)
    rule = bg_power_rule(params, kind, bg_power)
    cache = seed_cache(params, split, kind, masks_cache, cam_ident, rule)
    meta_path = cache.dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "bg_power" in meta and not force:  # chosen by an earlier (finished or interrupted) run of this cache
        p = float(meta["bg_power"])
        table = pd.DataFrame(meta["power_table"]) if meta.get("power_table") else None
        log.info("SAMS %s: bg power %.3g from %s", kind, p, meta_path)
    else:  # every shard chooses the same p from the same (complete) caches: meta.json is the same for all
        p, table = resolve_bg_power(params, kind, dataset, masks_cache, load_cam, rule)
    meta = {"kind": kind, "split": split, "bg_power": p,
            "bg_power_rule": "fixed" if table is None else "auto: fmalib.method.sams.choose_bg_power",
            "power_table": None if table is None else table.to_dict("list")}
    text = strict_json(meta, indent=1, sort_keys=True)
    if force or not meta_path.is_file() or meta_path.read_text() != text:
        atomic_write_text(meta_path, text)
    result = SeedSet(cache.dir, kind, p, table)
    fallback_path = cache.dir / f"fallback-{shard[0]}of{shard[1]}.json"  # this shard's mask-less images
    fallback = set() if force or not fallback_path.is_file() else set(json.loads(fallback_path.read_text()))
    if force and fallback_path.is_file():
        atomic_write_text(fallback_path, "[]")
    mine = shard_indices(len(dataset), shard)
    todo = [j for j in mine if force or not cache.has(dataset.ids[j], ".png")]
    log.info("SAMS %s seeds of %s shard %d/%d (p=%.3g): %s", kind, split, shard[0], shard[1], p,
             cache.status(len(todo), len(mine), force))
    levels = params["sams"]["levels"]
    ids = [dataset.ids[j] for j in todo]
    for image_id in tqdm(cache.claim_each(ids, ".png", force=force), total=len(ids), desc=f"SAMS {kind} seeds"):
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
                    "not seeds and not part of any fingerprint: %s", kind, cache.dir, len(stray),
                    ", ".join(p.name for p in stray[:5]))
    if result.stats["fallback"]:
        log.warning("SAMS %s: %d images had no SAM mask and fell back to the CAM argmax", kind,
                    result.stats["fallback"])
    return result
