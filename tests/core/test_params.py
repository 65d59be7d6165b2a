"""Params: the typed defaults of fmalib.core.config, YAML overlays over them, dotted overrides, one error per bad
key naming its file (or its --set) and the dotted key."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from fmalib.core import config as C
from fmalib.core.errors import FmalibError
from fmalib.core.params import fast_overlay, load_params, repo_root, with_variant
from fmalib.study import setup

PROFILES = ["toy", "voc", "coco"]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("paper_settings", "variants"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_load_and_state_only_what_differs(name):
    p = load_params(f"params/{name}.yaml")
    assert p.name == name and len(p.classes.names) == len(p.classes.synonyms)
    defaults = {dotted: C.default_of(f) for dotted, _, f in C.leaves()}
    stated = _flat(yaml.safe_load((repo_root() / f"params/{name}.yaml").read_text()))
    assert set(stated) <= set(defaults), set(stated) - set(defaults)
    same = [k for k, v in stated.items() if v == defaults[k]]
    assert not same, f"params/{name}.yaml restates defaults: {same}"
    assert len(stated) <= 60


def test_every_key_is_defined_once_and_documented():
    keys = [dotted for dotted, _, _ in C.leaves()]
    assert len(keys) == len(set(keys)) and len(keys) > 150
    assert all(f.metadata["doc"] for _, _, f in C.leaves())
    assert (repo_root() / "docs/params.md").read_text() == C.markdown(), \
        "docs/params.md is stale: python -m fmalib.core.config > docs/params.md"
    table = re.findall(r"^\| `([\w.]+)` \|", C.markdown(), re.M)
    assert table == keys


def test_defaults_are_the_papers():
    d = load_params("params/voc.yaml")
    assert (d.prompts.cls.iters, d.prompts.seg.iters, d.prompts.cls.warmup_iters, d.prompts.batch_size) == \
           (1800, 17000, 500, 16)
    assert (d.masks.points_per_side, d.masks.pred_iou_thresh, d.masks.stability_score_thresh) == (32, 0.86, 0.92)
    assert all(d.cam.use_caa.values()) and d.cam.target_layer == "ln1_out" and d.prompts.crop_size == 224


def test_base_chain_overlays_and_variant(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"_BASE_: {repo_root() / 'params/toy.yaml'}\nname: mine\nprompts: {{cls: {{iters: 7}}}}\n")
    p = load_params(mine)
    assert (p.name, p.prompts.cls.iters, p.prompts.seg.iters, p.workdir) == ("mine", 7, 100, "work/toy")
    loop = tmp_path / "loop.yaml"
    loop.write_text("_BASE_: loop.yaml\n")
    with pytest.raises(FmalibError, match="loops back"):
        load_params(loop)
    fast = setup("params/toy.yaml", fast=True)
    assert fast.data.synthetic.n_train == 12 and fast.workdir == "work/toy-fast"
    assert fast.prompts.cls.iters == 3 and not any(fast.cam.use_caa.values())
    voc = load_params("params/voc.yaml")
    voc_fast = load_params("params/voc.yaml", overlays=fast_overlay(voc))
    assert (voc_fast.workdir, voc_fast.data.root) == ("work/voc-fast", "data/voc-tiny")  # ${name} resolved
    variant = with_variant(load_params("params/toy.yaml"), "first_tiny_clip")
    assert variant.clip.model == "fmalib-tiny-clip" and variant.name == "toy" and variant.prompts.seg.lr == 1.0
    with pytest.raises(FmalibError, match=r"toy.yaml: no variant 'nope' under variants \(defined: first_tiny_clip"):
        with_variant(load_params("params/toy.yaml"), "nope")


def test_unknown_missing_and_mistyped_keys_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_BASE_: " + str(repo_root() / "params/toy.yaml") + "\ndata: {rooot: x}\n")
    with pytest.raises(FmalibError, match=r"bad\.yaml: unknown key data\.rooot \(allowed here: kind, root,"):
        load_params(bad)
    bad.write_text("name: x\nworkdir: w\nclasses: {names: [a], synonyms: [a], bg_words: [b]}\n")
    with pytest.raises(FmalibError, match=r"bad\.yaml: missing key data\.kind \(expected str; it has no default\)"):
        load_params(bad)
    with pytest.raises(FmalibError, match=r"key seed is 'zero'; expected int"):
        load_params("params/toy.yaml", {"seed": "zero"})
    with pytest.raises(FmalibError, match=r"--set cam.use_caa.cls='maybe' \(over .*toy.yaml\): key cam.use_caa.cls "
                                          r"is 'maybe'; expected bool"):
        setup("params/toy.yaml", overrides={"cam.use_caa.cls": "maybe"})
    with pytest.raises(FmalibError, match=r"override data.nope=1 \(over .*toy.yaml\): unknown key data.nope"):
        load_params("params/toy.yaml", {"data.nope": 1})
    with pytest.raises(FmalibError, match="does not exist"):
        load_params(tmp_path / "absent.yaml")
    assert load_params("params/toy.yaml").resolve_path("data.root") == repo_root() / "data/toy"


def test_yaml_float_pitfall(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"_BASE_: {repo_root() / 'params/toy.yaml'}\nprompts: {{cls: {{lr: 1e-3}}}}\n")
    assert load_params(mine).prompts.cls.lr == 1e-3  # a float key reads YAML 1.1's string as the number
    with pytest.raises(FmalibError, match=re.escape("key stage2.iters is the string '3e4', not a number: write 30000 "
                                                    "(YAML reads 3e4 as a string)")):  # an int key
        load_params("params/toy.yaml", {"stage2.iters": "3e4"})
    with pytest.raises(FmalibError, match=re.escape("key sams.bg_power.fine is '2e-1'; expected a number > 0 or "
                                                    "'auto': write 2.0e-1 (YAML reads 2e-1 as a string)")):
        load_params("params/toy.yaml", {"sams.bg_power.fine": "2e-1"})


@pytest.mark.parametrize("key, value, message", [
    ("masks.points_per_side", 0, "key masks.points_per_side is 0; expected >= 1"),
    ("prompts.cls.iters", 0, "key prompts.cls.iters is 0; expected >= 1"),
    ("prompts.seg.iters", -5, "key prompts.seg.iters is -5; expected >= 1"),
    ("prompts.seg.lr", 0.0, "key prompts.seg.lr is 0.0; expected > 0"),
    ("stage2.lr", -0.01, "key stage2.lr is -0.01; expected > 0"),
    ("sams.power_images", 0, "key sams.power_images is 0; expected >= 1"),
    ("masks.pred_iou_thresh", 1.5, "key masks.pred_iou_thresh is 1.5; expected in [0, 1]"),
    ("cam.caa_threshold.seg", -0.1, "key cam.caa_threshold.seg is -0.1; expected in [0, 1]"),
    ("cam.bg_thresholds", [0.5, 1.5], "key cam.bg_thresholds is [0.5, 1.5]; expected in [0, 1] for every entry"),
    ("cam.bg_thresholds", [], "key cam.bg_thresholds is empty; expected at least one entry"),
    ("cam.max_side", 8, "key cam.max_side is 8; expected >= 32 (px; or null)"),
    ("cam.target", "logit", "key cam.target is 'logit'; expected one of prob, score"),
    ("sams.power_grid", [0.5, 0], "key sams.power_grid is [0.5, 0.0]; expected > 0 for every entry"),
    ("sams.levels", [0, 3], "key sams.levels is [0, 3]; expected one of 0, 1, 2 for every entry"),
    ("sams.bg_power.coarse", -1, "key sams.bg_power.coarse is -1; expected a number > 0 or 'auto'"),
    ("sams.bg_power.coarse", "fixed", "key sams.bg_power.coarse is 'fixed'; expected a number > 0 or 'auto'"),
    ("sams.confident_lo", 0.95, "keys sams.confident_hi = 0.9 and sams.confident_lo = 0.95: expected "
                                "0 <= confident_lo < confident_hi <= 1 (swapped?)"),
    ("prompts.long_side", [480, 288], "key prompts.long_side is [480, 288]; expected [min, max] with min <= max"),
    ("prompts.color_jitter.contrast", [0.6], "key prompts.color_jitter.contrast is [0.6]; expected 2 numbers"),
    ("prompts.color_jitter.p", 1.5, "key prompts.color_jitter.p is 1.5; expected in [0, 1]"),
    ("prompts.cls.sub_batches", 3, "keys prompts.batch_size = 16 and prompts.cls.sub_batches = 3: expected the "
                                   "batch to split into equal sub-batches"),
    ("prompts.seg.cam_iter", 101, "keys prompts.seg.cam_iter = 101 and prompts.seg.iters = 100: expected "
                                  "cam_iter <= iters (or null: the last iteration)"),
    ("cam.caa_source.cls", "score", "key cam.caa_source.cls is 'score'; expected one of normalized, raw"),
    ("prompts.momentum", 1.0, "key prompts.momentum is 1.0; expected in [0, 1)"),
    ("stage2.backbone_depth", 20, "key stage2.backbone_depth is 20; expected one of 18, 34, 50, 101, 152"),
    ("classes.synonyms", ["x"], "key classes.synonyms has 1 entries but classes.names has 6; expected one "
                                "synonym string per class"),
    ("data.synthetic.size_max", 100, "keys data.synthetic.size_min = 112 and size_max = 100: expected "
                                     "size_min <= size_max"),
    ("device", "gpu", "key device is 'gpu'; expected cpu, cuda or cuda:N"),
])
def test_ranges_name_file_and_key(key, value, message):
    with pytest.raises(FmalibError) as exc:
        load_params("params/toy.yaml", {key: value})
    assert str(exc.value).endswith("params/toy.yaml: " + message)


def test_cuda_device_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FmalibError, match=r"toy\.yaml: key device is 'cuda' but CUDA is not available here; "
                                          r"use device: cpu"):
        load_params("params/toy.yaml", {"device": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_params("params/toy.yaml", {"device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(FmalibError, match=r"key device is 'cuda:2' but only 2 CUDA device\(s\) are visible"):
        load_params("params/toy.yaml", {"device": "cuda:2"})
