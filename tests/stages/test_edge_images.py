"""Valid data never crashes: an image without any class, huge and tiny images, through the method and the
stages."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.data.labels import read_label_png
from fmalib.method.generator import MultiLevelMaskGenerator
from fmalib.method.image_cams import image_cams
from fmalib.method.masks import MaskSet
from fmalib.method.prompts import HandPrompts
from fmalib.method.rle import MaskRuns
from fmalib.method.sams import (
    choose_bg_power,
    confident_pixels,
    power_agreement,
    sams_assign,
    sams_prepare,
)
from fmalib.method.scores import cam_scores
from fmalib.method.seed_rules import bg_threshold_sweep, cam_argmax_seeds
from fmalib.models import clip as C
from fmalib.models.sam import load_sam
from fmalib.stages.cam_argmax import cam_argmax_seed_dir
from fmalib.stages.cams import run_cam_stage, warn_tiny_image
from fmalib.stages.mask_generators import mask_arguments
from fmalib.stages.masks import mask_cache, save_masks
from fmalib.stages.seeds import make_seeds
from tests.helpers import NAMES, label, rgb, voc_params, voc_tree

pytestmark = pytest.mark.usefixtures("one_thread")

# --- 2. valid data never crashes: no present class, huge and tiny images -----------------------------------------
def _masks(h, w):
    m = np.zeros((2, h, w), bool)
    m[0, : h // 2] = True
    m[1, h // 2:, : w // 2] = True
    return m


def test_no_present_class_gives_all_background_everywhere():
    h, w = 20, 24
    none = np.zeros((0, 3, 3), np.float32)
    fg, bg = confident_pixels(np.zeros((0, h, w), np.float32), np.zeros(0, np.int64), 0.9, 0.1)
    assert fg.shape == (h, w) and not fg.any() and bg.all()
    for masks, levels in ((_masks(h, w), [0, 2]), (np.zeros((0, h, w), bool), [])):
        img = sams_prepare(none, masks, levels, [], confident=(0.9, 0.1))
        label, conf = sams_assign(img, 0.5)
        assert label.dtype == np.uint8 and label.shape == (h, w) and not label.any()
        assert set(np.unique(conf)) <= {0.0, 1.0}
    assert (cam_argmax_seeds(none, [], 0.4, size=(h, w)) == 0).all()
    gt = np.zeros((h, w), np.uint8)
    assert bg_threshold_sweep([(none, np.zeros(0, np.int64), gt)], [0.3, 0.5], 4) == {0.3: 1.0, 0.5: 1.0}
    # choose_bg_power: K = 0 images are left out (their seeds do not depend on p)
    cam = np.zeros((1, 4, 4), np.float32)
    cam[0, :2] = 1.0
    one = sams_prepare(cam, _masks(h, w), [0, 2], [2], confident=(0.9, 0.1))
    empty = sams_prepare(none, _masks(h, w), [0, 2], [], confident=(0.9, 0.1))
    grid = [0.3, 0.6, 1.0, 2.0]
    p, table = choose_bg_power([one, empty, empty], grid)
    p_ref, ref = choose_bg_power([one], grid)
    assert p == p_ref and table.equals(ref)
    p, table = choose_bg_power([empty], grid)  # nothing to learn from: all tie, the middle of the grid
    assert p == 0.6 and (table["balanced_agreement"] == 0).all() and (table["bg_pixels"] == 0).all()
    assert power_agreement([empty], grid)["fg_pixels"].sum() == 0


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = C.load_clip("fmalib-tiny-clip")
    with torch.no_grad():
        text = HandPrompts(model, C.get_tokenizer("fmalib-tiny-clip"), NAMES, ["grass", "sky"])()
    return model, text


CFG = {"target": "prob", "target_layer": "ln1_out", "caa_last_k": 8, "sinkhorn_iters": 1}


def test_cam_input_long_side_capped(tiny_clip):
    model, text = tiny_clip
    assert C.patch_size(model) == 8
    assert C.input_size(model, 2000, 3000, 512) == (344, 512) and C.input_size(model, 3000, 2000, 512) == (512, 344)
    assert C.input_size(model, 2000, 3000) == (2000, 3000)  # no cap: full size (the 140 GB attention)
    assert C.input_size(model, 120, 130, 100) == (96, 96)  # long side <= the cap rounded down to the patch
    for h in range(100, 129):  # toy sizes (112-128): a cap >= 128 changes nothing
        for w in range(100, 129):
            assert C.input_size(model, h, w, 128) == C.input_size(model, h, w)
    img = rgb(120, 128)
    capped = image_cams(model, text, 3, img, [1, 3], **dict(CFG, max_side=512), threshold=0.4)
    plain = image_cams(model, text, 3, img, [1, 3], **CFG, threshold=0.4)
    assert all(np.array_equal(capped[k], plain[k]) for k in ("cam", "cam_caa"))
    big = np.zeros((2000, 3000, 3), np.uint8)
    big[500:1500, 1000:2000] = 200
    out = image_cams(model, text, 3, big, [2], **dict(CFG, max_side=128), threshold=0.4)
    assert out["cam"].shape == (1, 11, 16) and out["cam_caa"].shape == (1, 11, 16)
    assert cam_argmax_seeds(out["cam"], [2], 0.5, size=(2000, 3000)).shape == (2000, 3000)
    with pytest.raises(FmalibError, match=r"toy\.yaml: key cam\.max_side is 8; expected >= 32"):
        load_params("params/toy.yaml", {"cam.max_side": 8})
    assert load_params("params/toy.yaml", {"cam.max_side": None}).cam.max_side is None


def test_tiny_images_warn_and_give_background(tiny_clip, caplog):
    model, text = tiny_clip
    for size in ((1, 1), (8, 8), (3, 40)):
        out = image_cams(model, text, 3, rgb(*size, 1), [1, 2], **CFG, threshold=0.4)
        grid = (1, 1) if size != (3, 40) else (1, 5)
        assert out["cam"].shape == (2, *grid) and np.isfinite(out["cam"]).all()
    one = image_cams(model, text, 3, rgb(1, 1), [1, 2], **CFG, threshold=0.4)["cam"]
    assert (cam_scores(one) == 0).all()  # the score of one patch: min-max of a single value
    assert not cam_argmax_seeds(one, [1, 2], 0.05, size=(1, 1)).any()
    label, _ = sams_assign(sams_prepare(one, np.ones((1, 1, 1), bool), [2], [1, 2]), 0.5)
    assert label.tolist() == [[0]]
    with caplog.at_level(logging.WARNING, logger="fmalib.stages.cams"):
        assert warn_tiny_image(model, "img_7", (1, 1)) and warn_tiny_image(model, "img_8", (3, 40))
        assert not warn_tiny_image(model, "img_9", (8, 8))
    assert caplog.messages == [
        "image 'img_7' is 1x1 px, smaller than one CLIP patch (8 px) on a side: CLIP sees it upsampled to 8x8 "
        "(a 1x1 patch grid); one patch has no spatial CAM (all 0 after min-max): its seeds are all background",
        "image 'img_8' is 3x40 px, smaller than one CLIP patch (8 px) on a side: CLIP sees it upsampled to 8x40 "
        "(a 1x5 patch grid)"]


def test_mask_generator_on_tiny_images_does_not_crash():
    torch.manual_seed(0)
    gen = MultiLevelMaskGenerator(load_sam("fmalib_tiny", "assets/tiny_sam.pth"),
                                  **dict(mask_arguments(load_params("params/toy.yaml")), points_per_side=4))
    for size in ((1, 1), (8, 8)):
        masks = gen.generate(rgb(*size))
        assert (masks.height, masks.width) == size
        label, _ = sams_assign(sams_prepare(np.zeros((1, 1, 1), np.float32), masks.runs(), masks.levels, [1],
                                            size), 0.5)
        assert label.shape == size and not label.any()


def test_stages_with_an_image_without_classes_and_a_tiny_image(tmp_path, caplog):
    """CAM stage → SAMS seeds (GT-free p over a sample with those images) → CAM-argmax seeds."""
    ids = ["with_a", "nothing", "with_bc", "tiny"]
    labels = [label(24, 32, (1,)), np.zeros((24, 32), np.uint8), label(24, 32, (2, 3)), np.ones((6, 6), np.uint8)]
    images = {i: rgb(*lab.shape, k) for k, (i, lab) in enumerate(zip(ids, labels))}
    root = voc_tree(tmp_path / "own", images, dict(zip(ids, labels)), ids, ids[:1])
    params = voc_params(root, tmp_path, **{"sams.power_images": 4})
    ds = open_dataset(params, "train")
    cache = mask_cache(params, "train")
    for j, lab in enumerate(labels):
        regions = [lab == c for c in np.unique(lab)]
        ms = MaskSet.from_runs(MaskRuns.from_bool(np.stack(regions)), [2] * len(regions), [0.9] * len(regions),
                               [1.0] * len(regions))
        save_masks(cache, ds.ids[j], ms)
    with caplog.at_level(logging.WARNING, logger="fmalib.stages.cams"):
        cams = run_cam_stage(params, "train", "hand", progress=False)
    assert [m for m in caplog.messages if "CLIP patch" in m] == [
        "image 'tiny' is 6x6 px, smaller than one CLIP patch (8 px) on a side: CLIP sees it upsampled to 8x8 "
        "(a 1x1 patch grid); one patch has no spatial CAM (all 0 after min-max): its seeds are all background"]
    z = cams.load_npz("nothing")
    assert z["labels"].shape == (0,) and z["cam"].shape == (0, 3, 4) and z["cam_caa"].shape == (0, 3, 4)
    seeds = make_seeds(params, "train", cams, "coarse")  # bg power "auto"
    assert seeds.bg_power in params.sams.power_grid and seeds.stats["images"] == 4
    assert not read_label_png(seeds.path("nothing")).any() and not read_label_png(seeds.path("tiny")).any()
    out, _, _ = cam_argmax_seed_dir(params, "train", cams)
    assert not read_label_png(out / "nothing.png").any() and not read_label_png(out / "tiny.png").any()
    assert read_label_png(out / "nothing.png").shape == (24, 32)
