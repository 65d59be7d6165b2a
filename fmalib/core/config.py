"""Every params key, once: its type, its default (the paper's setting), a one-line meaning and its range.

One dataclass per section, read by OmegaConf as a structured config (``fmalib.core.params`` merges the YAML
overlays onto it). A params file states only what differs from these defaults; ``docs/params.md`` is generated
from this module (``python -m fmalib.core.config``) and a test keeps it equal.

Defaults are the paper's (FMA-WSSS on VOC with ViT-B/16 and SAM ViT-H, the original's configs) wherever the
key exists there; fmalib's own keys (the tiny models' pretraining, stage 2's Detectron2 settings) default to the
values the study uses. ``MISSING`` keys have no sensible default: every params file must state them.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

from omegaconf import MISSING

Check = tuple[Callable[[Any], bool], str]


def _rule(test: Callable[[Any], bool], expected: str) -> Check:
    return test, expected


def at_least(lo: int) -> Check:
    return _rule(lambda v: v >= lo, f">= {lo}")


POSITIVE = _rule(lambda v: v > 0, "> 0")
NON_NEGATIVE = at_least(0)
UNIT = _rule(lambda v: 0 <= v <= 1, "in [0, 1]")
HALF_OPEN_UNIT = _rule(lambda v: 0 <= v < 1, "in [0, 1)")


def one_of(*choices: Any) -> Check:
    return _rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def key(default: Any, doc: str, check: Check | None = None, length: int | None = None,
        pair: bool = False, non_empty: bool = False) -> Any:
    """A dataclass field with its meaning (``doc``) and its range (``check`` per value or per list entry;
    ``length``: a list of exactly that many; ``pair``: [min, max] with min <= max; ``non_empty``)."""
    meta = {"doc": doc, "check": check, "length": length, "pair": pair, "non_empty": non_empty}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


@dataclass
class Synthetic:
    n_train: int = key(400, "generated train images (ids 0..n_train-1)", at_least(1))
    n_val: int = key(150, "generated val images (ids after train)", at_least(1))
    size_min: int = key(112, "shorter side drawn from [size_min, size_max] px", at_least(1))
    size_max: int = key(128, "longer bound of the image side (px)", at_least(1))
    seed: int = key(0, "generator seed")


@dataclass
class Data:
    kind: str = key(MISSING, "dataset reader", one_of("synthetic", "voc", "coco", "tags"))
    root: str = key(MISSING, "dataset folder (relative paths from the repo root)")
    train_split: str = key("train_aug", "split the prompts and seeds are made on")
    val_split: str = key("val", "split every score is reported on")
    synthetic: Synthetic = section(Synthetic, "the generated benchmark (data.kind synthetic)")
    tags: Dict[str, Any] = key(
        {}, "data.kind tags: split -> {images: folder, tags: .csv or .jsonl file (absent: one sub-folder per "
            "class), masks: optional folder of <id>.png for evaluation, ids in classes.names order}, paths "
            "relative to data.root")
    untagged: str = key("refuse", "data.kind tags: a listed image with no tag is an error (refuse) or kept as "
                                  "background only (background)", one_of("refuse", "background"))


@dataclass
class Classes:
    names: Optional[List[str]] = key(None, "foreground class names, ids 1..C in this order; required except for "
                                           "data.kind tags (null: the tags' names, sorted)", non_empty=True)
    synonyms: Optional[List[str]] = key(None, "per class, CLIP-ES's comma-separated synonyms (the prompt's name); "
                                              "null: the names")
    bg_words: List[str] = key(MISSING, "background prompts' words (CLIP-ES's list for VOC / COCO)")


@dataclass
class Clip:
    model: str = key("ViT-B-16-quickgelu", "open_clip config (OpenAI's ViT-B/16 uses QuickGELU)")
    checkpoint: Optional[str] = key(None, "weights: OpenAI's TorchScript file or an open_clip state dict; "
                                          "null = random init (speed checks only)")


@dataclass
class Sam:
    model_type: str = key("vit_h", "segment_anything registry name (vit_h | vit_l | vit_b | fmalib_tiny)")
    checkpoint: Optional[str] = key(None, "SAM weights (Meta's .pth); null = random init (speed checks only)")


@dataclass
class Sam2:
    config: str = key("sam2.1_hiera_l", "the sam2 package's config (used when masks.generator is sam2)")
    checkpoint: Optional[str] = key(None, "Meta's SAM 2 release file; null = random init")
    image_size: int = key(1024, "SAM 2's input side, a multiple of 32", at_least(32))


@dataclass
class ClipEval:
    n_images: int = key(300, "val images the pretrained CLIP's quality is measured on", at_least(1))


@dataclass
class FoundationClip:
    seed: int = key(0, "pretraining seed")
    pool_size: int = key(16000, "generated pretraining images (from pool_offset on)", at_least(1))
    pool_offset: int = key(2000000, "first pool index: disjoint from every study split", NON_NEGATIVE)
    steps: int = key(800, "optimiser steps", at_least(1))
    batch_size: int = key(64, "images per step", at_least(1))
    lr: float = key(0.001, "AdamW learning rate", POSITIVE)
    weight_decay: float = key(0.05, "AdamW weight decay", NON_NEGATIVE)
    warmup_steps: int = key(40, "linear warm-up steps", NON_NEGATIVE)
    patch_loss: str = key("mil_value", "image-label loss on the patch tokens (dense uses generator masks)",
                          one_of("mil_value", "mil", "dense", "none"))
    pool: str = key("patch_mean", "embedding the caption / concept losses train",
                    one_of("patch_mean", "class_token", "both"))
    concept_templates: List[str] = key(["a {}.", "a photo of a {}.", "a picture of the {}.", "{}",
                                        "there is a {} here.", "a small {}.", "an image with a {}."],
                                       "concept-loss templates (never the study's hand template)")
    caption_weight: float = key(0.5, "weight of the caption contrastive loss", NON_NEGATIVE)
    concept_weight: float = key(1.0, "weight of the concept loss", NON_NEGATIVE)
    patch_weight: float = key(1.0, "weight of the patch loss", NON_NEGATIVE)
    checkpoint_every_s: int = key(180, "seconds between resumable checkpoints (0: every step)", NON_NEGATIVE)
    eval_every: int = key(200, "steps between val quality checks (0: only at the end)", NON_NEGATIVE)
    output: str = key("assets/tiny_clip_d12.pt", "where the exported open_clip state dict goes")
    fp16: bool = key(True, "export in fp16 (half the file)")
    eval: ClipEval = section(ClipEval, "quality check")


@dataclass
class SamEval:
    n_images: int = key(40, "val images the pretrained SAM's recall is measured on", at_least(1))
    recall_iou: float = key(0.7, "IoU at which an object counts as recalled", UNIT)


@dataclass
class FoundationSam:
    seed: int = key(0, "pretraining seed")
    index_offset: int = key(3000000, "first generated index: outside the splits and CLIP's pool", NON_NEGATIVE)
    steps: int = key(4000, "optimiser steps", at_least(1))
    batch_size: int = key(8, "images per step", at_least(1))
    points_per_image: int = key(8, "prompt points per image", at_least(1))
    object_point_fraction: float = key(0.75, "points on objects (the rest uniform: stuff regions)", UNIT)
    object_only_steps: int = key(300, "curriculum: object points only for these first steps", NON_NEGATIVE)
    lr: float = key(0.0015, "AdamW learning rate", POSITIVE)
    weight_decay: float = key(0.05, "AdamW weight decay", NON_NEGATIVE)
    warmup_steps: int = key(100, "linear warm-up steps", NON_NEGATIVE)
    bce_weight: float = key(1.0, "mask BCE weight (SAM's focal:dice 20:1 collapsed from scratch)", NON_NEGATIVE)
    dice_weight: float = key(1.0, "mask dice weight", NON_NEGATIVE)
    iou_weight: float = key(1.0, "IoU-head MSE weight", NON_NEGATIVE)
    checkpoint_every: int = key(100, "steps between resumable checkpoints", at_least(1))
    output: str = key("assets/tiny_sam.pth", "where the exported segment_anything state dict goes")
    fp16: bool = key(False, "export in fp16")
    eval: SamEval = section(SamEval, "quality check")


@dataclass
class Foundation:
    clip: FoundationClip = section(FoundationClip, "the tiny CLIP's pretraining (fmalib/pretrain/clip.py)")
    sam: FoundationSam = section(FoundationSam, "the tiny SAM's pretraining (fmalib/pretrain/sam.py)")


@dataclass
class PromptsCls:
    iters: int = key(1800, "iterations (VOC; COCO 20,500)", at_least(1))
    warmup_iters: int = key(500, "constant warmup_lr for these, then cosine from lr to 0", NON_NEGATIVE)
    warmup_lr: float = key(1.0e-5, "learning rate during warm-up", NON_NEGATIVE)
    lr: float = key(1.0e-3, "peak learning rate (SGD)", POSITIVE)
    weight_decay: float = key(5.0e-4, "SGD weight decay", NON_NEGATIVE)
    init_std: float = key(0.015, "context vectors drawn from N(0, init_std)", POSITIVE)
    loss: str = key("absent_fg", "contrastive negatives: the image's absent classes (the original's) or "
                                 "the background prompts (ablation)", one_of("absent_fg", "bg_negatives"))
    sub_batches: int = key(1, "gradient accumulation: each batch in this many sub-batches, each loss averaged over "
                              "its own sub-batch, then / sub_batches (the original's sub_iter_num; COCO 4)",
                           at_least(1))
    cam_iter: Optional[int] = key(None, "the iteration whose contexts give the CAMs; null = the last (the "
                                        "original's COCO: 6,150 of 20,500)", at_least(1))


@dataclass
class PromptsSeg:
    iters: int = key(17000, "iterations (VOC; COCO 75,000)", at_least(1))
    warmup_iters: int = key(500, "constant warmup_lr for these, then cosine from lr to 0", NON_NEGATIVE)
    warmup_lr: float = key(1.0e-5, "learning rate during warm-up", NON_NEGATIVE)
    lr: float = key(1.0e-3, "peak learning rate (SGD)", POSITIVE)
    weight_decay: float = key(5.0e-4, "SGD weight decay", NON_NEGATIVE)
    init_std: float = key(0.0125, "context vectors drawn from N(0, init_std)", POSITIVE)
    layout: str = key("specific_front", "specific_front: a context per class, name first (VOC); shared_end: "
                                        "one context, name last (COCO)", one_of("specific_front", "shared_end"))
    pairs: str = key("crop", "(image, class) pairs: classes in the cropped seed map (VOC) or the image "
                             "labels (COCO)", one_of("crop", "image"))
    sub_batches: int = key(1, "gradient accumulation: each batch in this many sub-batches, each loss averaged over "
                              "its own sub-batch, then / sub_batches (the original's sub_iter_num; COCO 8)",
                           at_least(1))
    cam_iter: Optional[int] = key(None, "the iteration whose contexts give the CAMs; null = the last (the "
                                        "original's COCO: 45,000 of 75,000)", at_least(1))


@dataclass
class ColorJitter:
    brightness: float = key(25.0, "add U(-b, b) to every channel (0-255 scale)", NON_NEGATIVE)
    contrast: List[float] = key([0.6, 1.4], "multiply every channel by U(lo, hi), no mean centring", POSITIVE,
                                length=2, pair=True)
    saturation: List[float] = key([0.5, 1.5], "multiply HSV saturation by U(lo, hi)", POSITIVE, length=2, pair=True)
    hue: float = key(25.0, "add U(-h, h) to the hue on a 0-255 scale, clipped, not wrapped", NON_NEGATIVE)
    p: float = key(0.5, "probability of each of the four; they run in a random order", UNIT)


@dataclass
class Prompts:
    n_ctx: int = key(16, "learned context vectors M", at_least(1))
    hand_template: str = key("a clean origami {}.", "CLIP-ES's hand prompt (the baseline)")
    batch_size: int = key(16, "images per iteration", at_least(1))
    momentum: float = key(0.9, "SGD momentum", HALF_OPEN_UNIT)
    crop_size: int = key(224, "random square crop = the CLIP's input side (px)", at_least(1))
    long_side: List[int] = key([288, 480], "the long side is rescaled uniformly within [min, max] px",
                               at_least(1), length=2, pair=True)
    color_jitter: ColorJitter = section(ColorJitter, "AlchemyCat's RandColorJitter on the uint8 image, before the "
                                                     "rescale")
    flip: bool = key(True, "random horizontal flip")
    amp: bool = key(True, "mixed precision (CUDA only)")
    num_workers: int = key(4, "data-loader workers", NON_NEGATIVE)
    ckpt_every: int = key(500, "iterations between resumable checkpoints", at_least(1))
    cls: PromptsCls = section(PromptsCls, "classification prompts: shared context, name last, contrastive loss")
    seg: PromptsSeg = section(PromptsSeg, "segmentation prompts: trained on the coarse seeds, CAM loss")


@dataclass
class PerKindStr:
    hand: str = key("normalized", "hand prompts", one_of("normalized", "raw"))
    cls: str = key("normalized", "cls prompts (the original's COCO: raw)", one_of("normalized", "raw"))
    seg: str = key("raw", "seg prompts", one_of("normalized", "raw"))


@dataclass
class PerKindCaa:
    hand: bool = key(True, "hand prompts: CLIP-ES's baseline")
    cls: bool = key(True, "cls prompts: the coarse seeds")
    seg: bool = key(True, "seg prompts: the fine seeds (the original's COCO: false)")


@dataclass
class PerKindThreshold:
    hand: float = key(0.4, "hand prompts", UNIT)
    cls: float = key(0.4, "cls prompts", UNIT)
    seg: float = key(0.5, "seg prompts", UNIT)


@dataclass
class PerKindSinkhorn:
    hand: int = key(3, "hand prompts: CLIP-ES's own refinement (its baseline)", NON_NEGATIVE)
    cls: int = key(1, "cls prompts (FMA-WSSS)", NON_NEGATIVE)
    seg: int = key(1, "seg prompts (FMA-WSSS)", NON_NEGATIVE)


@dataclass
class Cam:
    target: str = key("prob", "Grad-CAM backpropagates the softmax probability or the scaled score",
                      one_of("prob", "score"))
    target_layer: str = key("ln1_out", "Grad-CAM activation: the last block's ln_1 output (the original's) or "
                                       "the tokens entering it", one_of("ln1_out", "block_input"))
    caa_source: PerKindStr = section(PerKindStr, "the CAM that CAA propagates: normalized | raw, per prompt kind")
    caa_last_k: int = key(8, "CAA: mean attention of the last k blocks (all if fewer)", at_least(1))
    sinkhorn_iters: PerKindSinkhorn = section(PerKindSinkhorn, "Sinkhorn iterations of CAA's affinity, per prompt "
                                                                "kind")
    caa_threshold: PerKindThreshold = section(PerKindThreshold, "CAA box threshold on the normalised CAM")
    use_caa: PerKindCaa = section(PerKindCaa, "downstream stages read the CAA-refined CAMs, per prompt kind")
    bg_thresholds: List[float] = key([round(0.05 * i, 2) for i in range(1, 20)],
                                     "background thresholds of the CAM-argmax seed sweep", UNIT, non_empty=True)
    max_side: Optional[int] = key(512, "CLIP input's long side capped at this (attention memory grows with "
                                       "side^4); null = no cap", _rule(lambda v: v >= 32, ">= 32 (px; or null)"))


@dataclass
class Masks:
    generator: str = key("sam", "sam: segment_anything with the sam block (the paper's); sam2: the sam2 block",
                         one_of("sam", "sam2"))
    points_per_side: int = key(32, "point grid of the automatic generator", at_least(1))
    points_per_batch: int = key(256, "points decoded at once (speed only)", at_least(1))
    pred_iou_thresh: float = key(0.86, "minimum predicted IoU", UNIT)
    stability_score_thresh: float = key(0.92, "minimum stability score", UNIT)
    stability_score_offset: float = key(1.0, "logit offset of the stability score", NON_NEGATIVE)
    box_nms_thresh: float = key(0.7, "box NMS IoU within a crop", UNIT)
    crop_n_layers: int = key(1, "crop layers (0: the whole image only)", NON_NEGATIVE)
    crop_n_points_downscale_factor: int = key(2, "point grid shrink per crop layer", at_least(1))
    crop_overlap_ratio: float = key(0.3413, "crop overlap (SAM's 512/1500)", HALF_OPEN_UNIT)
    crop_nms_thresh: float = key(0.7, "box NMS IoU across crops", UNIT)
    min_mask_region_area: int = key(100, "holes and islands below this many px removed", NON_NEGATIVE)
    whole_iou_bonus: float = key(0.1, "added to whole masks' predicted IoU before pred_iou_thresh")
    whole_nms_bonus: float = key(1.0, "added to whole masks' NMS score")
    overlap_thresh: float = key(0.3, "part / subpart kept if max |m ∩ kept| / |m| < this", UNIT)


@dataclass
class BgPower:
    coarse: Union[float, int, str] = key("auto", "coarse seeds: a number > 0, or auto (GT-free choice; the paper "
                                            "tuned 0.6 on VOC's GT)")
    fine: Union[float, int, str] = key("auto", "fine seeds: a number > 0, or auto (the paper: 0.7 on VOC)")


@dataclass
class Sams:
    bg_power: BgPower = section(BgPower, "SAMS background power p, per seed kind")
    power_grid: List[float] = key([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0],
                                  "candidates of auto and of the ablation's GT sweep", POSITIVE, non_empty=True)
    confident_hi: float = key(0.9, "auto: a normalised CAM >= hi is sure foreground (the CAM's peak)", UNIT)
    confident_lo: float = key(0.1, "auto: every normalised CAM <= lo is sure background", UNIT)
    power_images: int = key(500, "auto: the first n train images it looks at", at_least(1))
    levels: List[int] = key([0, 1, 2], "mask levels SAMS paints (0 subpart, 1 part, 2 whole)",
                            one_of(0, 1, 2), non_empty=True)


@dataclass
class Stage2Test:
    scales: List[float] = key([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "multi-scale inference", POSITIVE,
                              non_empty=True)
    flip: bool = key(True, "flip at test time")
    crf: bool = key(True, "dense CRF (pydensecrf2; skipped with a message if not installed)")


@dataclass
class Crf:
    iters: int = key(10, "mean-field iterations", NON_NEGATIVE)
    pos_xy: float = key(1.0, "Gaussian kernel's spatial std (DeepLab-v2's VOC setting)")
    pos_w: float = key(3.0, "Gaussian kernel's weight")
    bi_xy: float = key(67.0, "bilateral kernel's spatial std")
    bi_rgb: float = key(3.0, "bilateral kernel's colour std")
    bi_w: float = key(4.0, "bilateral kernel's weight")


@dataclass
class Stage2:
    labels: Optional[str] = key(None, "pseudo-label folder (<id>.png per train image); null = the fine seeds")
    model: str = key("deeplabv3plus", "Detectron2 segmenter", one_of("semantic_fpn", "deeplabv3plus"))
    backbone_depth: int = key(101, "ResNet depth", one_of(18, 34, 50, 101, 152))
    weights: Optional[str] = key(None, "ImageNet backbone checkpoint (.pkl / .pth); null = random init")
    weights_style: str = key("deeplab", "input convention of those weights",
                             one_of("torchvision", "msra", "deeplab"))
    norm: str = key("SyncBN", "backbone norm (SyncBN becomes BN on one GPU)",
                    one_of("BN", "SyncBN", "FrozenBN", "GN"))
    freeze_at: int = key(0, "ResNet stages frozen (0 when training from scratch)",
                         _rule(lambda v: 0 <= v <= 5, "in 0..5"))
    fpn_channels: int = key(256, "SemanticFPN width (DeepLab: ASPP = head width)", at_least(1))
    head_channels: int = key(256, "head width", at_least(1))
    loss: str = key("hard_pixel_mining", "cross_entropy | hard_pixel_mining (DeepLab head: top 20 % pixels)",
                    one_of("cross_entropy", "hard_pixel_mining"))
    iters: int = key(30000, "iterations", at_least(1))
    batch_size: int = key(16, "images per iteration, over all GPUs", at_least(1))
    lr: float = key(0.01, "SGD learning rate", POSITIVE)
    lr_schedule: str = key("poly", "poly (power 0.9) | cosine", one_of("poly", "cosine"))
    warmup_iters: int = key(0, "linear warm-up iterations", NON_NEGATIVE)
    momentum: float = key(0.9, "SGD momentum", HALF_OPEN_UNIT)
    weight_decay: float = key(0.0001, "SGD weight decay", NON_NEGATIVE)
    crop_size: int = key(512, "training crop side (px)", at_least(1))
    scale_range: List[float] = key([0.5, 2.0], "random rescale before the crop, [min, max]", POSITIVE,
                                   length=2, pair=True)
    flip: bool = key(True, "random horizontal flip")
    amp: bool = key(True, "mixed precision (CUDA only)")
    num_gpus: int = key(8, "> 1: Detectron2 launch, one process per GPU", at_least(1))
    num_workers: int = key(4, "data-loader workers", NON_NEGATIVE)
    checkpoint_period: int = key(2000, "iterations between checkpoints (the latest kept, for resuming)",
                                 at_least(1))
    log_period: int = key(20, "iterations between logged losses", at_least(1))
    test: Stage2Test = section(Stage2Test, "evaluation on val")
    crf: Crf = section(Crf, "dense CRF settings")


@dataclass
class Study:
    name: str = key(MISSING, "the study's name: reports/<name>/")
    seed: int = key(0, "seed of every random draw")
    device: str = key("cpu", "cpu, cuda or cuda:N")
    workdir: str = key(MISSING, "caches and stage outputs (relative paths from the repo root)")
    data: Data = section(Data, "the dataset")
    classes: Classes = section(Classes, "the classes and the words of the prompts")
    clip: Clip = section(Clip, "the CLIP (fmalib/models/clip.py)")
    sam: Sam = section(Sam, "the SAM (fmalib/models/sam.py)")
    sam2: Sam2 = section(Sam2, "SAM 2, used only when masks.generator is sam2 (fmalib/models/sam2.py)")
    foundation: Foundation = section(Foundation, "fmalib's own tiny CLIP and SAM pretraining")
    prompts: Prompts = section(Prompts, "CoOp prompt learning (fmalib/method/prompts.py, fmalib/stages/prompts.py)")
    cam: Cam = section(Cam, "Grad-CAM + CAA (fmalib/method/cam.py, fmalib/method/caa.py)")
    masks: Masks = section(Masks, "SAM automatic masks with levels (fmalib/method/generator.py)")
    sams: Sams = section(Sams, "SAMS seeding (fmalib/method/sams.py, fmalib/stages/seeds.py)")
    stage2: Stage2 = section(Stage2, "the Detectron2 segmenter on the pseudo-labels (fmalib/segment)")
    paper_settings: Dict[str, Any] = key({}, "dotted keys that put these params on the paper's settings "
                                             "(notebook 07's second column)")
    fast: Optional[str] = key(None, "overlay file --fast applies (a tiny slice: tests, smoke runs), relative "
                                    "to this file")
    variants: Dict[str, str] = key({}, "named overlay files kept for comparison (--variant NAME)")


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """``int``, ``a list of float``, ``float or str``, ``str or null`` for an annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, List):
        return f"a list of {type_name(args[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    if origin is Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def leaves(cls: type = Study, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every key (dotted, annotation, field), depth first in declaration order."""
    out = []
    types = hints(cls)
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp, f))
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def markdown() -> str:
    """docs/params.md: every key with its type, default and meaning."""
    lines = ["# Params: every key", "",
             "Generated from `fmalib/core/config.py` (`python -m fmalib.core.config > docs/params.md`); a test",
             "keeps it equal. Defaults are the paper's settings; `???` must be given by every params file.", ""]
    section_of = None
    for dotted, tp, f in leaves():
        top = dotted.split(".")[0]
        if top != section_of:
            section_of = top
            lines += ["", f"## `{top}`" if "." in dotted else "## top level", "",
                      "| key | type | default | meaning |", "|---|---|---|---|"]
        default = default_of(f)
        shown = "???" if default == MISSING else ("null" if default is None else default)
        if isinstance(shown, bool):
            shown = str(shown).lower()
        lines.append(f"| `{dotted}` | {type_name(tp)} | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
