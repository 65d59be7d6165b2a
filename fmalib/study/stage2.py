"""What notebook 08 shows, as functions: which pseudo-labels to train on, the two runs side by side,
per-class tables, loss curves, test-time augmentation variants and qualitative predictions."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..core.errors import FmalibError
from ..core.params import repo_root
from ..data import open_dataset
from ..segment.evaluate import crf_available, evaluate_segmenter, evaluate_segmenter_crf_options, load_segmenter
from ..segment.train import read_metrics, run_dir
from .results import result
from .viz import image_grid, overlay


def pseudo_label_dir(params, out_dir: str | os.PathLike) -> Path:
    """The label set stage 2 trains on: ``stage2.labels`` if set, else the fine-seed folder notebook 06
    recorded in ``out_dir`` (``results/06_fine_seeds.json: label_dir``)."""
    explicit = params["stage2"]["labels"]
    if explicit:
        path = params.resolve_path("stage2.labels")
        where = f"params stage2.labels={explicit!r}"
    else:
        path, where = repo_root() / result(out_dir, "06_fine_seeds", "label_dir"), f"06_fine_seeds.label_dir in {out_dir}"
    if not path.is_dir():
        raise FmalibError(f"pseudo-label folder {path} (from {where}) does not exist")
    return path


def stage2_runs(params, label_dir: str | os.PathLike) -> dict[str, Path]:
    """{run name: run dir} of notebook 08: the model on the pseudo-labels and, where the train split has masks,
    the fully supervised upper bound on them."""
    runs = {"seeds": run_dir(params, "seeds", label_dir)}
    if open_dataset(params, params["data"]["train_split"]).has_masks:
        runs["ground truth"] = run_dir(params, "gt", None)
    return runs


def per_class_comparison(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Long table (class, run, iou) from ``{run name: fmalib.method.metrics.iou_table}``, for plots."""
    return pd.concat([t.assign(run=name)[["class", "run", "iou"]] for name, t in tables.items()], ignore_index=True)


def per_class_wide(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per class, one IoU column per run, plus the mean row (mIoU)."""
    wide = pd.DataFrame({name: t.set_index("class")["iou"] for name, t in tables.items()})
    wide.loc["mean (mIoU)"] = wide.mean(skipna=True)
    return wide


def loss_curves(runs: Mapping[str, str | os.PathLike]):
    """Training loss against iteration for each run (Detectron2's metrics.json)."""

    fig, ax = plt.subplots(figsize=(5, 3))
    for name, run in runs.items():
        m = [r for r in read_metrics(run) if "total_loss" in r]
        ax.plot([r["iteration"] + 1 for r in m], [r["total_loss"] for r in m], label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    return fig


def tta_variants(params, run: str | os.PathLike, split: str | None = None,
                 scales=(0.75, 1.0, 1.25)) -> pd.DataFrame:
    """mIoU of one trained model under single-scale, multi-scale + flip, and (if installed) + dense CRF."""
    single = evaluate_segmenter(params, run, split, scales=[1.0], flip=False, crf=False)
    # with and without CRF from one multi-scale + flip pass (the CRF refines the same probabilities)
    tta = evaluate_segmenter_crf_options(params, run, split, (False, True) if crf_available() else (False,),
                                         scales=list(scales), flip=True)
    names = [("single", "single scale"), ("tta", "multi-scale + flip"), ("tta_crf", "multi-scale + flip + CRF")]
    rows = [{"key": key, "inference": name, "mIoU": res["miou"], "Detectron2 mIoU": res["d2_miou"]}
            for (key, name), res in zip(names, [single, *tta])]
    if not crf_available():
        rows.append({"key": "tta_crf", "inference": "+ CRF: skipped (pydensecrf2 not installed)", "mIoU": np.nan,
                     "Detectron2 mIoU": np.nan})
    return pd.DataFrame(rows).set_index("key")


def qualitative_figure(params, runs: Mapping[str, str | os.PathLike], split: str | None = None, n: int = 6):
    """Rows of image | ground truth (where the split has masks) | each run's prediction (single scale), for the
    first ``n`` images."""

    split = split or params["data"]["val_split"]
    ds = open_dataset(params, split)
    models = {name: load_segmenter(params, run, scales=[1.0], flip=False, crf=False) for name, run in runs.items()}
    images, titles = [], []
    for i in range(min(n, len(ds))):
        item = ds[i]
        images.append(item["image"])
        titles.append(item["id"])
        if ds.has_masks:
            images.append(overlay(item["image"], item["gt"]))
            titles.append("ground truth")
        for name, model in models.items():
            images.append(overlay(item["image"], model.predict(item["image"])))
            titles.append(f"model trained on {name}")
    return image_grid(images, titles, ncols=1 + ds.has_masks + len(models))
