"""Tiny datasets in the real layouts — VOCdevkit/VOC2012 with SBD's SegmentationClassAug, and COCO 2014 — drawn
from the synthetic generator, so the real params (params/voc.yaml, coco.yaml) run end to end in minutes:
the reproduce tests, and smoke runs before a cluster job::

    python -m fmalib.data.layouts voc /tmp/voc-tiny --params params/voc.yaml --write-params /tmp/voc-tiny.yaml
    make reproduce PARAMS=/tmp/voc-tiny.yaml

and what a practitioner of weak supervision has (``tags``: photos with a tags file, masks on val only).

The files are what the real releases hold: JPEG images, VOC palette masks and SBD's grayscale ones, a
``train_aug.txt`` in the common two-column form, COCO instances JSON with COCO's 80 category ids (1..90 with
gaps), RLE segmentations, a crowd region and an image without annotations. The generator's six classes stand
in for six of the real classes (``VOC_STAND_INS``, ``COCO_STAND_INS``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from ..core.errors import FmalibError
from ..core.params import fast_overlay, load_params
from . import open_dataset
from .labels import label_to_png_bytes
from .synthetic import CLASS_NAMES, generate_sample, sample_size
from .voc import VOC_CLASSES

VOC_STAND_INS = {"ball": "sheep", "star": "bird", "boat": "boat", "house": "bus", "car": "car", "kite": "aeroplane"}
COCO_STAND_INS = {"ball": "sports ball", "star": "frisbee", "boat": "boat", "house": "bus", "car": "car",
                  "kite": "kite"}

# COCO 2014's categories: (id, name) in id order; ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = tuple(zip(
    [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)],
    ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
     "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
     "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
     "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
     "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
     "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
     "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
     "teddy bear", "hair drier", "toothbrush"]))

INDEX_OFFSET = 5_000_000  # generator indices of these folders: outside the toy benchmark and the pretraining pools


def _samples(n: int, seed: int, size_range: tuple[int, int], start: int):
    for k in range(n):
        idx = INDEX_OFFSET + start + k
        yield k, generate_sample(seed, idx, sample_size(seed, idx, size_range))


def _jpeg(image: np.ndarray, quality: int = 92, full_chroma: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, **({"subsampling": 0} if full_chroma else {}))
    return buf.getvalue()


def _gray_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _relabel(semantic: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = semantic.copy()
    for src, dst in table.items():
        out[semantic == src] = dst
    return out


def _class_ids(stand_ins: bool) -> dict[int, int]:
    """Generator class id -> the written masks' id: its VOC stand-in's (``VOC_STAND_INS``) or its own."""
    return {i + 1: VOC_CLASSES.index(VOC_STAND_INS[n]) + 1 if stand_ins else i + 1 for i, n in enumerate(CLASS_NAMES)}


def write_voc_layout(root: str | os.PathLike, n_train: int = 6, n_val: int = 3, seed: int = 0,
                     size_range: tuple[int, int] = (96, 120), stand_ins: bool = True) -> Path:
    """A VOCdevkit/VOC2012-layout folder: JPEGImages/*.jpg, SegmentationClass/*.png (palette; train + val),
    SegmentationClassAug/*.png (grayscale, as SBD's release; train), ImageSets/Segmentation/train.txt and
    val.txt (one id a line) and train_aug.txt (two-column ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``).
    ``stand_ins`` False keeps the generator's own class ids (classes ``CLASS_NAMES``), as the tags layout does.
    """
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    table = _class_ids(stand_ins)
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for split, n, start, year in (("train", n_train, 0, 2008), ("val", n_val, 100_000, 2007)):
        for k, s in _samples(n, seed, size_range, start):
            iid = f"{year}_{k:06d}"
            label = _relabel(s.semantic, table)
            (root / "JPEGImages" / f"{iid}.jpg").write_bytes(_jpeg(s.image))
            (root / "SegmentationClass" / f"{iid}.png").write_bytes(label_to_png_bytes(label))
            if split == "train":
                (root / "SegmentationClassAug" / f"{iid}.png").write_bytes(_gray_png(label))
            lists[split].append(iid)
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in lists["train"]))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in lists["val"]))
    (sets / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in lists["train"]))
    return root


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: column-major run lengths starting with a background run."""
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def write_coco_layout(root: str | os.PathLike, n_train: int = 6, n_val: int = 3, seed: int = 0,
                      size_range: tuple[int, int] = (96, 120)) -> Path:
    """A COCO 2014-layout folder: train2014/ and val2014/ ``COCO_<split>2014_<12 digits>.jpg``, and
    annotations/instances_{train,val}2014.json (COCO's 80 categories and ids, RLE segmentations). In the first
    train image with two objects or more the largest is a crowd region; one more train image has no
    annotations (COCO has such)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cat_id = {name: cid for cid, name in COCO_CATEGORIES}
    table = {i + 1: cat_id[COCO_STAND_INS[n]] for i, n in enumerate(CLASS_NAMES)}
    categories = [{"id": cid, "name": name, "supercategory": "object"} for cid, name in COCO_CATEGORIES]
    for split, n, start in (("train", n_train, 200_000), ("val", n_val, 300_000)):
        folder = root / f"{split}2014"
        folder.mkdir(exist_ok=True)
        images, anns, crowd_done = [], [], split != "train"
        for k, s in _samples(n + (split == "train"), seed, size_range, start):
            img_id = 100 + 37 * k  # COCO's ids are sparse
            name = f"COCO_{split}2014_{img_id:012d}.jpg"
            (folder / name).write_bytes(_jpeg(s.image))
            h, w = s.semantic.shape
            images.append({"id": img_id, "file_name": name, "height": h, "width": w})
            if split == "train" and k == n:
                continue  # the image without annotations
            largest = int(np.argmax([inst.mask.sum() for inst in s.instances]))
            crowd_here = not crowd_done and len(s.instances) > 1  # the image keeps a labelled object
            crowd_done |= crowd_here
            for j, inst in enumerate(s.instances):
                crowd = crowd_here and j == largest
                seg = _uncompressed_rle(inst.mask) if crowd else _rle(inst.mask)
                rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": table[inst.class_id],
                             "segmentation": seg, "area": float(mask_utils.area(rle)),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd)})
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"info": {"description": "fmalib tiny COCO-layout folder"}, "licenses": [], "images": images,
             "annotations": anns, "categories": categories}))
    return root


def write_tags_layout(root: str | os.PathLike, n_train: int = 6, n_val: int = 3, seed: int = 0,
                      size_range: tuple[int, int] = (96, 120), stand_ins: bool = False) -> Path:
    """What a practitioner has: ``train/*.jpg`` with ``train.csv`` (``image,labels``, no masks) and ``val/*.jpg``
    with ``val.jsonl`` and ``val_masks/*.png`` for evaluation — the same images, bytes and ids as
    ``write_voc_layout`` with the same arguments. Tags and mask ids: the generator's classes, or with
    ``stand_ins`` VOC's (``VOC_STAND_INS``; masks in VOC's ids, for params/voc.yaml's class list)."""
    root = Path(root)
    tag = {i + 1: VOC_STAND_INS[n] if stand_ins else n for i, n in enumerate(CLASS_NAMES)}
    table = _class_ids(stand_ins)
    for split, n, start, year in (("train", n_train, 0, 2008), ("val", n_val, 100_000, 2007)):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for k, s in _samples(n, seed, size_range, start):
            iid = f"{year}_{k:06d}"
            (root / split / f"{iid}.jpg").write_bytes(_jpeg(s.image))
            names = [tag[c] for c in np.unique(s.semantic) if 0 < c <= len(CLASS_NAMES)]
            rows.append((f"{iid}.jpg", names))
            if split == "val":
                (root / "val_masks").mkdir(exist_ok=True)
                (root / "val_masks" / f"{iid}.png").write_bytes(label_to_png_bytes(_relabel(s.semantic, table)))
        if split == "train":
            (root / "train.csv").write_text("image,labels\n" + "".join(f"{f},{';'.join(n)}\n" for f, n in rows))
        else:
            (root / "val.jsonl").write_text("".join(json.dumps({"image": f, "labels": n}) + "\n" for f, n in rows))
    return root


def export_tags(params, root: str | os.PathLike, masks_for: Sequence[str] = (), quality: int = 95) -> dict:
    """The train and val splits of ``params``' dataset as photos with tags: ``<split>/<id>.jpg`` (JPEG at
    ``quality``, colour at full resolution: no 4:2:0 subsampling) and ``<split>.csv`` (``image,labels``), and
    for the splits in ``masks_for`` their masks as ``<split>_masks/<id>.png``. Returns the ``data.tags`` mapping
    that reads it back (paths relative to root)."""
    root = Path(root)
    out = {}
    for split in dict.fromkeys((params["data"]["train_split"], params["data"]["val_split"])):
        ds = open_dataset(params, split)
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in tqdm(range(len(ds)), desc=f"export {split} as photos + tags"):
            (root / split / f"{ds.ids[i]}.jpg").write_bytes(_jpeg(ds.load_image(i), quality, full_chroma=True))
            rows.append(f"{ds.ids[i]}.jpg,{';'.join(ds.class_names[c - 1] for c in ds.image_labels(i))}\n")
            if split in masks_for:
                (root / f"{split}_masks").mkdir(exist_ok=True)
                (root / f"{split}_masks" / f"{ds.ids[i]}.png").write_bytes(label_to_png_bytes(ds.load_gt(i)))
        (root / f"{split}.csv").write_text("image,labels\n" + "".join(rows))
        out[split] = {"images": split, "tags": f"{split}.csv", **({"masks": f"{split}_masks"} if split in masks_for
                                                                   else {})}
    return out


TAGS_SPLITS = {"train": {"images": "train", "tags": "train.csv"},
               "val": {"images": "val", "tags": "val.jsonl", "masks": "val_masks"}}

WRITERS = {"voc": write_voc_layout, "coco": write_coco_layout, "tags": write_tags_layout}
# what a params file needs to read a written layout beyond data.root (masks' ids: the generator's classes)
LAYOUT_KEYS = {"tags": {"data.tags": TAGS_SPLITS, "classes.names": list(CLASS_NAMES)}}


def write_smoke_params(params_path: str | os.PathLike, data_root: str | os.PathLike, out: str | os.PathLike,
                       workdir: str | os.PathLike | None = None, overrides: dict | None = None) -> Path:
    """A copy of a params file with its ``fast:`` overrides applied (tiny models, few iterations), ``data.root``
    pointing at ``data_root`` and an empty ``fast:`` — what ``make reproduce PARAMS=<copy>`` runs."""

    src = load_params(params_path)
    merged = {"data.root": str(Path(data_root).resolve()), **(overrides or {})}
    if workdir is not None:
        merged["workdir"] = str(Path(workdir).resolve())
    params = load_params(params_path, merged, overlays=fast_overlay(src)).to_dict()
    params["fast"] = None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {src.path} with its fast: overrides, on {data_root} (fmalib.data.layouts)\n"
                   + yaml.safe_dump(params, sort_keys=False, width=120))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fmalib.data.layouts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=sorted(WRITERS))
    p.add_argument("root", help="folder to write (created)")
    p.add_argument("--n-train", type=int, default=6)
    p.add_argument("--n-val", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", default=None, help="params file to copy (e.g. params/voc.yaml)")
    p.add_argument("--write-params", default=None, help="where to write the copy (needs --params)")
    p.add_argument("--workdir", default=None, help="workdir of the copy (default: the fast: block's)")
    args = p.parse_args(argv)
    if bool(args.params) != bool(args.write_params):
        raise SystemExit("--params and --write-params go together")
    root = WRITERS[args.kind](args.root, args.n_train, args.n_val, args.seed)
    print(f"wrote {args.kind} layout: {root}")
    if args.params:
        try:
            print(f"params: {write_smoke_params(args.params, root, args.write_params, args.workdir, LAYOUT_KEYS.get(args.kind))}")
        except FmalibError as exc:
            raise SystemExit(f"error: {exc}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
