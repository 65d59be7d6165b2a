"""Params are the other half of a cache key: every params key that changes a stage's result is in that stage's key,
and nothing else. Each key of params/toy.yaml is changed alone (to another valid value) and every stage's key is
recomputed; the stages whose key moved must be exactly those the table below says the setting changes.

The table is written from what each stage computes, not from the key functions: a setting that falls out of a
key, or one that enters a key it does not change, fails here."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.pretrain import clip as pretrain_clip
from fmalib.pretrain import sam as pretrain_sam
from fmalib.segment.evaluate import _crf_settings, eval_cache
from fmalib.segment.train import run_dir
from fmalib.stages.cams import caa_for, cam_cache
from fmalib.stages.masks import mask_cache
from fmalib.stages.prompt_runs import train_cache
from fmalib.stages.seeds import bg_power_rule, cam_loader, seed_cache
from fmalib.stages.cam_argmax import cam_argmax_cache

REPO = Path(__file__).resolve().parents[2]

MASKS = {"masks.generator", "masks.points_per_side", "masks.pred_iou_thresh", "masks.stability_score_thresh",
         "masks.stability_score_offset", "masks.box_nms_thresh", "masks.crop_n_layers",
         "masks.crop_n_points_downscale_factor", "masks.crop_overlap_ratio", "masks.crop_nms_thresh",
         "masks.min_mask_region_area", "masks.whole_iou_bonus", "masks.whole_nms_bonus", "masks.overlap_thresh",
         "sam.model_type"}  # not points_per_batch (how many prompts share a forward pass)
CAM = {"cam.target", "cam.target_layer", "cam.caa_last_k", "cam.max_side", "clip.model",
       "classes.synonyms", "classes.bg_words"}  # not use_caa / bg_thresholds: both maps are stored


def _cam(kind: str) -> set[str]:
    prompt = {"hand": {"prompts.hand_template"}, "cls": {"prompts.n_ctx"},
              "seg": {"prompts.n_ctx", "prompts.seg.layout"}}[kind]
    return CAM | prompt | {f"cam.caa_source.{kind}", f"cam.caa_threshold.{kind}", f"cam.sinkhorn_iters.{kind}"}


POWER_AUTO = {"sams.power_grid", "sams.confident_hi", "sams.confident_lo", "sams.power_images"}
PROMPTS = {"seed", "clip.model", "classes.synonyms", "classes.bg_words", "prompts.n_ctx", "prompts.batch_size",
           "prompts.momentum", "prompts.crop_size", "prompts.long_side", "prompts.flip"} | {
    f"prompts.color_jitter.{k}" for k in ("brightness", "contrast", "saturation", "hue", "p")}
STAGE2 = {"seed"} | {f"stage2.{k}" for k in (
    "model", "backbone_depth", "weights", "norm", "freeze_at", "fpn_channels", "head_channels", "loss", "iters",
    "batch_size", "lr", "lr_schedule", "warmup_iters", "momentum", "weight_decay", "crop_size", "scale_range",
    "flip", "num_gpus")}  # weights_style only with weights; amp only on CUDA
EXPECTED = {
    "masks": MASKS,
    "cam_hand": _cam("hand"), "cam_cls": _cam("cls"), "cam_seg": _cam("seg"),
    # seeds are keyed by their inputs' keys, so what changes the masks or the CAMs changes them too
    "seeds_coarse": MASKS | _cam("cls") | {"cam.use_caa.cls", "sams.levels", "sams.bg_power.coarse"} | POWER_AUTO,
    "seeds_fine": MASKS | _cam("seg") | {"cam.use_caa.seg", "sams.levels", "sams.bg_power.fine"} | POWER_AUTO,
    "seeds_cam_argmax": _cam("cls") | {"cam.use_caa.cls", "cam.bg_thresholds"},
    "prompts_cls": PROMPTS | {f"prompts.cls.{k}" for k in (
        "iters", "warmup_iters", "warmup_lr", "lr", "weight_decay", "init_std", "loss", "sub_batches", "cam_iter")},
    "prompts_seg": PROMPTS | {"cam.target", "cam.target_layer"} | {f"prompts.seg.{k}" for k in (
        "iters", "warmup_iters", "warmup_lr", "lr", "weight_decay", "init_std", "layout", "pairs", "sub_batches",
        "cam_iter")},
    "stage2_train": STAGE2,
    "stage2_eval": {"stage2.test.scales", "stage2.test.flip", "stage2.test.crf"},  # crf.* only with the CRF on
    "pretrain_clip": {"clip.model"} | {f"foundation.clip.{k}" for k in (
        "seed", "pool_size", "pool_offset", "steps", "batch_size", "lr", "weight_decay", "warmup_steps",
        "patch_loss", "pool", "concept_templates", "caption_weight", "concept_weight", "patch_weight")},
    "pretrain_sam": {f"foundation.sam.{k}" for k in (
        "seed", "index_offset", "steps", "batch_size", "points_per_image", "object_point_fraction",
        "object_only_steps", "lr", "weight_decay", "warmup_steps", "bce_weight", "dice_weight", "iou_weight")},
}
# not varied: the data (its content is the key: tests/data/test_fingerprint.py), the class list (it names the data's
# labels) and the device (its only other value needs CUDA)
NOT_VARIED = ("data.", "classes.names", "device")

CHOICES = {"masks.generator": "sam2", "sam.model_type": "vit_b", "clip.model": "fmalib-tiny-clip",
           "cam.target": "score", "cam.target_layer": "block_input", "prompts.cls.loss": "bg_negatives",
           "prompts.seg.layout": "shared_end", "prompts.seg.pairs": "image",
           "prompts.hand_template": "a drawing of a {}.", "sams.levels": [1, 2],
           "sams.bg_power.coarse": 0.5, "sams.bg_power.fine": 0.5, "stage2.model": "deeplabv3plus",
           "stage2.backbone_depth": 34, "stage2.weights_style": "msra", "stage2.norm": "GN",
           "stage2.loss": "hard_pixel_mining", "stage2.lr_schedule": "cosine", "foundation.clip.pool": "class_token",
           "foundation.clip.patch_loss": "mil", "sam2.config": "sam2.1_hiera_s", "sam2.checkpoint": "sam2.pt",
           "stage2.labels": "seeds", "name": "other", "cam.max_side": 256,
           "stage2.num_gpus": 2, "prompts.cls.cam_iter": 100, "prompts.seg.cam_iter": 50}


def _leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("fast", "variants", "paper_settings"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _other(key: str, value, files: dict):
    if key in files:
        return files[key]
    if key in CHOICES:
        return CHOICES[key]
    if key.startswith("cam.caa_source."):
        return "raw" if value == "normalized" else "normalized"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value * 0.9, 6)
    if isinstance(value, list) and isinstance(value[0], str):
        return [value[0] + " x"] + value[1:]
    if isinstance(value, list):  # another last entry (lengths are checked; [min, max] stays ordered)
        return value[:-1] + [_other(key, value[-1], files)]
    if isinstance(value, dict):
        return {**value, "seed": 1}
    if isinstance(value, str):  # paths and names no check reads
        return value + ".other"
    raise AssertionError(f"no other value for {key}={value!r}")


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[last] = value


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    base = load_params(REPO / "params/toy.yaml").to_dict()
    for dotted, value in {"data.root": str(tmp / "data"), "workdir": str(tmp / "work"), "data.synthetic.n_train": 2,
                          "data.synthetic.n_val": 1, "clip.checkpoint": str(REPO / "assets/tiny_clip_d12.pt"),
                          "sam.checkpoint": str(REPO / "assets/tiny_sam.pth")}.items():
        _set(base, dotted, value)
    # inputs held fixed: a context file, a seed folder, a model's weights; the same checkpoints at other paths
    for name in ("ctx.pt", "model/model_final.pth", "seeds/a.png", "weights.pkl"):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(name.encode())
    files = {"clip.checkpoint": str(tmp / "clip_copy.pt"), "sam.checkpoint": str(tmp / "sam_copy.pth"),
             "stage2.weights": str(tmp / "weights.pkl"), "workdir": str(tmp / "elsewhere")}
    shutil.copy(base["clip"]["checkpoint"], files["clip.checkpoint"])
    shutil.copy(base["sam"]["checkpoint"], files["sam.checkpoint"])
    return base, tmp, files


def stage_keys(params, tmp: Path) -> dict[str, str]:
    """Every stage's key (its cache directory's name) under ``params``, with the inputs held fixed."""
    split, ctx, seeds = "train", tmp / "ctx.pt", tmp / "seeds"
    masks = mask_cache(params, split)
    cams = {k: cam_cache(params, split, k, None if k == "hand" else ctx) for k in ("hand", "cls", "seg")}
    out = {"masks": masks.key, **{f"cam_{k}": c.key for k, c in cams.items()}}
    for stage, kind in (("coarse", "cls"), ("fine", "seg")):
        out[f"seeds_{stage}"] = seed_cache(params, split, stage, masks, cam_loader(params, cams[kind])[1],
                                           bg_power_rule(params, stage)).key
    out["seeds_cam_argmax"] = cam_argmax_cache(params, split, cams["cls"], caa_for(params, cams["cls"]), params["cam"]["bg_thresholds"]).key
    out["prompts_cls"] = train_cache(params, "cls").key
    out["prompts_seg"] = train_cache(params, "seg", seeds).key
    out["stage2_train"] = run_dir(params, "seeds", seeds).name
    test = params["stage2"]["test"]
    out["stage2_eval"] = eval_cache(params, tmp / "model", params["data"]["val_split"], None, test["scales"],
                                    test["flip"], _crf_settings(params, None)).name
    for name, module, state in (("pretrain_clip", pretrain_clip, pretrain_clip.pretrain_run_dir),
                                 ("pretrain_sam", pretrain_sam, pretrain_sam.state_dir)):
        try:
            out[name] = state(params, module.pretrain_config(params)).name
        except FmalibError:  # settings the pretraining refuses (another model type): no run, no cache
            out[name] = None
    return out


def test_each_setting_changes_exactly_the_keys_of_the_stages_it_changes(setup):
    base, tmp, files = setup
    loaded = load_params(base)
    reference = stage_keys(loaded, tmp)
    assert set(reference) == set(EXPECTED)
    full = loaded.to_dict()  # every key stated: each variant below is one changed leaf of it
    wrong = []
    for key, value in _leaves(base):
        if key.startswith(NOT_VARIED):
            continue
        tree = copy.deepcopy(full)
        _set(tree, key, _other(key, value, files))
        moved = {s for s, k in stage_keys(load_params(tree), tmp).items() if k not in (reference[s], None)}
        want = {s for s, keys in EXPECTED.items() if key in keys}
        if moved != want:
            wrong.append(f"{key}: moved {sorted(moved)}, expected {sorted(want)}")
    assert not wrong, "\n".join(wrong)


def test_settings_that_act_only_with_another_are_keyed_only_with_it(setup):
    """The other side of the sweep above: with a fixed p the power grid leaves the seeds' key; with the CRF on,
    its settings enter the evaluation's; with backbone weights loaded, their layout enters the training's."""
    base, tmp, files = setup
    params = load_params(base, {"sams.bg_power.fine": 0.5, "stage2.test.crf": True, "stage2.weights":
                                files["stage2.weights"]})
    reference = stage_keys(params, tmp)
    for key, value, stage, moves in (("sams.power_grid", [0.5, 1.0], "seeds_fine", False),
                                     ("sams.power_images", 3, "seeds_fine", False),
                                     ("sams.power_images", 3, "seeds_coarse", True),  # coarse p is still auto
                                     ("stage2.crf.bi_w", 5, "stage2_eval", True),
                                     ("stage2.weights_style", "msra", "stage2_train", True)):
        moved = stage_keys(load_params(params.to_dict(), {key: value}), tmp)
        assert (moved[stage] != reference[stage]) == moves, (key, stage)
