"""Datasets as users have them: VOC split lists in both forms, the tiny VOC- and COCO-layout writers read back
through open_dataset with the real params, and the smoke-params copy."""
import numpy as np
import pytest
import yaml
from PIL import Image

from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.data.coco import COCODataset
from fmalib.data.layouts import (COCO_CATEGORIES, COCO_STAND_INS, VOC_STAND_INS, write_coco_layout, write_smoke_params,
                                 write_voc_layout)
from fmalib.data.voc import VOC_CLASSES, VOCDataset, split_line_id


@pytest.fixture(scope="module")
def voc_tiny(tmp_path_factory):
    return write_voc_layout(tmp_path_factory.mktemp("voc") / "VOC2012", n_train=4, n_val=2)


@pytest.fixture(scope="module")
def coco_tiny(tmp_path_factory):
    return write_coco_layout(tmp_path_factory.mktemp("coco") / "coco", n_train=3, n_val=2)


def test_split_line_forms():
    assert split_line_id("2007_000032") == "2007_000032"
    assert split_line_id("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png") == "2007_000032"
    assert split_line_id("JPEGImages/2011_003276.jpg SegmentationClassAug/2011_003276.png\n") == "2011_003276"
    assert split_line_id("2008_000002 1") == "2008_000002"  # id + flag lists keep the id


def test_two_column_train_aug_reads_like_one_id_lists(voc_tiny):
    first = (voc_tiny / "ImageSets/Segmentation/train_aug.txt").read_text().splitlines()[0]
    assert first.startswith("/JPEGImages/") and first.split()[1].startswith("/SegmentationClassAug/")
    aug, train = VOCDataset(voc_tiny, "train_aug"), VOCDataset(voc_tiny, "train")
    assert aug.ids == train.ids and len(aug) == 4
    item = aug[0]  # image and SBD's grayscale mask found from the two-column line
    assert item["image"].shape[:2] == item["gt"].shape
    with Image.open(aug.gt_path(0)) as im:
        assert im.mode == "L" and "SegmentationClassAug" in str(aug.gt_path(0))
    assert np.array_equal(item["gt"], train.load_gt(0))  # same labels as the palette mask


def test_voc_layout_through_the_real_params(voc_tiny):
    params = load_params("params/voc.yaml", {"data.root": str(voc_tiny)})
    train, val = open_dataset(params, params.data.train_split), open_dataset(params, params.data.val_split)
    assert (len(train), len(val)) == (4, 2) and train.class_names == VOC_CLASSES
    stand_ins = {VOC_CLASSES.index(v) + 1 for v in VOC_STAND_INS.values()}
    labels = set().union(*(set(train.image_labels(i).tolist()) for i in range(len(train))))
    assert labels and labels <= stand_ins
    assert train.image_path(0).suffix == ".jpg"


def test_coco_layout_through_the_real_params(coco_tiny):
    params = load_params("params/coco.yaml", {"data.root": str(coco_tiny)})
    train, val = open_dataset(params, "train"), open_dataset(params, "val")
    assert len(train.class_names) == 80 and list(train.class_names) == params.classes.names
    assert len(train.coco.imgs) == 4 and len(train) == 3  # the image without annotations is left out
    assert len(val) == 2 and train.ids[0].startswith("COCO_train2014_")
    crowd = [i for i in range(len(train)) if any(a["iscrowd"] for a in train._anns(train._image_ids[i]))]
    assert len(crowd) == 1
    gt = train.load_gt(crowd[0])
    assert (gt == 255).any()  # the crowd region is ignore
    cat_index = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}
    stand_ins = {cat_index[cid] for cid, name in COCO_CATEGORIES if name in COCO_STAND_INS.values()}
    present = set(np.unique(gt).tolist()) - {0, 255}
    assert present and present <= stand_ins and set(train.image_labels(crowd[0]).tolist()) <= present
    ds = COCODataset(coco_tiny, "val")
    assert ds[0]["image"].shape[:2] == ds[0]["gt"].shape


def test_smoke_params_copy_is_a_complete_params_file(voc_tiny, tmp_path):
    out = write_smoke_params("params/voc.yaml", voc_tiny, tmp_path / "voc-tiny.yaml", workdir=tmp_path / "w")
    copy = load_params(out)
    assert copy.fast is None and copy.data.root == str(voc_tiny.resolve())
    assert copy.clip.model == "fmalib-tiny-clip" and copy.workdir == str((tmp_path / "w").resolve())
    assert yaml.safe_load(out.read_text())["classes"]["names"] == list(VOC_CLASSES)
