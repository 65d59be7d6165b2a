"""Own data without surprises: the up-front data check, unreadable images, images without a class, huge and
tiny images, range-checked params, and a VOC-layout dataset with its own classes."""
from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.data.check import check_split, require_valid_split
from fmalib.data.coco import COCODataset
from fmalib.data.labels import read_label_png, write_label_png
from fmalib.data.voc import read_image
from fmalib.method.generator import MultiLevelMaskGenerator
from fmalib.stages.mask_generators import mask_arguments
from fmalib.method.image_cams import image_cams
from fmalib.method.masks import MaskSet
from fmalib.method.prompts import HandPrompts
from fmalib.method.rle import MaskRuns
from fmalib.method.sams import choose_bg_power, confident_pixels, power_agreement, sams_assign, sams_prepare
from fmalib.method.seed_rules import bg_threshold_sweep, cam_argmax_seeds
from fmalib.models import clip as C
from fmalib.models.sam import load_sam
from fmalib.stages.cams import run_cam_stage, warn_tiny_image
from fmalib.stages.masks import mask_cache, save_masks
from fmalib.stages.seeds import make_seeds
from fmalib.stages.cam_argmax import cam_argmax_seed_dir
from fmalib.study.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["a", "b", "c"]


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _save(path, img, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path, format=fmt)
    return path


def _jpeg_bytes(h=40, w=50):
    buf = io.BytesIO()
    Image.fromarray(_rgb(h, w)).save(buf, format="JPEG")
    return buf.getvalue()


def _voc_tree(root, images: dict, labels: dict, train, val):
    """A VOC-layout folder: images {id: PIL image, array or raw bytes (.jpg)}, labels {id: array, PIL image or
    None (no file)}."""
    for image_id, img in images.items():
        if isinstance(img, bytes):
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(img)
        else:
            _save(root / "JPEGImages" / f"{image_id}.png", img)
    for image_id, lab in labels.items():
        if isinstance(lab, np.ndarray):
            write_label_png(root / "SegmentationClass" / f"{image_id}.png", lab)
        elif lab is not None:
            _save(root / "SegmentationClass" / f"{image_id}.png", lab)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def _voc_params(root, tmp_path, **over):
    return load_params("params/toy.yaml", {
        "data.kind": "voc", "data.root": str(root), "workdir": str(tmp_path / "work"), "classes.names": NAMES,
        "classes.synonyms": NAMES, "clip.checkpoint": None, "sam.checkpoint": None, **over})


def _label(h, w, ids=(1,)):
    lab = np.zeros((h, w), np.uint8)
    for k, c in enumerate(ids):
        lab[k * 2: k * 2 + 2, :4] = c
    return lab


# --- 1. the data check ------------------------------------------------------------------------------------------
@pytest.fixture
def bad_tree(tmp_path):
    """Every kind of bad (and noteworthy) file in one split."""
    gray = Image.fromarray(_rgb(20, 24)[..., 0], mode="L")
    rgba = Image.fromarray(np.dstack([_rgb(20, 24), np.full((20, 24), 128, np.uint8)]), mode="RGBA")
    cmyk = io.BytesIO()
    Image.fromarray(_rgb(20, 24)).convert("CMYK").save(cmyk, format="JPEG")
    deep = Image.fromarray(np.full((20, 24), 40000, np.uint16))  # I;16
    rgb_label = Image.fromarray(np.zeros((20, 24, 3), np.uint8))
    images = {"good": _rgb(20, 24), "truncated": _jpeg_bytes()[:1000], "garbage": b"this is not an image",
              "nolabel": _rgb(20, 24), "wrongsize": _rgb(20, 24), "badids": _rgb(20, 24), "rgblabel": _rgb(20, 24),
              "gray": gray, "rgba": rgba, "cmyk": cmyk.getvalue(), "deep": deep, "empty": _rgb(20, 24), "tiny": _rgb(4, 4)}
    labels = {k: _label(20, 24) for k in images}
    labels.update({"truncated": _label(40, 50), "garbage": _label(40, 50), "nolabel": None,
                   "wrongsize": _label(16, 24), "badids": _label(20, 24, (1, 4, 9)), "rgblabel": rgb_label,
                   "empty": np.zeros((20, 24), np.uint8), "tiny": _label(4, 4)})
    root = _voc_tree(tmp_path / "mine", images, labels, list(images), ["good"])
    return root


def test_check_split_lists_every_bad_file_at_once(bad_tree, tmp_path):
    ds = open_dataset(_voc_params(bad_tree, tmp_path), "train")
    found = [(p.path.split("/")[-1], p.error, p.message) for p in check_split(ds)]
    errors = {name: msg for name, err, msg in found if err}
    notes = {name: msg for name, err, msg in found if not err}
    assert set(errors) == {"truncated.jpg", "garbage.jpg", "nolabel", "wrongsize.png", "badids.png",
                           "rgblabel.png", "deep.png"}
    assert errors["truncated.jpg"].startswith("cannot be decoded (OSError: image file is truncated")
    assert errors["garbage.jpg"].startswith("cannot be decoded (UnidentifiedImageError: cannot identify image file")
    assert re.fullmatch(r"mask .*/SegmentationClass/nolabel\.png not found for id 'nolabel' of split 'train'",
                        errors["nolabel"])
    assert errors["wrongsize.png"] == "label is 16x24 but its image is 20x24; expected equal sizes"
    assert errors["badids.png"] == ("class id(s) [4, 9] outside 0..3 and 255 (ignore): 3 classes in params "
                                    "classes.names")
    assert errors["rgblabel.png"].startswith("is an RGB PNG (colours, not class ids); convert it to a "
                                             "palette/index PNG whose pixel values are the class ids")
    assert errors["deep.png"].startswith("has PIL mode I;16 (16-bit / 32-bit / float pixels")
    assert notes == {
        "gray.png": "mode L: grayscale, converted to RGB (gray copied to the three channels)",
        "rgba.png": "mode RGBA: RGBA, converted to RGB (alpha dropped, the colour under transparent pixels kept)",
        "cmyk.jpg": "mode CMYK: CMYK, converted to RGB (PIL's plain formula, no colour profile)",
        "empty.png": "no foreground class: only background (0); its seeds are all background",
        "tiny.png": "only 4x4 px (under 16 on a side): CLIP and SAM see it upsampled; expect all-background seeds",
    }
    with pytest.raises(FmalibError) as exc:
        require_valid_split(ds, "my split", show=3)
    text = str(exc.value)
    assert text.startswith("my split: 7 problem(s) in 7 file(s):\n")
    assert len(text.splitlines()) == 1 + 3 + 1 and text.endswith("... and 4 more")
    assert "truncated.jpg: cannot be decoded" in text  # the first ones, in item order


def test_data_subcommand_checks_both_splits(bad_tree, tmp_path, capsys):
    args = ["data", "--set", "data.kind=voc", "--set", f"data.root={bad_tree}", "--set", f"workdir={tmp_path / 'w'}",
            "--set", "classes.names=[a, b, c]", "--set", "classes.synonyms=[a, b, c]"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "train: 13 images, 7 problem(s), 5 note(s)" in out and "val: 1 images, all files usable" in out
    assert "note: " in out and "gray.png: mode L" in out
    assert "fmalib data: error: data of " in err and ": 7 problem(s) in 7 file(s):" in err
    for name in ("truncated.jpg", "garbage.jpg", "nolabel.png", "wrongsize.png", "badids.png", "rgblabel.png",
                 "deep.png"):
        assert name in err
    # the toy benchmark passes
    assert main(["data", "--fast", "--set", f"data.root={tmp_path / 'd'}", "--set", f"workdir={tmp_path / 'w2'}"]) == 0
    assert "train: 12 images, all files usable" in capsys.readouterr().out


def test_every_image_read_names_the_file_and_converts_to_rgb(tmp_path):
    trunc = tmp_path / "t.jpg"
    trunc.write_bytes(_jpeg_bytes()[:1000])
    with pytest.raises(FmalibError, match=rf"image {re.escape(str(trunc))} cannot be read \(OSError: image file is "
                                          r"truncated.*Re-download or re-save it"):
        read_image(trunc)
    junk = tmp_path / "j.jpg"
    junk.write_bytes(b"\xff\xd8 nope")
    with pytest.raises(FmalibError, match=rf"image {re.escape(str(junk))} cannot be read \(UnidentifiedImageError"):
        read_image(junk)
    deep = _save(tmp_path / "d.png", Image.fromarray(np.full((3, 4), 40000, np.uint16)))
    with pytest.raises(FmalibError, match=r"d\.png has PIL mode I;16 .*save it as an 8-bit RGB"):
        read_image(deep)
    g = _rgb(5, 6)[..., 0]
    out = read_image(_save(tmp_path / "g.png", Image.fromarray(g, mode="L")))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8 and (out == g[..., None]).all()
    rgb = _rgb(5, 6)
    out = read_image(_save(tmp_path / "a.png", Image.fromarray(np.dstack([rgb, np.zeros((5, 6), np.uint8)]))))
    assert (out == rgb).all()  # alpha dropped, colours kept
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert read_image(_save(tmp_path / "p.png", pal))[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    bad_label = tmp_path / "l.png"
    bad_label.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(FmalibError, match=rf"label file {re.escape(str(bad_label))} cannot be read"):
        read_label_png(bad_label)
    rgb_label = _save(tmp_path / "rgbl.png", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(FmalibError, match=r"rgbl\.png is an RGB PNG .*convert it to a palette/index PNG"):
        read_label_png(rgb_label)


def _coco(root, sizes, names=("x", "y")):
    anns, images = [], []
    for k, ((h, w), (ah, aw)) in enumerate(sizes, 1):
        fname = f"COCO_val2014_{k:012d}.jpg"
        _save(root / "val2014" / fname, _rgb(h, w))
        images.append({"id": k, "file_name": fname, "height": ah, "width": aw})
        anns.append({"id": k, "image_id": k, "category_id": 1, "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]],
                     "area": 9, "bbox": [0, 0, 3, 3], "iscrowd": 0})
    cats = [{"id": i + 1, "name": n, "supercategory": "s"} for i, n in enumerate(names)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/instances_val2014.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                         "categories": cats}))
    return root


def test_coco_images_checked_and_classes_must_match_annotations(tmp_path):
    root = _coco(tmp_path / "coco", [((20, 24), (20, 24)), ((20, 24), (21, 24)), ((20, 24), (20, 24))])
    (root / "val2014/COCO_val2014_000000000003.jpg").write_bytes(_jpeg_bytes()[:1000])
    ds = COCODataset(root, "val")
    assert ds[0]["image"].shape == (20, 24, 3)
    with pytest.raises(FmalibError, match=r"000002\.jpg is \(20, 24\) but .*instances_val2014\.json gives it "
                                          r"height x width \(21, 24\)"):
        ds[1]
    with pytest.raises(FmalibError, match=r"image .*000003\.jpg cannot be read \(OSError: image file is truncated"):
        ds[2]
    problems = [str(p) for p in check_split(ds)]
    assert len(problems) == 2
    assert problems[0].endswith("000002.jpg: image is 20x24 but " + str(ds.ann_file) + " gives it 21x24; "
                                "expected equal sizes")
    assert "000003.jpg: cannot be decoded (OSError: image file is truncated" in problems[1]
    params = load_params("params/coco.yaml", {"data.root": str(root), "data.train_split": "val",
                                              "classes.names": ["x", "z"], "classes.synonyms": ["x", "z"]})
    with pytest.raises(FmalibError, match=r"classes.names in .*coco.yaml \(2 names\) must match the annotation "
                                          r"file's 2 categories in category-id order \(.*instances_val2014.json\): "
                                          r"first difference \('z', 'y'\)"):
        open_dataset(params, "val")
    ok = load_params("params/coco.yaml", {"data.root": str(root), "classes.names": ["x", "y"],
                                          "classes.synonyms": ["x", "y"]})
    assert open_dataset(ok, "val").class_names == ("x", "y")


# --- 4. a VOC-layout dataset with its own classes --------------------------------------------------------------
def test_voc_layout_with_its_own_three_classes(tmp_path):
    ids = ["i0", "i1", "i2"]
    labs = [_label(20, 24, (1,)), _label(20, 24, (2, 3)), _label(20, 24, (3,))]
    labs[1][9, :] = 255
    root = _voc_tree(tmp_path / "own", {i: _rgb(20, 24, k) for k, i in enumerate(ids)}, dict(zip(ids, labs)),
                     ids, ids[:1])
    params = _voc_params(root, tmp_path)
    ds = open_dataset(params, "train")
    assert ds.class_names == ("a", "b", "c")
    assert [ds[j]["labels"].tolist() for j in range(3)] == [[1], [2, 3], [3]]
    assert check_split(ds) == []
    write_label_png(root / "SegmentationClass/i2.png", _label(20, 24, (4,)))
    ds = open_dataset(params, "train")
    with pytest.raises(FmalibError, match=r"mask .*SegmentationClass/i2\.png holds class id 4 but only 3 foreground "
                                          r"classes were given \(ids 1\.\.3, 255 = ignore"):
        ds[2]
    assert [str(p).split("/")[-1] for p in check_split(ds)] == [
        "i2.png: class id(s) [4] outside 0..3 and 255 (ignore): 3 classes in params classes.names"]
    # voc.yaml keeps VOC's 20 classes
    assert len(load_params("params/voc.yaml").classes.names) == 20


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
    img = _rgb(120, 128)
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
        out = image_cams(model, text, 3, _rgb(*size, 1), [1, 2], **CFG, threshold=0.4)
        grid = (1, 1) if size != (3, 40) else (1, 5)
        assert out["cam"].shape == (2, *grid) and np.isfinite(out["cam"]).all()
    one = image_cams(model, text, 3, _rgb(1, 1), [1, 2], **CFG, threshold=0.4)["cam"]
    assert (one == 0).all()  # min-max of one patch
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
        masks = gen.generate(_rgb(*size))
        assert (masks.height, masks.width) == size
        label, _ = sams_assign(sams_prepare(np.zeros((1, 1, 1), np.float32), masks.runs(), masks.levels, [1],
                                            size), 0.5)
        assert label.shape == size and not label.any()


def test_stages_with_an_image_without_classes_and_a_tiny_image(tmp_path, caplog):
    """CAM stage → SAMS seeds (GT-free p over a sample with those images) → CAM-argmax seeds."""
    ids = ["with_a", "nothing", "with_bc", "tiny"]
    labels = [_label(24, 32, (1,)), np.zeros((24, 32), np.uint8), _label(24, 32, (2, 3)), np.ones((6, 6), np.uint8)]
    images = {i: _rgb(*lab.shape, k) for k, (i, lab) in enumerate(zip(ids, labels))}
    root = _voc_tree(tmp_path / "own", images, dict(zip(ids, labels)), ids, ids[:1])
    params = _voc_params(root, tmp_path, **{"sams.power_images": 4})
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


