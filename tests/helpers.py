"""Small own-data trees for the bad-input tests: VOC-layout folders, labels, images."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from fmalib.core.params import load_params
from fmalib.data.labels import write_label_png

NAMES = ["a", "b", "c"]


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def save(path, img, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path, format=fmt)
    return path


def jpeg_bytes(h=40, w=50):
    buf = io.BytesIO()
    Image.fromarray(rgb(h, w)).save(buf, format="JPEG")
    return buf.getvalue()


def voc_tree(root, images: dict, labels: dict, train, val):
    """A VOC-layout folder: images {id: PIL image, array or raw bytes (.jpg)}, labels {id: array, PIL image or
    None (no file)}."""
    for image_id, img in images.items():
        if isinstance(img, bytes):
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(img)
        else:
            save(root / "JPEGImages" / f"{image_id}.png", img)
    for image_id, lab in labels.items():
        if isinstance(lab, np.ndarray):
            write_label_png(root / "SegmentationClass" / f"{image_id}.png", lab)
        elif lab is not None:
            save(root / "SegmentationClass" / f"{image_id}.png", lab)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def voc_params(root, tmp_path, **over):
    return load_params("params/toy.yaml", {
        "data.kind": "voc", "data.root": str(root), "workdir": str(tmp_path / "work"), "classes.names": NAMES,
        "classes.synonyms": NAMES, "clip.checkpoint": None, "sam.checkpoint": None, **over})


def label(h, w, ids=(1,)):
    lab = np.zeros((h, w), np.uint8)
    for k, c in enumerate(ids):
        lab[k * 2: k * 2 + 2, :4] = c
    return lab
