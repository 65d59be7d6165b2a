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
from ..core.code_key import code_digest
from ..core.errors import FmalibError
from ..data import open_dataset
from ..data.fingerprint import split_key
from ..data.labels import read_label_png, write_label_png
from ..method.metrics import ConfusionMeter, iou_table, mean_iou
from .compat import ensure_detectron2
from .config import build_config, load_config
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
        return self.refine(image, self.tta_probs(image))

    def refine(self, image: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The dense CRF on ``tta_probs``' output, if this segmenter has one (else ``probs`` itself)."""
        return dense_crf(image, probs, self.crf) if self.crf is not None else probs

    def tta_probs(self, image: np.ndarray) -> np.ndarray:
        """Softmax probabilities averaged over the scales and flips, before any CRF."""
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
        return (total / n).cpu().numpy()

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
        where = getattr(params, "path", None) or "<params.yaml>"
        raise FmalibError(f"{weights} does not exist: train the run first — `python -m fmalib stage2 --params "
                          f"{where}` with this run's --labels / --set options and without --eval-only "
                          f"(or fmalib.segment.train_segmenter)")
    cfg = load_config(model_dir / "config.yaml", device=device or str(params["device"]))
    check_run_config(params, cfg, model_dir)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    test = params["stage2"]["test"]
    return Segmenter(model, cfg.INPUT.FORMAT, test["scales"] if scales is None else scales,
                     test["flip"] if flip is None else flip, _crf_settings(params, crf))


def _model_entries(node, prefix: str = "MODEL") -> dict:
    out = {}
    for k, v in node.items():
        if hasattr(v, "items"):
            out.update(_model_entries(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = _as_lists(v)  # config.yaml reads tuples back as lists
    return out


def _as_lists(v):
    return [_as_lists(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_run_config(params, cfg, model_dir: Path) -> None:
    """The run's model (its config.yaml) must be the one ``params.stage2`` and ``params.classes`` describe:
    otherwise predictions would be scored or named by another model's classes. The weights file, the device
    and the norm (SyncBN trains as BN on one process) may differ."""
    expected = build_config({**params["stage2"], "weights": None}, len(class_names_with_background(params)))
    want, have = _model_entries(expected.MODEL), _model_entries(cfg.MODEL)
    differ = [k for k in want if not k.endswith((".WEIGHTS", ".DEVICE", "NORM")) and want[k] != have.get(k)]
    if differ:
        shown = "; ".join(f"{k} is {have.get(k)!r}, params give {want[k]!r}" for k in differ[:5])
        raise FmalibError(f"stage-2 run {model_dir} does not match params {getattr(params, 'path', None) or ''}: "
                          f"{shown}{' ...' if len(differ) > 5 else ''} — predict with the params the run was "
                          f"trained with (its stage2 keys and classes.names)")


def eval_cache(params, model_dir: Path, split: str, label_dir, scales, flip: bool, crf: Mapping | None) -> Path:
    """``model_dir/eval/<split>-<hash>`` (.json + .npz): keyed by the weights' content, the labels evaluated
    against, the TTA and CRF settings, the split's data and the code."""
    key = {"split": split, "labels": dir_fingerprint(label_dir) if label_dir else "gt", "scales": scales,
           "flip": flip, "crf": crf, "weights": file_fingerprint(Path(model_dir) / "model_final.pth"),
           "data": split_key(params, split), "code": code_digest(__name__)}
    return Path(model_dir) / "eval" / f"{split}-{stable_hash(key, 12)}"


def _crf_settings(params, crf: bool | None) -> Mapping | None:
    """``params.stage2.crf`` if the CRF is on (``crf``, or ``stage2.test.crf`` when None), else None."""
    return params["stage2"]["crf"] if (params["stage2"]["test"]["crf"] if crf is None else crf) else None


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

    class OneOutput(DatasetEvaluator):
        """``inner`` fed output ``key`` of a multi-output model as its "sem_seg"; its results under ``key``."""

        def __init__(self, inner, key: str):
            self.inner, self.key = inner, key

        def reset(self):
            self.inner.reset()

        def process(self, inputs, outputs):
            self.inner.process(inputs, [{"sem_seg": out[self.key]} for out in outputs])

        def evaluate(self):
            return {self.key: self.inner.evaluate()}

    return ConfusionEvaluator, OneOutput


class _SharedPass:
    """The Detectron2 model of one inference pass for several segmenters that differ only in their CRF: the
    test-time-augmented probabilities are computed once per image, each segmenter refines them (output
    ``sem_seg<i>``)."""

    def __init__(self, segmenters: Sequence[Segmenter]):
        self.segmenters = list(segmenters)

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        first, outs = self.segmenters[0], []
        for inp in batched_inputs:
            img = inp["image"].permute(1, 2, 0).cpu().numpy()
            img = np.ascontiguousarray(img[:, :, ::-1] if first.input_format == "BGR" else img)
            probs = first.tta_probs(img)
            outs.append({f"sem_seg{i}": torch.from_numpy(s.refine(img, probs)) for i, s in enumerate(self.segmenters)})
        return outs


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
    return evaluate_segmenter_crf_options(params, model_dir, split, (crf,), label_dir=label_dir, scales=scales,
                                          flip=flip, save_predictions=save_predictions, device=device,
                                          force=force)[0]


def evaluate_segmenter_crf_options(params, model_dir: str | os.PathLike, split: str | None = None,
                                   crf_options: Sequence[bool | None] = (False, True), *,
                                   label_dir: str | os.PathLike | None = None, scales=None, flip=None,
                                   save_predictions: str | os.PathLike | None = None, device: str | None = None,
                                   force: bool = False) -> list[dict]:
    """``evaluate_segmenter`` once per CRF option (``crf`` of each: False, True or None = params'), from one
    inference pass: the multi-scale + flip probabilities of an image are computed once and each option
    refines them (or not). One result per option, in order, each cached exactly as ``evaluate_segmenter``
    caches it."""
    ensure_detectron2()
    from detectron2.data import DatasetCatalog, build_detection_test_loader
    from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator, inference_on_dataset

    params = _as_params(params)
    split = split or params["data"]["val_split"]
    model_dir = Path(model_dir)
    if save_predictions is not None and len(crf_options) != 1:
        raise FmalibError(f"save_predictions={save_predictions}: one CRF option at a time (got {list(crf_options)})")
    first = load_segmenter(params, model_dir, device, scales=scales, flip=flip, crf=crf_options[0])
    segmenters = [first] + [Segmenter(first.model, first.input_format, first.scales, first.flip,
                                      _crf_settings(params, c)) for c in crf_options[1:]]
    names = class_names_with_background(params)
    caches = [eval_cache(params, model_dir, split, label_dir, s.scales, s.flip, s.crf) for s in segmenters]
    results: list[dict | None] = [None] * len(segmenters)
    for i, cache in enumerate(caches):
        if not force and save_predictions is None and cache.with_suffix(".json").is_file():
            log.info("stage 2: evaluation of %s on %s cached in %s", model_dir, split, cache)
            results[i] = _result(json.loads(cache.with_suffix(".json").read_text()),
                                 load_npz(cache.with_suffix(".npz"))["confusion"], names)
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results

    quiet_detectron2_logs()
    name = register_pseudo(params, label_dir, split) if label_dir else register_gt(params, split)
    records = DatasetCatalog.get(name)
    mapper = SemSegMapper(is_train=False, input_format=first.input_format)
    loader = build_detection_test_loader(records, mapper=mapper, num_workers=params["stage2"]["num_workers"])
    save_dir = Path(save_predictions) if save_predictions else None
    confusion_evaluator, one_output = _evaluator_class()
    evaluator = DatasetEvaluators([one_output(DatasetEvaluators([
        SemSegEvaluator(name, distributed=False), confusion_evaluator(records, len(names), save_dir)]), f"sem_seg{j}")
        for j in range(len(todo))])
    log.info("stage 2: evaluating %s on %s (%d images, scales %s, flip %s, CRF %s)", model_dir, split, len(records),
             list(first.scales), first.flip, " / ".join(str(segmenters[i].crf_applied) for i in todo))
    res = inference_on_dataset(_SharedPass([segmenters[i] for i in todo]), loader, evaluator)
    for j, i in enumerate(todo):
        out = res[f"sem_seg{j}"]
        conf = out.pop("fmalib")["confusion"]
        summary = {"split": split, "n_images": len(records), "miou": mean_iou(conf),
                   "d2_miou": out["sem_seg"]["mIoU"] / 100,
                   "d2": {k: float(v) for k, v in out["sem_seg"].items()}, "crf_applied": segmenters[i].crf_applied,
                   "scales": list(first.scales), "flip": first.flip}
        atomic_save_npz(caches[i].with_suffix(".npz"), confusion=conf)
        atomic_write_text(caches[i].with_suffix(".json"), strict_json(summary, indent=1))
        log.info("stage 2: %s mIoU %.4f (Detectron2: %.4f), CRF %s -> %s", split, summary["miou"], summary["d2_miou"],
                 segmenters[i].crf_applied, caches[i])
        results[i] = _result(summary, conf, names)
    return results


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
