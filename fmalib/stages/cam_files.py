"""CAMs of another method, read from files, refined by SAMS (``python -m fmalib sams``; README "Refine your own
CAMs with SAMS").

Two formats, one file per image of the split, named by the image id:

``clip-es`` — what CLIP-ES writes (linyq2117/CLIP-ES, ``generate_cams_voc12.py`` / ``generate_cams_coco14.py``):
    ``<id>.npy`` = ``np.save`` of a Python dict, read back with ``np.load(path, allow_pickle=True).item()``
    (a pickle: read only files you trust), with

    * ``keys``: int64 (K,), the image's classes as **0-based** indices into the dataset's class list (CLIP-ES's
      ``new_class_names``: VOC's 20, COCO's 80, in the dataset's id order), in order of first appearance in
      the annotation; CLIP-ES's ``eval_cam.py`` turns them into label ids with ``keys + 1``, and so does fmalib;
    * ``attn_highres``: float16 (K, H, W), the CAA-refined CAMs at the image's size (``ori_height``,
      ``ori_width``), each min-max normalised to [0, 1] (``scale_cam_image``) — what ``eval_cam.py`` and
      ``eval_cam_with_crf.py`` read, and fmalib's default (``key``);
    * ``highres`` (written only where its line in CLIP-ES's script is uncommented): float16 (K, H, W), the raw
      Grad-CAMs resized to the image (``key="highres"``).

``npz`` — a plain form for any method: ``<id>.npz`` (``np.savez``) with ``labels`` int (K,), foreground class
    ids **1..C** (the order of params ``classes.names``), and ``cams`` float (K, h, w), channel i the CAM of
    ``labels[i]``, at the image's size or on a patch grid (any scale or sign: see ``fmalib.method.sams``).

Every map is checked against its file: K maps for K labels, labels unique and inside the class list, finite
values, and a size that is the image's (H, W) or could be a patch grid of it (``plausible_grid``). A missing,
unreadable or bad file is one FmalibError naming it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.cache import atomic_write_text, files_fingerprint, stable_hash, strict_json
from ..core.errors import FmalibError
from ..core.params import repo_relative
from ..data import open_dataset
from ..method.metrics import mean_iou
from .masks import run_mask_stage
from .seeds import make_seeds
from .seed_eval import evaluate_seeds

log = logging.getLogger(__name__)

CAM_FORMATS = {"clip-es": ".npy", "npz": ".npz"}
CLIP_ES_KEYS = ("attn_highres", "highres")


def plausible_grid(grid: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether a (h, w) map could be a patch grid of an (H, W) image: not larger than the image, and one
    patch size s maps both sides onto it up to one cell of rounding (H / s within 1 of h, W / s of w) — so a
    transposed or a cropped grid is not."""
    (h, w), (height, width) = grid, image
    if not (1 <= h <= height and 1 <= w <= width):
        return False
    lo = max(height / (h + 1), width / (w + 1))
    hi = min(height / (h - 1) if h > 1 else np.inf, width / (w - 1) if w > 1 else np.inf)
    return lo <= hi


class CamFiles:
    """A SAMS cam source (``fmalib.stages.seeds.make_seeds``): ``cams(image_id) -> (cams float32 (K, h, w),
    labels int64 (K,))`` from a folder of CAM files (module doc).

    ``ids``: the split's image ids (every one needs its file: checked here, before anything runs);
    ``num_classes``: C, the dataset's foreground classes; ``image_size``: image id -> (H, W), for the map-size
    check (None: not checked); ``key``: the dict entry of a CLIP-ES file; ``index_path``: where the files'
    content digests are kept between runs (``cache_key``, which keys the seeds, comes from the files'
    contents: regenerated CAMs make new seeds)."""

    def __init__(self, root: str | Path, fmt: str, ids, num_classes: int,
                 image_size: Callable[[str], tuple[int, int]] | None = None, key: str = "attn_highres",
                 index_path: str | Path | None = None):
        if fmt not in CAM_FORMATS:
            raise FmalibError(f"CAM format {fmt!r}: expected one of {', '.join(CAM_FORMATS)}")
        if fmt == "clip-es" and key not in CLIP_ES_KEYS:
            raise FmalibError(f"CLIP-ES CAM key {key!r}: expected one of {', '.join(CLIP_ES_KEYS)}")
        self.root, self.fmt, self.key = Path(root), fmt, key
        self.num_classes, self.image_size = int(num_classes), image_size
        if not self.root.is_dir():
            raise FmalibError(f"CAM folder {self.root} does not exist (expected one {CAM_FORMATS[fmt]} file per "
                              f"image, named by the image id)")
        self.ids = list(ids)
        missing = [i for i in self.ids if not self.path(i).is_file()]
        if missing:
            raise FmalibError(f"CAM file {self.path(missing[0])} for image {missing[0]!r} does not exist "
                              f"({len(missing)} of {len(self.ids)} images have no {CAM_FORMATS[fmt]} file in "
                              f"{self.root})")
        named = {f"{i}{CAM_FORMATS[fmt]}": self.path(i) for i in self.ids}
        if index_path is None:  # nowhere to keep the digests: hash every file now (never write into root)
            with tempfile.TemporaryDirectory() as tmp:
                content = files_fingerprint(named, Path(tmp) / "digests.json")
        else:
            content = files_fingerprint(named, index_path)
        self.cache_key = {"cam_files": fmt, "key": key if fmt == "clip-es" else None, "content": content}

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}{CAM_FORMATS[self.fmt]}"

    def __call__(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.path(image_id)
        cams, labels = read_clip_es(path, self.key) if self.fmt == "clip-es" else read_npz(path)
        size = self.image_size(image_id) if self.image_size is not None else None
        return check_cams(path, cams, labels, self.num_classes, size)


def _bad(path: Path, what: str) -> FmalibError:
    return FmalibError(f"CAM file {path}: {what}")


def read_clip_es(path: str | Path, key: str = "attn_highres") -> tuple[np.ndarray, np.ndarray]:
    """(maps, fg label ids = keys + 1) of one CLIP-ES ``.npy`` dict; the maps unchecked (``check_cams``)."""
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "does not exist")
    try:
        obj = np.load(path, allow_pickle=True)
        obj = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else obj
    except Exception as exc:  # truncated, not a .npy, a pickle of unknown kind: one error naming the file
        raise _bad(path, f"cannot be read as CLIP-ES's np.save of a dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise _bad(path, f"holds a {type(obj).__name__}, not CLIP-ES's dict of 'keys' and '{key}'")
    missing = [k for k in ("keys", key) if k not in obj]
    if missing:
        raise _bad(path, f"has no entry {missing[0]!r} (entries: {sorted(map(str, obj))}; CLIP-ES writes "
                         f"'keys' and 'attn_highres')")
    keys = np.asarray(obj["keys"])
    if keys.ndim != 1 or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise _bad(path, f"'keys' must be a 1-D integer array of 0-based class indices; got {keys.dtype} "
                         f"{keys.shape}")
    return np.asarray(obj[key]), keys.astype(np.int64) + 1


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(cams, labels 1..C) of one ``.npz`` CAM file; unchecked (``check_cams``)."""
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        arrays = None
        if hasattr(z, "files"):
            with z:
                arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated, not a zip, pickled objects inside: one error naming the file
        raise _bad(path, f"cannot be read as an npz of labels and cams ({type(exc).__name__}: {exc})") from exc
    if arrays is None:
        raise _bad(path, f"is a single .npy array {z.dtype} {z.shape}, not an npz of labels and cams")
    missing = [k for k in ("labels", "cams") if k not in arrays]
    if missing:
        raise _bad(path, f"has no array {missing[0]!r} (arrays: {sorted(arrays)}; expected labels (K,) and "
                         f"cams (K, h, w))")
    cams, labels = arrays["cams"], arrays["labels"]
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise _bad(path, f"'labels' must be a 1-D integer array of class ids 1..C; got {labels.dtype} "
                         f"{labels.shape}")
    return np.asarray(cams), labels.astype(np.int64)


def check_cams(path: str | Path, cams: np.ndarray, labels: np.ndarray, num_classes: int,
               image_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cams float32, labels int64) after the checks of the module doc; an FmalibError naming ``path``."""
    path = Path(path)
    if cams.ndim != 3 or not (np.issubdtype(cams.dtype, np.floating) or np.issubdtype(cams.dtype, np.integer)):
        raise _bad(path, f"maps must be a numeric (K, h, w) array; got {cams.dtype} {cams.shape}")
    if cams.shape[0] != len(labels):
        raise _bad(path, f"{cams.shape[0]} maps for {len(labels)} classes {labels.tolist()} (expected one map per "
                         f"class, K = {len(labels)})")
    if len(np.unique(labels)) != len(labels):
        raise _bad(path, f"classes {labels.tolist()} repeat a class")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise _bad(path, f"classes {labels.tolist()} (as ids 1..C) are outside the {num_classes} classes of the "
                         f"dataset (ids 1..{num_classes})")
    cams = cams.astype(np.float32)
    if not np.isfinite(cams).all():
        raise _bad(path, "maps hold NaN or infinite values")
    if image_size is not None:
        size, grid = tuple(int(v) for v in image_size), tuple(cams.shape[1:])
        if grid != size and not plausible_grid(grid, size):
            raise _bad(path, f"maps are {grid[0]}x{grid[1]}, neither the image's {size[0]}x{size[1]} nor a patch "
                             f"grid of it (transposed, cropped or another image's?)")
    return cams, labels


def refine_cam_files(params, cams_dir: str | Path, fmt: str, out_dir: str | Path, split: str | None = None,
                     bg_power: float | str = "auto", key: str = "attn_highres") -> dict:
    """SAMS pseudo-labels of ``split`` (default: the train split) from a folder of CAM files.

    Computes (or reuses) the split's mask cache (``run_mask_stage``, the generator of ``params.masks``), runs
    ``make_seeds`` with the files as the cam source and ``bg_power`` (``auto``: chosen without ground truth,
    ``fmalib.method.sams.choose_bg_power``; or a number), copies the palette PNGs to ``out_dir/<id>.png`` and
    writes ``out_dir/summary.json`` (strict JSON): p, its rule, fallback images, and the seeds' mIoU against
    the split's ground truth when it has one. Returns the summary."""
    split = split or params["data"]["train_split"]
    dataset = open_dataset(params, split)
    workdir = params.resolve_path("workdir")
    cams = CamFiles(cams_dir, fmt, dataset.ids, len(dataset.class_names), key=key,
                    index_path=workdir / "cam_files" / f"{stable_hash(str(Path(cams_dir).resolve()))}.json")
    masks = run_mask_stage(params, split, (0, 1))
    cams.image_size = lambda image_id: tuple(int(v) for v in masks.load_npz(image_id)["size"])  # the image's
    seeds = make_seeds(params, split, cams, "fine", bg_power=bg_power)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for image_id in dataset.ids:
        shutil.copyfile(seeds.path(image_id), out / f"{image_id}.png")
    try:
        miou, gt_note = mean_iou(evaluate_seeds(dataset, out)), "the split's ground truth"
    except FmalibError as exc:  # a split without ground-truth masks: no mIoU
        miou, gt_note = None, f"no ground truth: {exc}"
    summary = {"split": split, "n_images": len(dataset), "cam_format": fmt, "cam_key": key if fmt == "clip-es"
               else None, "cams": repo_relative(cams_dir), "mask_generator": params["masks"]["generator"],
               "masks_cache": repo_relative(masks.dir), "bg_power": seeds.bg_power,
               "bg_power_rule": "fixed" if seeds.power_table is None else
               "auto: fmalib.method.sams.choose_bg_power (no ground truth)",
               "fallback_images": seeds.fallback_images, "seed_miou": miou, "seed_miou_against": gt_note,
               "seeds_cache": repo_relative(seeds.dir), "out": repo_relative(out)}
    atomic_write_text(out / "summary.json", strict_json(summary, indent=1))
    log.info("SAMS on %s CAMs of %s: %d pseudo-labels in %s (p = %.3g, seed mIoU %s)", fmt, split, len(dataset),
             out, seeds.bg_power, "n/a" if miou is None else f"{100 * miou:.1f}")
    return summary
