"""Numbers a notebook reports, kept as JSON beside its executed copy — the one contract between the notebooks,
the HTML report and stage 2.

``SCHEMA`` lists, per notebook, every field it may record and its type. ``record(out_dir, "04_coarse_seeds",
coarse_seed_miou=0.61)`` checks names and types before writing ``results/<notebook>.json``;
``result(out_dir, notebook, field)`` reads one value and says which notebook to run when it is missing. A
misspelt notebook or field is an error naming both, at record time and at read time. One file per notebook
keeps concurrent or partial reruns from clobbering each other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..core.cache import atomic_write_text, strict_json
from ..core.errors import FmalibError
from ..core.params import repo_relative, repo_root

F, I, S, B, D = float, int, str, bool, dict  # the JSON types a field may hold (float also takes int)

SCHEMA: dict[str, dict[str, type]] = {
    "00_data": {"kind": S, "n_train": I, "n_val": I, "classes": I, "cooc_boat_water": F, "cooc_kite_sky": F,
                "cooc_car_road": F, "cooc_house_grass": F, "train_has_masks": B, "val_has_masks": B},
    "01_foundation_models": {"clip_model": S, "clip_params_m": F, "clip_activation": S, "sam_model_type": S,
                             "sam_params_m": F, "zero_shot_images": I, "zero_shot_top1_is_label": F,
                             "sam_preview_masks_per_image": F, "sam_preview_s_per_image": F,
                             "clip_zero_shot_map": F, "clip_cam_hit_rate": F, "sam_point_best_of_3": F},
    "02_sam_masks": {"images": I, "masks_per_image": F, "subpart_per_image": F, "part_per_image": F,
                     "whole_per_image": F, "region_recall_iou50": F, "cache_bytes_per_image": F,
                     "raw_bitpacked_bytes_per_image": F, "sam_random_init": B},
    "03_cls_prompts": {"cls_iters": I, "cls_iters_per_s": F, "cls_loss_first": F, "cls_loss_last": F,
                       "cls_fg_similarity_first": F, "cls_fg_similarity_last": F, "context_path": S,
                       "hand_map": F, "cls_map": F, "hand_map_vs_bg": F, "cls_map_vs_bg": F,
                       "hand_seed_miou": F, "hand_caa_seed_miou": F, "cls_seed_miou": F, "cls_caa_seed_miou": F},
    "04_coarse_seeds": {"label_dir": S, "bg_power": F, "fallback_images": I, "coarse_seed_miou": F,
                        "cam_argmax_miou": F, "cam_argmax_bg_threshold": F, "gain_points": F,
                        "gt_best_bg_power": F, "gt_best_miou": F, "seed_fg_pixel_share": F,
                        "seed_empty_image_share": F},
    "05_seg_prompts": {"seg_seeds_source": S, "seg_seeds_dir": S, "seg_seeds_miou": F, "seg_iters": I,
                       "seg_iters_per_s": F, "seg_loss_first": F, "seg_loss_last": F, "context_path": S,
                       "seg_seed_miou": F, "seg_caa_seed_miou": F, "cls_caa_seed_miou": F},
    "06_fine_seeds": {"label_dir": S, "n_labels": I, "bg_power": F, "fallback_images": I, "fine_seed_miou": F,
                      "coarse_seed_miou": F, "cam_argmax_miou": F, "cam_argmax_bg_threshold": F,
                      "gain_points": F, "gt_best_bg_power": F, "gt_best_miou": F, "seed_fg_pixel_share": F,
                      "seed_empty_image_share": F},
    "07_ablations": {"levels_whole_miou": F, "levels_whole_part_miou": F, "cls_loss_variants": D,
                     "bg_negatives_cls_seed_miou": F, "bg_negatives_cls_caa_seed_miou": F, "settings": D},
    "08_stage2": {"seeds_val_miou": F, "gt_val_miou": F, "ratio": F, "seed_train_miou": F,
                  "seeds_s_per_iter": F, "gt_s_per_iter": F, "seeds_val_miou_single": F,
                  "seeds_val_miou_tta": F, "seeds_val_miou_tta_crf": F},
}


def check_field(notebook: str, field: str) -> type:
    """The declared type of ``notebook``'s ``field``; an error naming both when either is not in SCHEMA."""
    if notebook not in SCHEMA:
        raise FmalibError(f"results: no notebook {notebook!r}; expected one of {', '.join(SCHEMA)}")
    if field not in SCHEMA[notebook]:
        raise FmalibError(f"results: notebook {notebook} has no field {field!r}; its fields are "
                          f"{', '.join(SCHEMA[notebook])} (add new ones to fmalib.study.results.SCHEMA)")
    return SCHEMA[notebook][field]


def _check_value(notebook: str, field: str, value: Any) -> Any:
    kind = check_field(notebook, field)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
        isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind)
    if not ok:
        raise FmalibError(f"results: {notebook}.{field} = {value!r} is {type(value).__name__}; expected "
                          f"{kind.__name__}")
    return float(value) if kind is float else value


def _results_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "results"


def record(out_dir: str | os.PathLike, notebook: str, **values: Any) -> dict:
    """Merge ``values`` into results/<notebook>.json (atomic) after checking them against SCHEMA; returns the
    notebook's full mapping. A None value is not recorded: a number this data cannot give (an mIoU of a split
    without masks) reads as absent, as one not run does."""
    checked = {k: _check_value(notebook, k, _plain(v)) for k, v in values.items() if v is not None}
    path = _results_dir(out_dir) / f"{notebook}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(checked)
    atomic_write_text(path, strict_json(data, indent=1, sort_keys=True))
    return data


def _plain(value: Any) -> Any:
    """NumPy scalars -> Python numbers (so the type check sees what JSON will hold); paths -> repo-relative
    strings (results name no machine paths; readers resolve them against the repo root)."""
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        return repo_relative(value)
    return value.item() if hasattr(value, "item") and not isinstance(value, (dict, list, str)) else value


def read_results(out_dir: str | os.PathLike) -> dict[str, dict]:
    """{notebook: {field: value}} for every results/*.json under out_dir, each field checked against SCHEMA."""
    root = _results_dir(out_dir)
    out = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))} if root.is_dir() else {}
    for notebook, fields in out.items():
        for field in fields:
            check_field(notebook, field)
    return out


def lookup(results: Mapping[str, Mapping], notebook: str, field: str, default: Any = None) -> Any:
    """``results[notebook][field]`` from ``read_results``, or ``default`` when not recorded yet; a name not in
    SCHEMA is an error (a misspelt key never reads as "not run")."""
    check_field(notebook, field)
    return results.get(notebook, {}).get(field, default)


def result(out_dir: str | os.PathLike, notebook: str, field: str) -> Any:
    """One recorded value; an error naming the notebook to run when it is not there."""
    value = lookup(read_results(out_dir), notebook, field)
    if value is None:
        raise FmalibError(f"{Path(out_dir) / 'results' / (notebook + '.json')} has no {field!r}: run notebook "
                          f"{notebook} first")
    return value


def write_bench(name_or_path: str | os.PathLike, data: dict) -> Path:
    """Print a benchmark's numbers and write them (atomic) to reports/bench/<name>.json, or to the path given."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = repo_root() / "reports" / "bench" / f"{name_or_path}.json"
    text = strict_json(data, indent=1, default=float)
    print(text)
    atomic_write_text(path, text)
    return path
