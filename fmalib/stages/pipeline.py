"""The method's seeds in one call: ``seeds(params, "coarse" | "fine")`` runs (or reuses from the caches) the SAM
masks, the CAMs of the prompts that kind needs and the SAMS seeds, and returns all of them (``SeedsRun``).

``coarse`` = SAMS on the cls-prompt CAMs; ``fine`` = SAMS on the seg-prompt CAMs, the seg prompts trained on
the coarse seeds (or on the folder given). The prompts must be trained already (notebooks 03 and 05,
``fmalib.stages.prompts.train_prompts``). One process, every image (shard (0, 1) whatever the launcher: each
stage needs the previous one complete)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.cache import StageCache
from ..core.errors import FmalibError
from .cam_argmax import cam_argmax_seed_dir
from .cams import run_cam_stage
from .masks import run_mask_stage
from .seeds import KINDS, SeedSet, make_seeds


@dataclass
class SeedsRun:
    """What one ``seeds`` call made or reused."""

    kind: str  # coarse | fine
    split: str
    masks: StageCache
    cams: StageCache  # the cls CAMs (coarse) or the seg CAMs (fine)
    seeds: SeedSet
    trained_on: Path | None = None  # fine: the seeds the seg prompts were trained on
    coarse: "SeedsRun | None" = None  # fine: the coarse run below it


def seeds(params, kind: str, split: str | None = None, seeds_dir: str | Path | None = None,
          force: bool = False) -> SeedsRun:
    """The ``kind`` seeds of ``split`` (default: train) with their masks and CAMs. ``seeds_dir``: the seeds
    the seg prompts were trained on (fine only; default the coarse seeds). ``force`` recomputes this kind's
    CAMs and seeds (the masks have their own: ``run_mask_stage``; the coarse seeds under fine ones are reused)."""
    if kind not in KINDS:
        raise FmalibError(f"seeds: kind {kind!r}; expected one of {KINDS}")
    split = split or params["data"]["train_split"]
    whole = (0, 1)
    masks = run_mask_stage(params, split, whole)
    coarse = None
    if kind == "coarse":
        cams = run_cam_stage(params, split, "cls", whole, force=force)
    else:
        if seeds_dir is None:
            coarse = seeds(params, "coarse", split)
            seeds_dir = coarse.seeds.dir
        cams = run_cam_stage(params, split, "seg", whole, seeds_dir=seeds_dir, force=force)
    made = make_seeds(params, split, cams, kind, shard=whole, force=force)
    return SeedsRun(kind, split, masks, cams, made, Path(seeds_dir) if kind == "fine" else None, coarse)


def seg_training_seeds(params, source: str = "auto") -> tuple[Path, str]:
    """(seeds dir, description) of the pixel seeds that train the seg prompts (from the cls-prompt CAMs).

    ``sams``: the method's coarse SAMS seeds (``seeds(params, "coarse")``: SAM masks +
    CAMs, GT-free). ``cam_argmax``: CLIP-ES's argmax(bg threshold, CAMs) seeds with the threshold picked on
    the train split's ground truth (``cam_argmax_seed_dir``) — a stand-in, labelled as such.
    ``auto``: SAMS (segment_anything is a hard dependency, so ``auto`` is ``sams``).
    """
    if source not in ("auto", "sams", "cam_argmax"):
        raise FmalibError(f"seg seeds source {source!r}; expected auto, sams or cam_argmax")
    if source in ("auto", "sams"):
        coarse = seeds(params, "coarse").seeds
        return Path(coarse.dir), f"SAMS coarse seeds (bg power p = {coarse.bg_power:.3g})"
    split = params["data"]["train_split"]
    cams = run_cam_stage(params, split, "cls", (0, 1))  # every image: the seeds below read them all
    out, t, _ = cam_argmax_seed_dir(params, split, cams)
    return Path(out), f"CAM-argmax seeds of the cls CAMs (bg threshold {t:.2f}, picked on train GT)"
