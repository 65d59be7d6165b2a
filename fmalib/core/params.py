"""Load and validate a params YAML (params/toy.yaml, voc.yaml, coco.yaml).

Every params file is complete: it states every key in SCHEMA, and nothing else, so a typo or a missing
setting is an error at load time (naming the file and the dotted key) rather than a silent default.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import yaml

from .errors import FmalibError

# Spec language: a type (float also accepts int), a tuple of alternatives (None = null allowed),
# a one-element list [spec] for a list of items, or a dict for a nested mapping.
SCHEMA: dict[str, Any] = {
    "name": str,
    "seed": int,
    "device": str,
    "workdir": str,  # caches and stage outputs, relative to the repo root unless absolute
    "data": {
        "kind": str,  # synthetic | voc | coco
        "root": str,
        "train_split": str,
        "val_split": str,
        "synthetic": {"n_train": int, "n_val": int, "size_min": int, "size_max": int, "seed": int},
    },
    "classes": {
        "names": [str],  # foreground class names, ids 1..C in this order
        "synonyms": [str],  # per class, comma-separated CLIP-ES style synonyms
        "bg_words": [str],  # background prompts' words
    },
    "clip": {"model": str, "checkpoint": (str, None)},
    "sam": {"model_type": str, "checkpoint": (str, None)},
    # SAM 2, used when masks.generator is sam2 (fmalib/models/sam2.py): a config of the sam2 package
    # (sam2.1_hiera_t | _s | _b+ | _l, sam2_hiera_*), its checkpoint (null = random init: speed only), input size
    "sam2": {"config": str, "checkpoint": (str, None), "image_size": int},
    "foundation": {"clip": dict, "sam": dict},
    "prompts": {  # CoOp prompt learning (fmalib/method/prompts.py, fmalib/stages/prompts.py; METHOD §2-3)
        "n_ctx": int,
        "hand_template": str,  # CLIP-ES baseline, e.g. "a clean origami {}."
        "batch_size": int,
        "momentum": float,
        "crop_size": int,
        "long_side": [int],  # [min, max] of the rescaled long side
        "color_jitter": [float],  # brightness, contrast, saturation, hue
        "flip": bool,
        "amp": bool,  # CUDA only
        "num_workers": int,
        "ckpt_every": int,
        "cls": {"iters": int, "warmup_iters": int, "warmup_lr": float, "lr": float, "weight_decay": float,
                "init_std": float,
                "loss": str},  # absent_fg (the original's) | bg_negatives (ablation)
        "seg": {"iters": int, "warmup_iters": int, "warmup_lr": float, "lr": float, "weight_decay": float,
                "init_std": float,
                "layout": str,  # specific_front (VOC) | shared_end (COCO: one context, name last, bg words)
                "pairs": str},  # crop (VOC: classes in the cropped seed map) | image (COCO: image labels)
    },
    "cam": {  # Grad-CAM + CAA (fmalib/method/cam.py, fmalib/method/caa.py; METHOD §4)
        "target": str,  # prob | score
        "target_layer": str,  # ln1_out (the original's) | block_input
        "caa_source": {"hand": str, "cls": str, "seg": str},  # normalized | raw: the CAM that CAA propagates
        "caa_last_k": int,
        "sinkhorn_iters": int,
        "caa_threshold": {"hand": float, "cls": float, "seg": float},
        "use_caa": bool,
        "bg_thresholds": [float],  # CAM-argmax seed sweep (picked on train)
        "max_side": (int, None),  # CLIP input's long side capped at this (attention memory); null = no cap
    },
    "masks": {  # SAM automatic masks with levels (fmalib/method/generator.py; METHOD §5)
        "generator": str,  # sam (segment_anything, params.sam) | sam2 (the sam2 package, params.sam2)
        "points_per_side": int,
        "points_per_batch": int,
        "pred_iou_thresh": float,
        "stability_score_thresh": float,
        "stability_score_offset": float,
        "box_nms_thresh": float,
        "crop_n_layers": int,
        "crop_n_points_downscale_factor": int,
        "crop_overlap_ratio": float,
        "crop_nms_thresh": float,
        "min_mask_region_area": int,
        "whole_iou_bonus": float,  # + on whole masks' predicted IoU before pred_iou_thresh
        "whole_nms_bonus": float,  # + on whole masks' NMS score
        "overlap_thresh": float,  # part/subpart kept if max |m ∩ kept| / |m| < this
    },
    "sams": {  # SAMS seeding (fmalib/method/sams.py, fmalib/stages/seeds.py)
        "bg_power_coarse": (float, str),  # a number, or "auto": GT-free choice (fmalib.method.sams.choose_bg_power)
        "bg_power_fine": (float, str),
        "power_grid": [float],  # candidates for "auto" and the GT sweep of the ablation
        "confident_hi": float,  # "auto": normalised CAM >= hi is sure foreground
        "confident_lo": float,  # "auto": every normalised CAM <= lo is sure background
        "power_images": int,  # "auto": train images it looks at (the first n of the split)
        "levels": [int],  # mask levels SAMS paints (0 subpart, 1 part, 2 whole)
    },
    "stage2": {  # Detectron2 segmenter on the pseudo-labels (fmalib/segment; keys explained in params/toy.yaml)
        "labels": (str, None),  # pseudo-label folder to train on; null = the fine seeds notebook 06 recorded
        "model": str,  # semantic_fpn | deeplabv3plus
        "backbone_depth": int,  # ResNet 18 | 34 | 50 | 101 | 152
        "weights": (str, None),  # ImageNet backbone checkpoint, or null = random init
        "weights_style": str,  # torchvision | msra | deeplab: input convention of those weights
        "norm": str,  # BN | SyncBN | FrozenBN | GN
        "freeze_at": int,
        "fpn_channels": int,
        "head_channels": int,
        "loss": str,  # cross_entropy | hard_pixel_mining (DeepLab head)
        "iters": int,
        "batch_size": int,  # total over GPUs
        "lr": float,
        "lr_schedule": str,  # poly | cosine
        "warmup_iters": int,
        "momentum": float,
        "weight_decay": float,
        "crop_size": int,
        "scale_range": [float],
        "flip": bool,
        "amp": bool,
        "num_gpus": int,
        "num_workers": int,
        "checkpoint_period": int,
        "log_period": int,
        "test": {"scales": [float], "flip": bool, "crf": bool},
        "crf": {"iters": int, "pos_xy": float, "pos_w": float, "bi_xy": float, "bi_rgb": float, "bi_w": float},
    },
    # dotted-key overrides that put these params on the paper's settings where they depart from them
    # (the toy's measured departures; {} for voc/coco) — notebook 07's second column (fmalib.study.compare)
    "paper_settings": dict,
    # dotted-key overrides applied in fast mode (notebook tests, smoke runs): a tiny slice, few iterations
    "fast": dict,
    # named sets of dotted-key overrides kept for comparison (toy: the first tiny CLIP's recipe and weights);
    # ``with_variant(params, name)``, ``--variant name`` of the pretraining and bench scripts
    "variants": dict,
}


def repo_root() -> Path:
    """The checkout that holds params/ (fmalib is installed editable from it)."""
    return Path(__file__).resolve().parents[2]


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repo root when it lies inside it (what outputs record: no machine paths),
    else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(repo_root().resolve())) if p.is_absolute() else str(p)
    except ValueError:
        return str(p)


def default_report_dir(params: "Params") -> Path:
    """``reports/<params.name>``: where a params set's executed notebooks, figures and report go."""
    return repo_root() / "reports" / params["name"]


class Params(dict):
    """A validated params mapping with attribute access (``p.data.root``)."""

    path: Path | None = None

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def get_dotted(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def resolve_path(self, dotted: str) -> Path:
        """A path-valued key, relative paths taken from the repo root."""
        value = self.get_dotted(dotted)
        if value is None:
            raise FmalibError(f"params key {dotted} is null in {self.path}; expected a path")
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else repo_root() / p

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _wrap(node: Any) -> Any:
    if isinstance(node, Mapping):
        return Params({k: _wrap(v) for k, v in node.items()})
    if isinstance(node, list):
        return [_wrap(v) for v in node]
    return node


def _type_name(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join("null" if s is None else _type_name(s) for s in spec)
    if isinstance(spec, list):
        return f"a list of {_type_name(spec[0])}"
    if isinstance(spec, dict) or spec is dict:
        return "a mapping"
    return spec.__name__


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, tuple):
        return any(value is None if s is None else _matches(value, s) for s in spec)
    if isinstance(spec, list):
        return isinstance(value, list) and all(_matches(v, spec[0]) for v in value)
    if isinstance(spec, dict) or spec is dict:
        return isinstance(value, Mapping)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, spec)


def validate(tree: Mapping, schema: Mapping = SCHEMA, where: str = "params", prefix: str = "") -> None:
    """Raise FmalibError for the first unknown, missing or mistyped key (dotted name + expectation)."""
    unknown = sorted(set(tree) - set(schema))
    if unknown:
        raise FmalibError(f"{where}: unknown key {prefix}{unknown[0]} (allowed here: {', '.join(schema)})")
    for key, spec in schema.items():
        dotted = f"{prefix}{key}"
        if key not in tree:
            raise FmalibError(f"{where}: missing key {dotted} (expected {_type_name(spec)})")
        value = tree[key]
        if spec is dict or not _matches(value, spec):
            _check_float_strings(value, dotted, where, integer=_int_only(spec))
        if not _matches(value, spec):
            raise FmalibError(f"{where}: key {dotted} is {value!r}; expected {_type_name(spec)}")
        if isinstance(spec, dict):
            validate(value, spec, where, dotted + ".")


# YAML 1.1 (PyYAML) reads a float only with a dot in the mantissa and a signed exponent: 1e-3, 1.0e3 and 1E+3
# load as strings
_YAML11_FLOAT_STRING = re.compile(r"([-+]?)(\d*\.?\d*)[eE]([-+]?)(\d+)")


def _float_string_hint(value: Any, integer: bool = False) -> str | None:
    """``write 1.0e-3 (YAML reads 1e-3 as a string)`` for a string YAML 1.1 did not read as a float
    (``integer``: the key takes an int, so an integral value is suggested in plain digits)."""
    if not isinstance(value, str):
        return None
    m = _YAML11_FLOAT_STRING.fullmatch(value.strip())
    if not m or not any(c.isdigit() for c in m.group(2)):
        return None
    sign, mantissa, exp_sign, exp = m.groups()
    whole, _, frac = mantissa.partition(".")
    fixed = f"{sign}{whole or '0'}.{frac or '0'}e{exp_sign or '+'}{exp}"
    if integer and float(fixed).is_integer():
        fixed = str(int(float(fixed)))
    return f"write {fixed} (YAML reads {value} as a string)"


def _int_only(spec: Any) -> bool:
    """The spec takes ints (or a list of them) and no float."""
    if isinstance(spec, list):
        return _int_only(spec[0])
    alternatives = spec if isinstance(spec, tuple) else (spec,)
    return int in alternatives and float not in alternatives


def _check_float_strings(value: Any, dotted: str, where: str, integer: bool = False) -> None:
    """A number YAML 1.1 read as a string, anywhere in ``value`` (free mappings included), is an error."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_float_strings(v, f"{dotted}.{k}", where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_float_strings(v, f"{dotted}[{i}]", where, integer)
    elif (hint := _float_string_hint(value, integer)) is not None:
        raise FmalibError(f"{where}: key {dotted} is the string {value!r}, not a number: {hint}")


# --- value ranges: checked after the schema, so every key is there with its type -------------------------------
def _rule(test: Callable[[Any], bool], expected: str) -> tuple[Callable[[Any], bool], str]:
    return test, expected


def _at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return _rule(lambda v: v >= lo, f">= {lo}")


_POSITIVE = _rule(lambda v: v > 0, "> 0")
_NON_NEGATIVE = _at_least(0)
_UNIT = _rule(lambda v: 0 <= v <= 1, "in [0, 1]")
_MOMENTUM = _rule(lambda v: 0 <= v < 1, "in [0, 1)")

# dotted key -> (test, what is expected); a list value is tested item by item, a null value is not tested.
# Only keys where a bad value gives a raw traceback or a silently wrong result downstream; the string
# choices (cam.target, prompts.cls.loss, stage2.model, ...) are checked, with the key, where they are used.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompts.n_ctx": _at_least(1),
    "prompts.batch_size": _at_least(1),
    "prompts.momentum": _MOMENTUM,
    "prompts.crop_size": _at_least(1),
    "prompts.long_side": _at_least(1),
    "prompts.color_jitter": _NON_NEGATIVE,
    "prompts.num_workers": _NON_NEGATIVE,
    "prompts.ckpt_every": _at_least(1),
    **{f"prompts.{kind}.{key}": rule for kind in ("cls", "seg") for key, rule in (
        ("iters", _at_least(1)), ("warmup_iters", _NON_NEGATIVE), ("warmup_lr", _NON_NEGATIVE),
        ("lr", _POSITIVE), ("weight_decay", _NON_NEGATIVE), ("init_std", _POSITIVE))},
    "cam.caa_last_k": _at_least(1),
    "cam.sinkhorn_iters": _NON_NEGATIVE,
    "cam.caa_threshold.hand": _UNIT,
    "cam.caa_threshold.cls": _UNIT,
    "cam.caa_threshold.seg": _UNIT,
    "cam.bg_thresholds": _UNIT,
    "cam.max_side": _rule(lambda v: v >= 32, ">= 32 (px; or null for no cap)"),
    "masks.points_per_side": _at_least(1),
    "masks.points_per_batch": _at_least(1),
    "masks.pred_iou_thresh": _UNIT,
    "masks.stability_score_thresh": _UNIT,
    "masks.stability_score_offset": _NON_NEGATIVE,
    "masks.box_nms_thresh": _UNIT,
    "masks.crop_n_layers": _NON_NEGATIVE,
    "masks.crop_n_points_downscale_factor": _at_least(1),
    "masks.crop_overlap_ratio": _rule(lambda v: 0 <= v < 1, "in [0, 1)"),
    "masks.crop_nms_thresh": _UNIT,
    "masks.min_mask_region_area": _NON_NEGATIVE,
    "masks.overlap_thresh": _UNIT,
    "sams.power_grid": _POSITIVE,
    "sams.power_images": _at_least(1),
    "sams.levels": _rule(lambda v: v in (0, 1, 2), "0 (subpart), 1 (part) or 2 (whole)"),
    "stage2.backbone_depth": _rule(lambda v: v in (18, 34, 50, 101, 152), "one of 18, 34, 50, 101, 152"),
    "stage2.freeze_at": _rule(lambda v: 0 <= v <= 5, "in 0..5"),
    "stage2.fpn_channels": _at_least(1),
    "stage2.head_channels": _at_least(1),
    "stage2.iters": _at_least(1),
    "stage2.batch_size": _at_least(1),
    "stage2.lr": _POSITIVE,
    "stage2.warmup_iters": _NON_NEGATIVE,
    "stage2.momentum": _MOMENTUM,
    "stage2.weight_decay": _NON_NEGATIVE,
    "stage2.crop_size": _at_least(1),
    "stage2.scale_range": _POSITIVE,
    "stage2.num_gpus": _at_least(1),
    "stage2.num_workers": _NON_NEGATIVE,
    "stage2.checkpoint_period": _at_least(1),
    "stage2.log_period": _at_least(1),
    "stage2.test.scales": _POSITIVE,
    "stage2.crf.iters": _NON_NEGATIVE,
}
# list keys of a fixed length, or [lo, hi] pairs (lo <= hi)
LENGTHS = {"prompts.long_side": 2, "prompts.color_jitter": 4, "stage2.scale_range": 2}
PAIRS = ("prompts.long_side", "stage2.scale_range")
NON_EMPTY = ("classes.names", "cam.bg_thresholds", "sams.power_grid", "sams.levels", "stage2.test.scales")


def _get(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def check_device(device: str, where: str = "params") -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, CUDA only where torch sees it."""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if not m:
        raise FmalibError(f"{where}: key device is {device!r}; expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FmalibError(f"{where}: key device is {device!r} but CUDA is not available here; use device: cpu "
                              f"(or --device cpu)")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise FmalibError(f"{where}: key device is {device!r} but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def check_ranges(tree: Mapping, where: str = "params") -> None:
    """Raise FmalibError for the first value out of its range (dotted key, value, expected range)."""
    check_device(tree["device"], where)
    for dotted in NON_EMPTY:
        if not _get(tree, dotted):
            raise FmalibError(f"{where}: key {dotted} is empty; expected at least one entry")
    for dotted, n in LENGTHS.items():
        value = _get(tree, dotted)
        if len(value) != n:
            raise FmalibError(f"{where}: key {dotted} is {value!r}; expected {n} numbers")
    for dotted, (test, expected) in RANGES.items():
        value = _get(tree, dotted)
        for item in (value if isinstance(value, list) else [value]):
            if item is not None and not test(item):
                raise FmalibError(f"{where}: key {dotted} is {value!r}; expected {expected}"
                                  + (" for every entry" if isinstance(value, list) else ""))
    for dotted in PAIRS:
        lo, hi = _get(tree, dotted)
        if lo > hi:
            raise FmalibError(f"{where}: key {dotted} is {[lo, hi]!r}; expected [min, max] with min <= max")
    for stage in ("coarse", "fine"):
        value = tree["sams"][f"bg_power_{stage}"]
        if (isinstance(value, str) and value != "auto") or (not isinstance(value, str) and not value > 0):
            hint = _float_string_hint(value)
            raise FmalibError(f"{where}: key sams.bg_power_{stage} is {value!r}; expected a number > 0 or 'auto'"
                              + (f": {hint}" if hint else ""))
    names, synonyms = tree["classes"]["names"], tree["classes"]["synonyms"]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise FmalibError(f"{where}: key classes.names repeats {dup!r}; class names must be unique (ids 1..C)")
    if len(synonyms) != len(names):
        raise FmalibError(f"{where}: key classes.synonyms has {len(synonyms)} entries but classes.names has "
                          f"{len(names)}; expected one synonym string per class")
    if len(names) > 254:
        raise FmalibError(f"{where}: key classes.names has {len(names)} classes; at most 254 fit a label PNG "
                          f"(ids 1..254, 255 = ignore)")
    data = tree["data"]
    if data["kind"] == "synthetic":
        syn = data["synthetic"]
        for key in ("n_train", "n_val", "size_min"):
            if syn[key] < 1:
                raise FmalibError(f"{where}: key data.synthetic.{key} is {syn[key]!r}; expected >= 1")
        if syn["size_max"] < syn["size_min"]:
            raise FmalibError(f"{where}: keys data.synthetic.size_min = {syn['size_min']!r} and size_max = "
                              f"{syn['size_max']!r}: expected size_min <= size_max")


def _check_confident(sams: Mapping, where: str) -> None:
    """The GT-free bg-power criterion needs sure fg above sure bg: swapped keys would silently score p on
    the uncertain band instead."""
    hi, lo = sams["confident_hi"], sams["confident_lo"]
    if not (0.0 <= lo < hi <= 1.0):
        raise FmalibError(f"{where}: keys sams.confident_hi = {hi!r} and sams.confident_lo = {lo!r}: expected "
                          f"0 <= confident_lo < confident_hi <= 1 (swapped?)")


def _apply_override(tree: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise FmalibError(f"{where}: override {dotted}: {part} is not a mapping in the params")
        node = node[part]
    if parts[-1] not in node:
        raise FmalibError(f"{where}: override {dotted}: no such key in the params")
    node[parts[-1]] = value


def load_params(source: str | os.PathLike | Mapping, overrides: Mapping[str, Any] | None = None,
                origins: Mapping[str, str] | None = None) -> Params:
    """Read a params YAML (or take a mapping), apply dotted overrides ({'prompts.iters': 5}), validate.

    ``origins`` says where each override came from (``{"prompts.cls.iters": "--set"}``): an error about an
    overridden key names it instead of the file."""
    if isinstance(source, Mapping):
        tree, where, path = copy.deepcopy(dict(source)), "params", None
    else:
        path = Path(source)
        if not path.is_absolute() and not path.exists():
            path = repo_root() / path
        where = str(path)
        if not path.is_file():
            raise FmalibError(f"params file {path} does not exist (expected a YAML like params/toy.yaml)")
        try:
            tree = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise FmalibError(f"params file {path} is not a text file (not UTF-8; an image or a binary?); expected "
                              f"a YAML like params/toy.yaml") from None
        except yaml.YAMLError as exc:
            raise FmalibError(f"params file {path} is not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise FmalibError(f"params file {path} must hold a mapping at top level")
    for dotted, value in (overrides or {}).items():
        _apply_override(tree, dotted, value, f"{where} ({(origins or {}).get(dotted, 'override')})")
    try:
        validate(tree, SCHEMA, where)
        _check_confident(tree["sams"], where)
        check_ranges(tree, where)
    except FmalibError as exc:
        culprit = next((k for k in (origins or {}) if k in (overrides or {}) and
                        (f"key {k} " in str(exc) or f"key {k}." in str(exc))), None)
        if culprit is None:
            raise
        given = f"{origins[culprit]} {culprit}={overrides[culprit]!r}"
        raise FmalibError(str(exc).replace(f"{where}:", f"{given} (over {where}):", 1)) from None
    params = _wrap(tree)
    params.path = path
    return params


def with_variant(params: Params, name: str) -> Params:
    """``params`` with the dotted overrides of ``variants.<name>`` applied (validated like any params)."""
    variants = params["variants"]
    if name not in variants or not isinstance(variants[name], Mapping):
        raise FmalibError(f"{params.path or 'params'}: no variant {name!r} under variants (defined: "
                          f"{', '.join(variants) or 'none'})")
    out = load_params(params.to_dict(), dict(variants[name]))
    out.path = params.path
    return out
