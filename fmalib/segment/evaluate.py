"""Stage-2 inference and evaluation: multi-scale + flip test-time augmentation, optional dense CRF,
Detectron2's ``SemSegEvaluator`` alongside fmalib's own confusion matrix (``fmalib.method.metrics``).

The headline number is fmalib's: one confusion matrix over the whole split, ignore 255, mean IoU over the
classes that occur (``fmalib.method.metrics.mean_iou``); Detectron2's mIoU is computed from the same predictions and
reported beside it (the tests check that they agree).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.cache import (atomic_save_npz, atomic_write_text, dir_fingerprint, file_fingerprint, load_npz, stable_hash,
                          strict_json)
from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.fingerprint import split_key
from ..data.labels import read_label_png, write_label_png
from ..method.metrics import ConfusionMeter, iou_table, mean_iou
from .compat import ensure_detectron2
from .config import load_config
from .datasets import SemSegMapper, class_names_with_background, register_gt, register_pseudo
from .train import _as_params, quiet_detectron2_logs

log = logging.getLogger(__name__)

CRF_MISSING = ("dense CRF skipped: pydensecrf2 is not installed (pip install pydensecrf2, or "
               "pip install -e '.[crf]'); evaluating without CRF")


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def dense_crf(image: np.ndarray, probs: np.ndarray, crf: Mapping) -> np.ndarray:
    """Fully connected CRF (Krähenbühl & Koltun) on softmax ``probs`` (K, H, W) of an RGB uint8 ``image``;
    returns refined probabilities (K, H, W). ``crf``: iters, pos_xy, pos_w (smoothness kernel),
    bi_xy, bi_rgb, bi_w (appearance kernel), as in DeepLab / CLIP-ES."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.clip(probs, 1e-8, 1.0).astype(np.float32))))
    d.addPairwiseGaussian(sxy=crf["pos_xy"], compat=crf["pos_w"])
    d.addPairwiseBilateral(sxy=crf["bi_xy"], srgb=crf["bi_rgb"], rgbim=np.ascontiguousarray(image, dtype=np.uint8),
                           compat=crf["bi_w"])
    q = d.inference(int(crf["iters"]))
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


class Segmenter:
    """A trained stage-2 model with its test-time procedure: per image, softmax probabilities averaged over
    ``scales`` (image resized by each, prediction resized back) and, with ``flip``, their mirror images;
    then, if ``crf`` is a mapping (and pydensecrf2 is installed), dense CRF on the averaged probabilities.

    ``probs(image)`` -> (K, H, W) float32; ``predict(image)`` -> uint8 (H, W) class ids. Also a Detectron2
    model: ``segmenter(batched_inputs)`` returns ``[{"sem_seg": probs}]`` for ``inference_on_dataset``.
    """

    def __init__(self, model, input_format: str, scales: Sequence[float] = (1.0,), flip: bool = False,
                 crf: Mapping | None = None):

        self.model = model.eval()
        self.input_format = input_format
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        if crf is not None and not crf_available():
            log.warning(CRF_MISSING)
            crf = None
        self.crf = crf
        self.device = next(model.parameters()).device
        self._torch = torch

    @property
    def crf_applied(self) -> bool:
        return self.crf is not None

    def _tensor(self, image: np.ndarray):
        img = image[:, :, ::-1] if self.input_format == "BGR" else image
        return self._torch.as_tensor(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def probs(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities (K, H, W) of an RGB uint8 image under the test-time procedure."""
        torch = self._torch

        h, w = image.shape[:2]
        x = self._tensor(image).float()
        total, n = None, 0
        with torch.no_grad():
            for s in self.scales:
                xs = x if s == 1.0 else F.interpolate(x[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                                                      mode="bilinear", align_corners=False)[0]
                for flipped in ((False, True) if self.flip else (False,)):
                    xi = xs.flip(-1) if flipped else xs
                    logits = self.model([{"image": xi.to(self.device), "height": h, "width": w}])[0]["sem_seg"]
                    p = logits.float().softmax(0)
                    p = p.flip(-1) if flipped else p
                    total = p if total is None else total + p
                    n += 1
        out = (total / n).cpu().numpy()
        if self.crf is not None:
            out = dense_crf(image, out, self.crf)
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.probs(image).argmax(0).astype(np.uint8)

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        torch = self._torch
        outs = []
        for inp in batched_inputs:
            img = inp["image"].permute(1, 2, 0).cpu().numpy()
            img = img[:, :, ::-1] if self.input_format == "BGR" else img
            outs.append({"sem_seg": torch.from_numpy(self.probs(np.ascontiguousarray(img)))})
        return outs


def load_segmenter(params, model_dir: str | os.PathLike, device: str | None = None, *, scales=None, flip=None,
                   crf: bool | None = None) -> Segmenter:
    """The trained model in ``model_dir`` (its ``config.yaml`` + ``model_final.pth``) with the test-time
    procedure of ``params.stage2.test`` (each option overridable here)."""
    ensure_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    params = _as_params(params)
    model_dir = Path(model_dir)
    weights = model_dir / "model_final.pth"
    if not weights.is_file():
        raise FmalibError(f"{weights} does not exist: train first (fmalib.segment.train_segmenter)")
    cfg = load_config(model_dir / "config.yaml", device=device or str(params["device"]))
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    test = params["stage2"]["test"]
    use_crf = test["crf"] if crf is None else crf
    return Segmenter(model, cfg.INPUT.FORMAT, test["scales"] if scales is None else scales,
                     test["flip"] if flip is None else flip, params["stage2"]["crf"] if use_crf else None)


def _evaluator_class():
    ensure_detectron2()
    from detectron2.evaluation import DatasetEvaluator

    class ConfusionEvaluator(DatasetEvaluator):
        """fmalib's confusion matrix over the split (and, optionally, the predicted PNGs)."""

        def __init__(self, records: list[dict], num_classes: int, save_dir: Path | None = None):
            self.gt = {r["file_name"]: r["sem_seg_file_name"] for r in records}
            self.ids = {r["file_name"]: r["image_id"] for r in records}
            self.num_classes = num_classes
            self.save_dir = save_dir

        def reset(self):
            self.meter = ConfusionMeter(self.num_classes)

        def process(self, inputs, outputs):
            for inp, out in zip(inputs, outputs):
                pred = out["sem_seg"].argmax(0).cpu().numpy().astype(np.uint8)
                self.meter.add(pred, read_label_png(self.gt[inp["file_name"]]))
                if self.save_dir is not None:
                    write_label_png(self.save_dir / f"{self.ids[inp['file_name']]}.png", pred)

        def evaluate(self):
            return {"fmalib": {"confusion": self.meter.matrix}}

    return ConfusionEvaluator


def evaluate_segmenter(params, model_dir: str | os.PathLike, split: str | None = None, *,
                       label_dir: str | os.PathLike | None = None, scales=None, flip=None, crf: bool | None = None,
                       save_predictions: str | os.PathLike | None = None, device: str | None = None,
                       force: bool = False) -> dict:
    """mIoU of the model in ``model_dir`` on ``split`` (default: val) against its ground truth (or against
    ``label_dir/<id>.png``). Runs Detectron2's ``inference_on_dataset`` with ``SemSegEvaluator`` and fmalib's
    confusion matrix side by side. Cached in ``model_dir/eval/`` by (split, labels, test options, weights).

    Returns ``{"miou", "d2_miou", "confusion" (K, K, rows = gt), "table" (per-class IoU DataFrame),
    "d2" (SemSegEvaluator's dict), "split", "n_images", "crf_applied", "scales", "flip"}``.
    """
    ensure_detectron2()
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator, inference_on_dataset


    params = _as_params(params)
    split = split or params["data"]["val_split"]
    model_dir = Path(model_dir)
    segmenter = load_segmenter(params, model_dir, device, scales=scales, flip=flip, crf=crf)
    weights = model_dir / "model_final.pth"
    key = {"split": split, "labels": dir_fingerprint(label_dir) if label_dir else "gt",
           "scales": segmenter.scales, "flip": segmenter.flip, "crf": segmenter.crf,
           "weights": file_fingerprint(weights), "data": split_key(params, split)}
    cache = model_dir / "eval" / f"{split}-{stable_hash(key, 12)}"
    names = class_names_with_background(params)
    if not force and save_predictions is None and (cache.with_suffix(".json")).is_file():
        log.info("stage 2: evaluation of %s on %s cached in %s", model_dir, split, cache)
        return _result(json.loads(cache.with_suffix(".json").read_text()),
                       load_npz(cache.with_suffix(".npz"))["confusion"], names)

    quiet_detectron2_logs()
    name = register_pseudo(params, label_dir, split) if label_dir else register_gt(params, split)
    records = DatasetCatalog.get(name)
    mapper = SemSegMapper(is_train=False, input_format=segmenter.input_format)
    loader = build_detection_test_loader(records, mapper=mapper, num_workers=params["stage2"]["num_workers"])
    save_dir = Path(save_predictions) if save_predictions else None
    evaluator = DatasetEvaluators([SemSegEvaluator(name, distributed=False),
                                   _evaluator_class()(records, len(names), save_dir)])
    log.info("stage 2: evaluating %s on %s (%d images, scales %s, flip %s, CRF %s)", model_dir, split, len(records),
             list(segmenter.scales), segmenter.flip, segmenter.crf_applied)
    res = inference_on_dataset(segmenter, loader, evaluator)
    conf = res.pop("fmalib")["confusion"]
    summary = {"split": split, "n_images": len(records), "miou": mean_iou(conf),
               "d2_miou": res["sem_seg"]["mIoU"] / 100,
               "d2": {k: float(v) for k, v in res["sem_seg"].items()}, "crf_applied": segmenter.crf_applied,
               "scales": list(segmenter.scales), "flip": segmenter.flip}
    atomic_save_npz(cache.with_suffix(".npz"), confusion=conf)
    atomic_write_text(cache.with_suffix(".json"), strict_json(summary, indent=1))
    log.info("stage 2: %s mIoU %.4f (Detectron2: %.4f) -> %s", split, summary["miou"], summary["d2_miou"], cache)
    return _result(summary, conf, names)


def _result(summary: dict, conf: np.ndarray, names: list[str]) -> dict:
    return {**summary, "confusion": conf, "table": iou_table(conf, names)}


def evaluate_labels(params, label_dir: str | os.PathLike, split: str | None = None) -> dict:
    """mIoU of a label set itself (e.g. the fine seeds) against the ground truth of ``split`` (default: train)."""


    params = _as_params(params)
    split = split or params["data"]["train_split"]
    ds = open_dataset(params, split)
    names = class_names_with_background(params)
    meter = ConfusionMeter(len(names))
    for i in tqdm(range(len(ds)), desc=f"labels vs gt ({split})"):
        meter.add(read_label_png(Path(label_dir) / f"{ds.ids[i]}.png"), ds.load_gt(i))
    return {"split": split, "n_images": len(ds), "miou": mean_iou(meter.matrix), "confusion": meter.matrix,
            "table": iou_table(meter.matrix, names)}
