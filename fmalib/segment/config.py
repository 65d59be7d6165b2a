"""Detectron2 configs for stage 2 (SemanticFPN, DeepLabV3+), built in code from the params' ``stage2`` section.

Nothing comes from Detectron2's model zoo YAMLs (the pure-Python build ships none, and no weights can be
downloaded): every setting that matters is set here from params, and the result is dumped next to the
checkpoints (``config.yaml``) so evaluation rebuilds the same model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from .compat import ensure_detectron2

log = logging.getLogger(__name__)

MODELS = ("semantic_fpn", "deeplabv3plus")
DEPTHS = (18, 34, 50, 101, 152)
NORMS = ("BN", "SyncBN", "FrozenBN", "GN")
LOSSES = ("cross_entropy", "hard_pixel_mining")
SCHEDULES = {"poly": "WarmupPolyLR", "cosine": "WarmupCosineLR"}

# Input convention of the backbone weights: channel order, pixel mean/std, and where ResNet's stride sits.
#   torchvision: torchvision's ImageNet ResNets converted with Detectron2's convert-torchvision-to-d2.py
#                (also the convention fmalib uses for random init: RGB, unit-variance inputs)
#   msra:        Detectron2's ImageNet R-50.pkl / R-101.pkl (MSRA caffe weights, BGR, no std)
#   deeplab:     Detectron2's DeepLab R-52.pkl / R-103.pkl (BGR with std, deeplab stem)
WEIGHTS_STYLES = {
    "torchvision": ("RGB", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], False),
    "msra": ("BGR", [103.53, 116.28, 123.675], [1.0, 1.0, 1.0], True),
    "deeplab": ("BGR", [103.53, 116.28, 123.675], [57.375, 57.12, 58.395], False),
}


def add_fmalib_config(cfg) -> None:
    """fmalib's own keys: the training augmentation its mapper applies (see datasets.SemSegMapper)."""
    from detectron2.config import CfgNode

    cfg.FMALIB = CfgNode()
    cfg.FMALIB.SCALE_RANGE = [1.0, 1.0]  # random rescale of the training image before cropping
    cfg.FMALIB.CROP_SIZE = 0  # square training crop (padded with ignore where the image is smaller)
    cfg.FMALIB.FLIP = True  # random horizontal flip
    cfg.FMALIB.LOG_PERIOD = 20  # iterations between metrics.json / console lines
    cfg.FMALIB.WEIGHTS_STYLE = "torchvision"  # layout of MODEL.WEIGHTS (fmalib.segment.weights converts / checks)


def _check(stage2: Mapping, key: str, allowed) -> None:
    if stage2[key] not in allowed:
        raise FmalibError(f"params stage2.{key}={stage2[key]!r}; expected one of {list(allowed)}")


def build_config(stage2: Mapping, num_classes: int, *, train_dataset: str | None = None,
                 output_dir: str | Path | None = None, device: str = "cpu", seed: int = 0, world_size: int = 1):
    """A frozen Detectron2 ``CfgNode`` for ``stage2`` params; ``num_classes`` includes background.

    SemanticFPN: ResNet-FPN backbone (``fpn_channels`` wide) + ``SemSegFPNHead`` (``head_channels``, GN).
    DeepLabV3+: ResNet-50/101/152 take Detectron2-DeepLab's backbone (deeplab stem, dilated res5 with
    multi-grid 1-2-4, output stride 16); ResNet-18/34 take the standard backbone (output stride 32),
    since Detectron2's DeepLab backbone has no basic-block variant. Both heads read ``res2`` + ``res5``.
    """
    ensure_detectron2()
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    for key, allowed in (("model", MODELS), ("backbone_depth", DEPTHS), ("norm", NORMS), ("loss", LOSSES),
                         ("lr_schedule", SCHEDULES), ("weights_style", WEIGHTS_STYLES)):
        _check(stage2, key, allowed)
    if len(stage2["scale_range"]) != 2 or not 0 < stage2["scale_range"][0] <= stage2["scale_range"][1]:
        raise FmalibError(f"params stage2.scale_range={stage2['scale_range']}; expected [low, high], 0 < low <= high")
    weights = stage2["weights"]
    if weights is not None and not Path(weights).is_file():
        raise FmalibError(f"params stage2.weights={weights!r}: no such file (an ImageNet backbone checkpoint "
                          f"Detectron2 can load, .pkl or .pth; or null for random initialisation)")

    depth = stage2["backbone_depth"]
    norm = stage2["norm"]
    if norm == "SyncBN" and world_size == 1:
        log.info("stage2.norm=SyncBN with one process: using BN (SyncBN needs distributed training)")
        norm = "BN"

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_fmalib_config(cfg)
    cfg.SEED = int(seed)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.META_ARCHITECTURE = "SemanticSegmentor"
    cfg.MODEL.WEIGHTS = str(weights) if weights else ""
    fmt, mean, std, stride_in_1x1 = WEIGHTS_STYLES[stage2["weights_style"]]
    cfg.INPUT.FORMAT = fmt
    cfg.MODEL.PIXEL_MEAN = mean
    cfg.MODEL.PIXEL_STD = std

    res = cfg.MODEL.RESNETS
    res.DEPTH = depth
    res.NORM = norm
    res.STRIDE_IN_1X1 = stride_in_1x1
    res.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.BACKBONE.FREEZE_AT = stage2["freeze_at"]

    head = cfg.MODEL.SEM_SEG_HEAD
    head.NUM_CLASSES = num_classes
    head.IGNORE_VALUE = IGNORE
    head.COMMON_STRIDE = 4
    head.LOSS_WEIGHT = 1.0
    if stage2["model"] == "semantic_fpn":
        res.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.OUT_CHANNELS = stage2["fpn_channels"]
        head.NAME = "SemSegFPNHead"
        head.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        head.CONVS_DIM = stage2["head_channels"]
        head.NORM = "GN"
    else:
        res.OUT_FEATURES = ["res2", "res5"]
        if depth >= 50:
            cfg.MODEL.BACKBONE.NAME = "build_resnet_deeplab_backbone"
            # the 3-conv deeplab stem only where the weights have it (Detectron2's R-52/R-103.pkl)
            deeplab_stem = stage2["weights_style"] == "deeplab"
            res.STEM_TYPE = "deeplab" if deeplab_stem else "basic"
            res.STEM_OUT_CHANNELS = 128 if deeplab_stem else 64
            res.RES5_DILATION = 2
            res.RES5_MULTI_GRID = [1, 2, 4]
        else:
            cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
            res.RES5_DILATION = 1
        head.NAME = "DeepLabV3PlusHead"
        head.IN_FEATURES = ["res2", "res5"]
        head.PROJECT_FEATURES = ["res2"]
        head.PROJECT_CHANNELS = [48]
        head.CONVS_DIM = stage2["head_channels"]
        head.ASPP_CHANNELS = stage2["head_channels"]
        head.ASPP_DILATIONS = [6, 12, 18]
        head.ASPP_DROPOUT = 0.1
        head.NORM = "GN" if norm == "FrozenBN" else norm
        head.LOSS_TYPE = stage2["loss"]

    # fmalib's own mapper does the augmentation (fmalib.segment.datasets.SemSegMapper); with Detectron2's
    # CROP disabled, DeepLab's ASPP pools globally, so any test size works.
    cfg.INPUT.CROP.ENABLED = False
    cfg.FMALIB.SCALE_RANGE = [float(x) for x in stage2["scale_range"]]
    cfg.FMALIB.CROP_SIZE = stage2["crop_size"]
    cfg.FMALIB.FLIP = bool(stage2["flip"])
    cfg.FMALIB.LOG_PERIOD = max(1, stage2["log_period"])
    cfg.FMALIB.WEIGHTS_STYLE = stage2["weights_style"]
    cfg.DATASETS.TRAIN = (train_dataset,) if train_dataset else ()
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = stage2["num_workers"]
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False

    sol = cfg.SOLVER
    sol.IMS_PER_BATCH = stage2["batch_size"]
    sol.BASE_LR = float(stage2["lr"])
    sol.MOMENTUM = float(stage2["momentum"])
    sol.WEIGHT_DECAY = float(stage2["weight_decay"])
    sol.WEIGHT_DECAY_NORM = 0.0
    sol.MAX_ITER = stage2["iters"]
    sol.LR_SCHEDULER_NAME = SCHEDULES[stage2["lr_schedule"]]
    sol.POLY_LR_POWER = 0.9
    sol.POLY_LR_CONSTANT_ENDING = 0.0
    sol.WARMUP_ITERS = min(stage2["warmup_iters"], stage2["iters"])
    sol.WARMUP_FACTOR = 0.01
    sol.STEPS = ()
    sol.CHECKPOINT_PERIOD = max(1, stage2["checkpoint_period"])
    sol.AMP.ENABLED = bool(stage2["amp"]) and device.startswith("cuda")
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(output_dir) if output_dir else ""
    cfg.freeze()
    return cfg


def load_config(path: str | Path, device: str | None = None):
    """The config a training run dumped (``<run>/config.yaml``), optionally moved to another device."""
    ensure_detectron2()
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"{path} does not exist: expected the config.yaml a stage-2 training run writes")
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_fmalib_config(cfg)
    cfg.merge_from_file(str(path))
    if device:
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg
