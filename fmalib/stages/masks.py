"""The mask stage: every image of a split → its multi-level SAM masks (the generator of ``params.masks.generator``,
``fmalib.stages.mask_generators``: SAM's ``MultiLevelMaskGenerator`` or SAM 2's), one npz per
image in a ``StageCache`` keyed by the generator and its model, ``params.masks`` and the dataset; resumable and shardable
(``python -m fmalib masks --shard i/n``, or the shard of torchrun / a SLURM array: ``stages.shards``; shards
write different files into the same cache directory)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.cache import StageCache
from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.fingerprint import split_key
from ..method.generator import MASK_KEYS
from ..method.masks import LEVELS, MaskSet
from .mask_generators import build_mask_generator, generator_key, generator_spec
from .shards import launcher_device, resolve_shard, shard_indices

log = logging.getLogger(__name__)


def mask_cache(params, split: str) -> StageCache:
    """The mask cache of ``split``: keyed by the generator (``masks.generator``) and its model, params.masks and
    the dataset (not by the shard)."""
    # points_per_batch sets how many point prompts share a forward pass: memory and speed, not the masks
    key = {**generator_key(params), "masks": {k: params["masks"][k] for k in MASK_KEYS if k != "points_per_batch"},
           "data": split_key(params, split, labels=False)}  # masks depend on the images only
    return StageCache(params.resolve_path("workdir"), "masks", key, code=__name__)


def load_masks(cache: StageCache, image_id: str) -> MaskSet:
    """One image's cached masks."""
    if not cache.has(image_id):
        raise FmalibError(f"no cached SAM masks for image {image_id!r} in {cache.dir}; run the mask stage "
                          f"(fmalib.stages.masks.run_mask_stage or python -m fmalib masks)")
    return MaskSet.from_arrays(cache.load_npz(image_id), str(cache.path(image_id)))


def save_masks(cache: StageCache, image_id: str, masks: MaskSet) -> Path:
    return cache.save_npz(image_id, **masks.to_arrays())


def run_mask_stage(params, split: str | None = None, shard: tuple[int, int] | None = None, *, force: bool = False,
                   model=None, limit: int | None = None) -> StageCache:
    """Compute and cache the masks of the images of ``split`` in ``shard`` that are not cached yet.

    Resumable: finished images are files in the cache and are skipped; shards write into the same cache
    directory, so running shards 0/n .. n-1/n (anywhere, in any order) fills it. ``shard`` None: the
    launcher's (torchrun, SLURM array; ``stages.shards.resolve_shard``), else the whole split. ``limit`` caps
    the images of this shard (smoke runs). Returns the cache."""
    shard = resolve_shard(shard)
    split = split or params["data"]["train_split"]
    dataset = open_dataset(params, split)
    cache = mask_cache(params, split)
    mine = shard_indices(len(dataset), shard)[:limit]
    todo = [j for j in mine if force or not cache.has(dataset.ids[j])]
    log.info("SAM masks of %s shard %d/%d: %s", split, shard[0], shard[1], cache.status(len(todo), len(mine), force))
    if not todo:
        return cache
    log.info("mask generator: %s", generator_spec(params).label)
    generator = build_mask_generator(params, model, launcher_device(params["device"]))
    per_level, computed = np.zeros(3, np.int64), 0
    index = {dataset.ids[j]: j for j in todo}
    for image_id in tqdm(cache.claim_each(list(index), force=force), total=len(todo),
                         desc=f"SAM masks {split} {shard[0]}/{shard[1]}"):
        masks = generator.generate(dataset[index[image_id]]["image"])
        save_masks(cache, image_id, masks)
        per_level += np.bincount(masks.levels, minlength=3)[:3]
        computed += 1
    log.info("SAM masks of %s shard %d/%d: computed %d images (%d by another process) in %s; masks per image: %s",
             split, shard[0], shard[1], computed, len(todo) - computed, cache.dir,
             ", ".join(f"{name} {c / max(computed, 1):.1f}" for name, c in zip(LEVELS, per_level)))
    return cache

