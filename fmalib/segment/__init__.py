"""Stage 2: a Detectron2 segmenter (SemanticFPN / DeepLabV3+) trained on the pseudo-labels, and evaluated.

    from fmalib.segment import train_segmenter, evaluate_segmenter, run_dir
    run = run_dir(params, "seeds", label_dir)          # workdir/stage2/seeds-<hash>
    train_segmenter(params, label_dir, run)           # label_dir=None: ground truth (upper bound)
    evaluate_segmenter(params, run, "val")["miou"]

Importing this package does not import Detectron2; the functions do, through ``compat.ensure_detectron2``
(install: ``make install`` / ``tools/install_detectron2.sh``). Command line: ``python -m fmalib stage2``.
"""
from .compat import detectron2_available, ensure_detectron2
from .evaluate import (Segmenter, crf_available, dense_crf, evaluate_labels, evaluate_segmenter,
                       evaluate_segmenter_crf_options, load_segmenter)
from .train import read_metrics, run_dir, train_segmenter

__all__ = ["detectron2_available", "ensure_detectron2", "Segmenter", "crf_available", "dense_crf",
           "evaluate_labels", "evaluate_segmenter", "evaluate_segmenter_crf_options", "load_segmenter",
           "read_metrics", "run_dir", "train_segmenter"]
