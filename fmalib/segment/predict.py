"""Stage 2 applied: segment new images with a trained run — ``python -m fmalib predict`` and ``predict_images``.

Per image, the label map at the image's own size as a VOC-palette PNG (``<out>/<stem>.png``), optionally an
overlay JPEG (``<out>/overlay/<stem>.jpg``), and one line of ``<out>/predictions.json``: the share of the image's
pixels per class. The test-time procedure is ``load_segmenter``'s (``stage2.test`` unless overridden), so the
maps equal what ``evaluate_segmenter`` scores on a split. Writes are atomic; a rerun skips images whose PNG
exists (``force`` redoes them).
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..core.cache import atomic_write_bytes, atomic_write_text, file_fingerprint, strict_json
from ..core.errors import FmalibError
from ..data.check import check_image, problems_error
from ..data.labels import VOC_PALETTE, write_label_png
from ..data.tags import IMAGE_SUFFIXES
from ..data.voc import read_image
from .datasets import class_names_with_background
from .evaluate import load_segmenter
from .train import _as_params

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.json"


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders' image files (sorted, not recursive); a
    missing path, an empty folder or two images with the same stem (one output name) is an error."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise FmalibError(f"--images {path}: a folder with no image file ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FmalibError(f"--images {path}: no such file or folder")
    stems: dict[str, Path] = {}
    for p in out:
        if p.stem in stems and stems[p.stem] != p:
            raise FmalibError(f"images {stems[p.stem]} and {p} share the name {p.stem!r}: their outputs would be "
                              f"one file ({p.stem}.png); rename one or predict them into separate --out folders")
        stems[p.stem] = p
    return list(stems.values())


def overlay_jpeg(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> bytes:
    """JPEG bytes of ``image`` with each predicted class painted in its VOC colour (background left as is)."""
    palette = np.array(VOC_PALETTE, np.float32).reshape(256, 3)
    colour = palette[label]
    fg = (label > 0)[..., None]
    mixed = np.where(fg, (1 - alpha) * image + alpha * colour, image).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(mixed).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def class_shares(label: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """{class name: share of the image's pixels} for the classes present (background included)."""
    counts = np.bincount(label.ravel(), minlength=len(names))
    return {names[c]: round(float(counts[c]) / label.size, 6) for c in np.flatnonzero(counts) if c < len(names)}


def predict_images(params, run: str | os.PathLike, images: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                   *, overlay: bool = False, scales: Sequence[float] | None = None, flip: bool | None = None,
                   crf: bool | None = None, device: str | None = None, force: bool = False) -> dict:
    """Segment ``images`` (files or folders) with the stage-2 model of ``run`` into ``out_dir``; returns the
    content of ``predictions.json`` (``{"model": {run, weights}, "classes", "test", "images": {stem: {image, size,
    shares}}}``).
    Every image is checked before the model loads: one error lists each unreadable file."""
    params = _as_params(params)
    paths = list_images(images)
    problems = [p for path in paths for p in check_image(path, min_side=1)[1]]
    error = problems_error(problems, f"{len(paths)} image(s) to predict")
    if error is not None:
        raise error
    segmenter = load_segmenter(params, run, device, scales=scales, flip=flip, crf=crf)
    names = class_names_with_background(params)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / PREDICTIONS
    test = {"scales": list(segmenter.scales), "flip": segmenter.flip, "crf": segmenter.crf_applied}
    model = {"run": Path(run).name, "weights": file_fingerprint(Path(run) / "model_final.pth")}
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if previous and (previous.get("model") != model or previous.get("test") != test):
        force = True  # another model or test procedure made these files: none of them is an answer now
        log.info("predict: %s holds another run's or test setting's predictions; redoing every image", out_dir)
    done = {} if force else previous.get("images", {})
    todo = [p for p in paths if force or not (out_dir / f"{p.stem}.png").is_file() or p.stem not in done
            or (overlay and not (out_dir / "overlay" / f"{p.stem}.jpg").is_file())]
    log.info("predict: %d of %d images to segment with %s (scales %s, flip %s, CRF %s) -> %s", len(todo),
             len(paths), run, test["scales"], test["flip"], test["crf"], out_dir)
    record = {"model": model, "classes": names, "test": test, "images": dict(done)}
    for path in tqdm(todo, desc="predict"):
        image = read_image(path)
        label = segmenter.predict(image)
        write_label_png(out_dir / f"{path.stem}.png", label)
        if overlay:
            atomic_write_bytes(out_dir / "overlay" / f"{path.stem}.jpg", overlay_jpeg(image, label))
        record["images"][path.stem] = {"image": path.name, "size": list(label.shape),
                                       "shares": class_shares(label, names)}
        atomic_write_text(record_path, strict_json(record, indent=1, sort_keys=True))  # a stop keeps what is done
    atomic_write_text(record_path, strict_json(record, indent=1, sort_keys=True))
    return record
