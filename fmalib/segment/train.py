"""Stage-2 training: Detectron2's ``DefaultTrainer`` on a registered label set, checkpointed and resumable.

``train_segmenter(params, label_dir, out_dir)`` trains on ``label_dir/<id>.png`` (fine seeds, or ground
truth for the upper bound) for every image of the train split. The run directory holds
``config.yaml``, Detectron2's checkpoints (``model_XXXXXXX.pth``, ``model_final.pth``, ``last_checkpoint``),
``metrics.json`` (Detectron2's per-iteration log) and ``done.json`` once finished. An interrupted run resumes
from its last checkpoint; a finished one with the same config is not retrained.

Multi-GPU: ``stage2.num_gpus: N`` (or ``--num-gpus N``) runs the same function under Detectron2's
``launch`` (one process per GPU, DDP, ``SyncBN`` if ``stage2.norm`` asks for it); ``batch_size`` is the total.
"""
from __future__ import annotations

import json
import logging
import os
import time
import weakref
from pathlib import Path

from ..core.cache import atomic_write_text, dir_fingerprint, file_fingerprint, stable_hash, strict_json
from ..core.code_key import code_digest
from ..core.errors import FmalibError
from ..core.params import Params, load_params
from ..data.fingerprint import split_key
from .compat import ensure_detectron2
from .config import build_config
from .datasets import SemSegMapper, class_names_with_background, register_gt, register_pseudo
from .weights import checkpointer_class

log = logging.getLogger(__name__)

DONE = "done.json"
# Detectron2 loggers whose INFO lines are noise here: the full model printout (config.yaml describes the
# model), the sampler and dataset serialisation. Progress (detectron2.utils.events) and checkpoints stay.
QUIET_LOGGERS = ("detectron2.engine.defaults", "detectron2.data.build", "detectron2.data.common",
                 "detectron2.evaluation.sem_seg_evaluation")


def _trainer_class():
    """Defined on first use: DefaultTrainer must not be imported before the compatibility bridges."""
    ensure_detectron2()
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.projects.deeplab import build_lr_scheduler
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter


    class Stage2Trainer(DefaultTrainer):
        """DefaultTrainer with fmalib's label mapper, poly/cosine LR, no periodic evaluation, bounded
        checkpoints, and no TensorBoard writer (the pure-Python install leaves tensorboard out)."""

        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=SemSegMapper.from_config(cfg, is_train=True))

        @classmethod
        def build_lr_scheduler(cls, cfg, optimizer):
            return build_lr_scheduler(cfg, optimizer)

        def build_writers(self):
            # metrics.json gets each logged iteration's own losses (window 1), the console a smoothed view
            out = self.cfg.OUTPUT_DIR
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(out, "metrics.json"), window_size=1)]

        def build_hooks(self):
            # called by DefaultTrainer.__init__ right after it made its checkpointer: swap in the one that
            # converts and checks stage2.weights, before the periodic-checkpoint hook takes it
            self.checkpointer = checkpointer_class()(
                self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                weights=self.cfg.MODEL.WEIGHTS or None, weights_style=self.cfg.FMALIB.WEIGHTS_STYLE)
            keep = []
            for h in super().build_hooks():
                if isinstance(h, hooks.EvalHook):
                    continue  # evaluation is fmalib.segment.evaluate, after training
                if isinstance(h, hooks.PeriodicCheckpointer):
                    h = hooks.PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                                   max_iter=self.max_iter, max_to_keep=1)
                if isinstance(h, hooks.PeriodicWriter):
                    h = hooks.PeriodicWriter(self.build_writers(), period=self.cfg.FMALIB.LOG_PERIOD)
                keep.append(h)
            return keep

    return Stage2Trainer


def _labels_key(label_dir) -> str:
    """The label set by content (a moved or copied folder keeps its runs; an edited label starts a new one)."""
    return "ground truth" if label_dir is None else dir_fingerprint(label_dir)


def quiet_detectron2_logs() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_dir(params, tag: str, label_dir: str | os.PathLike | None) -> Path:
    """``workdir/stage2/<tag>-<hash>``: one directory per (stage2 params, label set, data, seed)."""
    key = {"stage2": _training_key(params), "labels": _labels_key(label_dir),
           "data": split_key(params, params["data"]["train_split"]), "seed": params["seed"]}
    return params.resolve_path("workdir") / "stage2" / f"{tag}-{stable_hash(key, 10)}"


def _training_key(params) -> dict:
    """The stage2 settings that change the trained model (test-time options, workers and logging do not;
    the backbone weights by content, AMP only on CUDA) and the code that trains it."""
    stage2 = params["stage2"]
    key = {k: v for k, v in dict(stage2).items() if k not in (
        "labels", "test", "crf", "num_workers", "checkpoint_period", "log_period", "weights", "amp")}
    weights = params.resolve_path("stage2.weights") if stage2["weights"] else None
    key["weights"] = file_fingerprint(weights) if weights and weights.is_file() else stage2["weights"]  # missing:
    # the checkpointer names it
    if weights is None:  # the layout of weights that are not loaded
        del key["weights_style"]
    key["amp"] = bool(stage2["amp"]) and str(params["device"]).startswith("cuda")
    return {**key, "code": code_digest(__name__)}


def _as_params(params) -> Params:
    return params if isinstance(params, Params) else load_params(params)


def train_segmenter(params, label_dir: str | os.PathLike | None, out_dir: str | os.PathLike, resume: bool = True,
                    num_gpus: int | None = None) -> dict:
    """Train the stage-2 segmenter on ``label_dir`` (one PNG per train image; ``None``: the ground truth of
    the train split, the fully supervised upper bound); returns ``done.json``'s summary.

    ``resume``: continue from ``out_dir``'s last checkpoint (and skip a run that already finished with the
    same config); ``resume=False`` starts over from ``stage2.weights`` (or random initialisation).
    """
    params = _as_params(params)
    out_dir = Path(out_dir)
    num_gpus = num_gpus or params["stage2"]["num_gpus"]
    if num_gpus > 1 and not str(params["device"]).startswith("cuda"):
        raise FmalibError(f"stage2.num_gpus={num_gpus} needs device: cuda (params device={params['device']!r})")
    done = out_dir / DONE
    if resume and done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("config_hash") == _config_hash(params, label_dir, num_gpus):
            log.info("stage 2: %s already trained (%d iterations); not retraining", out_dir, summary["iters"])
            return summary
        log.warning("stage 2: %s was trained with other settings; resuming from its last checkpoint", out_dir)
    done.unlink(missing_ok=True)  # a run that stops before the end must not look finished
    ensure_detectron2()
    from detectron2.engine import launch

    args = (params.to_dict(), label_dir and str(label_dir), str(out_dir), resume, num_gpus)
    launch(_train_worker, num_gpus, dist_url="auto", args=args)
    if not done.is_file():
        raise FmalibError(f"stage 2 training in {out_dir} ended without writing {DONE}")
    return json.loads(done.read_text())


def _config_hash(params, label_dir, world_size) -> str:
    return stable_hash({"train": _training_key(params), "labels": _labels_key(label_dir),
                        "seed": params["seed"], "world": world_size,
                        "data": split_key(params, params["data"]["train_split"])})


def _train_worker(params_dict: dict, label_dir: str | None, out_dir: str, resume: bool, world_size: int) -> None:
    """One training process (the only one on CPU / one GPU; one per GPU under ``launch``)."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng


    quiet_detectron2_logs()
    params = load_params(params_dict)
    stage2 = params["stage2"]
    device = str(params["device"])
    if device.startswith("cuda") and world_size > 1:
        device = "cuda"  # launch has set each process's own GPU
    train_name = register_pseudo(params, label_dir) if label_dir else register_gt(params, params["data"]["train_split"])
    cfg = build_config(stage2, len(class_names_with_background(params)), train_dataset=train_name,
                       output_dir=out_dir, device=device, seed=params["seed"] + comm.get_rank(),
                       world_size=world_size)
    seed_all_rng(cfg.SEED)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if comm.is_main_process():
        saved = cfg.clone()
        saved.defrost()
        saved.OUTPUT_DIR = "."  # the run directory itself: the saved config names no machine path
        atomic_write_text(Path(out_dir) / "config.yaml", saved.dump())
    trainer = _trainer_class()(cfg)
    trainer.resume_or_load(resume=resume)
    start = trainer.start_iter
    t0 = time.perf_counter()
    if start < cfg.SOLVER.MAX_ITER:
        log.info("stage 2: training %s from iteration %d to %d in %s", stage2["model"], start, cfg.SOLVER.MAX_ITER,
                 out_dir)
        trainer.train()
    seconds = time.perf_counter() - t0
    if comm.is_main_process():
        ran = cfg.SOLVER.MAX_ITER - start
        summary = {"iters": cfg.SOLVER.MAX_ITER, "resumed_from": start, "seconds": seconds,
                   "backbone_weights": trainer.checkpointer.backbone_report,
                   "s_per_iter": _median_iter_time(Path(out_dir), start) or (seconds / ran if ran else None),
                   "final_loss": _last_loss(Path(out_dir)),
                   "labels": _labels_key(label_dir), "dataset": train_name,
                   "config_hash": _config_hash(params, label_dir, world_size)}
        atomic_write_text(Path(out_dir) / DONE, strict_json(summary, indent=1))
        log.info("stage 2: trained %s (%d iterations, %.2f s/iter) -> %s", stage2["model"], ran,
                 summary["s_per_iter"] or 0.0, out_dir)


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """Detectron2's per-iteration log of a run (``metrics.json``, one JSON object per line)."""
    path = Path(run) / "metrics.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median_iter_time(run: Path, start: int) -> float | None:
    """Detectron2's own per-iteration time (median over this session's logged iterations)."""
    times = sorted(m["time"] for m in read_metrics(run) if "time" in m and m["iteration"] >= start)
    return float(times[len(times) // 2]) if times else None


def _last_loss(run: Path) -> float | None:
    losses = [m["total_loss"] for m in read_metrics(run) if "total_loss" in m]
    return float(losses[-1]) if losses else None
