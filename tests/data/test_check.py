"""Own data without surprises: the up-front data check lists every bad file at once, every image read names
its file, COCO classes must match the annotations, a VOC-layout dataset with its own classes."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.data.check import check_split, require_valid_split
from fmalib.data.coco import COCODataset
from fmalib.data.labels import read_label_png, write_label_png
from fmalib.data.voc import read_image
from fmalib.study.cli import main
from tests.helpers import jpeg_bytes, label, rgb, save, voc_params, voc_tree

pytestmark = pytest.mark.usefixtures("one_thread")

# --- 1. the data check ------------------------------------------------------------------------------------------
@pytest.fixture
def bad_tree(tmp_path):
    """Every kind of bad (and noteworthy) file in one split."""
    gray = Image.fromarray(rgb(20, 24)[..., 0], mode="L")
    rgba = Image.fromarray(np.dstack([rgb(20, 24), np.full((20, 24), 128, np.uint8)]), mode="RGBA")
    cmyk = io.BytesIO()
    Image.fromarray(rgb(20, 24)).convert("CMYK").save(cmyk, format="JPEG")
    deep = Image.fromarray(np.full((20, 24), 40000, np.uint16))  # I;16
    rgb_label = Image.fromarray(np.zeros((20, 24, 3), np.uint8))
    images = {"good": rgb(20, 24), "truncated": jpeg_bytes()[:1000], "garbage": b"this is not an image",
              "nolabel": rgb(20, 24), "wrongsize": rgb(20, 24), "badids": rgb(20, 24), "rgblabel": rgb(20, 24),
              "gray": gray, "rgba": rgba, "cmyk": cmyk.getvalue(), "deep": deep, "empty": rgb(20, 24), "tiny": rgb(4, 4)}
    labels = {k: label(20, 24) for k in images}
    labels.update({"truncated": label(40, 50), "garbage": label(40, 50), "nolabel": None,
                   "wrongsize": label(16, 24), "badids": label(20, 24, (1, 4, 9)), "rgblabel": rgb_label,
                   "empty": np.zeros((20, 24), np.uint8), "tiny": label(4, 4)})
    root = voc_tree(tmp_path / "mine", images, labels, list(images), ["good"])
    return root


def test_check_split_lists_every_bad_file_at_once(bad_tree, tmp_path):
    ds = open_dataset(voc_params(bad_tree, tmp_path), "train")
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
    trunc.write_bytes(jpeg_bytes()[:1000])
    with pytest.raises(FmalibError, match=rf"image {re.escape(str(trunc))} cannot be read \(OSError: image file is "
                                          r"truncated.*Re-download or re-save it"):
        read_image(trunc)
    junk = tmp_path / "j.jpg"
    junk.write_bytes(b"\xff\xd8 nope")
    with pytest.raises(FmalibError, match=rf"image {re.escape(str(junk))} cannot be read \(UnidentifiedImageError"):
        read_image(junk)
    deep = save(tmp_path / "d.png", Image.fromarray(np.full((3, 4), 40000, np.uint16)))
    with pytest.raises(FmalibError, match=r"d\.png has PIL mode I;16 .*save it as an 8-bit RGB"):
        read_image(deep)
    g = rgb(5, 6)[..., 0]
    out = read_image(save(tmp_path / "g.png", Image.fromarray(g, mode="L")))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8 and (out == g[..., None]).all()
    colour = rgb(5, 6)
    out = read_image(save(tmp_path / "a.png", Image.fromarray(np.dstack([colour, np.zeros((5, 6), np.uint8)]))))
    assert (out == colour).all()  # alpha dropped, colours kept
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert read_image(save(tmp_path / "p.png", pal))[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    bad_label = tmp_path / "l.png"
    bad_label.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(FmalibError, match=rf"label file {re.escape(str(bad_label))} cannot be read"):
        read_label_png(bad_label)
    rgb_label = save(tmp_path / "rgbl.png", np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(FmalibError, match=r"rgbl\.png is an RGB PNG .*convert it to a palette/index PNG"):
        read_label_png(rgb_label)


def _coco(root, sizes, names=("x", "y")):
    anns, images = [], []
    for k, ((h, w), (ah, aw)) in enumerate(sizes, 1):
        fname = f"COCO_val2014_{k:012d}.jpg"
        save(root / "val2014" / fname, rgb(h, w))
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
    (root / "val2014/COCO_val2014_000000000003.jpg").write_bytes(jpeg_bytes()[:1000])
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
    labs = [label(20, 24, (1,)), label(20, 24, (2, 3)), label(20, 24, (3,))]
    labs[1][9, :] = 255
    root = voc_tree(tmp_path / "own", {i: rgb(20, 24, k) for k, i in enumerate(ids)}, dict(zip(ids, labs)),
                     ids, ids[:1])
    params = voc_params(root, tmp_path)
    ds = open_dataset(params, "train")
    assert ds.class_names == ("a", "b", "c")
    assert [ds[j]["labels"].tolist() for j in range(3)] == [[1], [2, 3], [3]]
    assert check_split(ds) == []
    write_label_png(root / "SegmentationClass/i2.png", label(20, 24, (4,)))
    ds = open_dataset(params, "train")
    with pytest.raises(FmalibError, match=r"mask .*SegmentationClass/i2\.png holds class id 4 but only 3 foreground "
                                          r"classes were given \(ids 1\.\.3, 255 = ignore"):
        ds[2]
    assert [str(p).split("/")[-1] for p in check_split(ds)] == [
        "i2.png: class id(s) [4] outside 0..3 and 255 (ignore): 3 classes in params classes.names"]
    # voc.yaml keeps VOC's 20 classes
    assert len(load_params("params/voc.yaml").classes.names) == 20
