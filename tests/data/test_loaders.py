"""VOC / COCO loaders on tiny fixture trees, the synthetic benchmark through both, open_dataset, stats."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset, stats
from fmalib.data.coco import COCODataset
from fmalib.data.labels import write_label_png
from fmalib.data.synthetic import CLASS_NAMES, read_annotations, write_benchmark
from fmalib.data.voc import VOC_CLASSES, VOCDataset
from fmalib.study.figures import sample_panels


def _img(path, h, w, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2012"
    _img(root / "JPEGImages/2007_000001.jpg", 8, 10, 10)
    _img(root / "JPEGImages/2007_000002.jpg", 6, 6, 20)
    _img(root / "JPEGImages/2008_000003.png", 5, 7, 30)  # .png images are accepted too
    a = np.zeros((8, 10), np.uint8)
    a[2:5, 2:5], a[1, :] = 15, 255  # person + an ignore row
    write_label_png(root / "SegmentationClass/2007_000001.png", a)
    b = np.zeros((6, 6), np.uint8)
    b[:3], b[3:, :2] = 1, 20
    write_label_png(root / "SegmentationClass/2007_000002.png", b)
    aug_a = a.copy()
    aug_a[6:, 6:] = 12  # the SBD mask differs: it must be the one train_aug reads
    write_label_png(root / "SegmentationClassAug/2007_000001.png", aug_a)
    write_label_png(root / "SegmentationClassAug/2008_000003.png", np.full((5, 7), 7, np.uint8))
    sets = root / "ImageSets/Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000001\n")
    (sets / "val.txt").write_text("2007_000002\n")
    (sets / "train_aug.txt").write_text("2007_000001\n2008_000003\n")
    return root


def test_voc_splits_and_labels_from_masks(voc_root):
    train, val, aug = (VOCDataset(voc_root, s) for s in ("train", "val", "train_aug"))
    assert (len(train), len(val), len(aug)) == (1, 1, 2)
    assert train.class_names == VOC_CLASSES and len(VOC_CLASSES) == 20
    t = train[0]
    assert t["id"] == "2007_000001" and t["image"].shape == (8, 10, 3) and t["image"].dtype == np.uint8
    assert t["labels"].dtype == np.int64 and t["labels"].tolist() == [15]
    assert t["gt"][1].tolist() == [255] * 10
    assert val[0]["labels"].tolist() == [1, 20]
    assert aug[0]["labels"].tolist() == [12, 15]  # read from SegmentationClassAug
    assert aug[1]["id"] == "2008_000003" and aug[1]["labels"].tolist() == [7]
    assert aug[1]["image"][0, 0, 0] == 30


def test_voc_train_aug_falls_back_to_segmentation_class(voc_root):
    (voc_root / "ImageSets/Segmentation/train_aug.txt").write_text("2007_000002\n")
    assert VOCDataset(voc_root, "train_aug")[0]["labels"].tolist() == [1, 20]


def test_voc_errors_print_layout(voc_root, tmp_path):
    with pytest.raises(FmalibError, match="(?s)does not exist.*JPEGImages/<id>.jpg"):
        VOCDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FmalibError, match="unknown"):
        VOCDataset(voc_root, "trainval_typo")
    (voc_root / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FmalibError, match="(?s)val.txt does not exist.*expected layout"):
        VOCDataset(voc_root, "val")
    (voc_root / "JPEGImages/2007_000001.jpg").unlink()
    with pytest.raises(FmalibError, match="(?s)2007_000001.jpg.*not found.*expected layout"):
        VOCDataset(voc_root, "train")[0]
    write_label_png(voc_root / "SegmentationClass/2007_000002.png", np.full((6, 6), 5, np.uint8))
    (voc_root / "ImageSets/Segmentation/val.txt").write_text("2007_000002\n")
    with pytest.raises(FmalibError, match="class id 5"):
        VOCDataset(voc_root, "val", class_names=("a", "b"))[0]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("syn") / "toy", 6, 6, seed=4, size_range=(112, 128))


def test_voc_loader_reads_synthetic_benchmark_unchanged(synthetic_root):
    ann = read_annotations(synthetic_root)
    for split in ("train", "val"):
        ds = VOCDataset(synthetic_root, split, CLASS_NAMES)
        assert len(ds) == 6 and ds.class_names == CLASS_NAMES
        for i in range(len(ds)):
            item = ds[i]
            a = ann["images"][item["id"]]
            assert a["split"] == split
            assert item["labels"].tolist() == a["labels"]
            assert list(item["gt"].shape) == a["size"] == list(item["image"].shape[:2])


def test_coco_format_export_of_synthetic_matches_voc_gt(synthetic_root):
    voc = VOCDataset(synthetic_root, "val", CLASS_NAMES)
    coco = COCODataset(synthetic_root, "val", ann_file=synthetic_root / "annotations/instances_val.json",
                       image_dir=synthetic_root / "JPEGImages")
    assert coco.class_names == CLASS_NAMES and coco.ids == voc.ids
    for i in range(len(voc)):
        a, b = voc[i], coco[i]
        assert np.array_equal(a["image"], b["image"]) and a["labels"].tolist() == b["labels"].tolist()
        valid = a["gt"] != 255
        assert np.array_equal(a["gt"][valid], b["gt"][valid])


def _poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    _img(root / "val2014/COCO_val2014_000000000042.jpg", 20, 30, 50)
    _img(root / "val2014/COCO_val2014_000000000073.jpg", 10, 10, 60)
    _img(root / "val2014/COCO_val2014_000000000099.jpg", 10, 10, 70)
    crowd = np.zeros((20, 30), np.uint8, order="F")
    crowd[15:20, 0:30] = 1
    crowd_rle = mask_utils.encode(crowd)
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    ann = {
        "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 20, "width": 30},
                   {"id": 73, "file_name": "COCO_val2014_000000000073.jpg", "height": 10, "width": 10},
                   {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "height": 10, "width": 10}],
        # category ids are not contiguous in COCO (1..90): labels follow id order
        "categories": [{"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"}],
        "annotations": [
            # a large car with a small person painted on top of it (smaller instances win)
            {"id": 1, "image_id": 42, "category_id": 1, "segmentation": _poly(4, 4, 8, 8), "area": 16,
             "bbox": [4, 4, 4, 4], "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 3, "segmentation": _poly(0, 0, 20, 12), "area": 240,
             "bbox": [0, 0, 20, 12], "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 90, "segmentation": crowd_rle, "area": 150,
             "bbox": [0, 15, 30, 5], "iscrowd": 1},
            {"id": 4, "image_id": 73, "category_id": 90, "segmentation": _poly(0, 0, 5, 5), "area": 25,
             "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/instances_val2014.json").write_text(json.dumps(ann))
    return root


def test_coco_loader_on_fixture(coco_root):
    ds = COCODataset(coco_root, "val")
    assert ds.class_names == ("person", "car", "toothbrush")  # category-id order -> 1, 2, 3
    assert ds.ids == ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]  # 99 has no annotation
    item = ds[0]
    assert item["image"].shape == (20, 30, 3) and item["labels"].tolist() == [1, 2]
    gt = item["gt"]
    assert gt.shape == (20, 30) and gt.dtype == np.uint8
    assert gt[6, 6] == 1 and gt[2, 15] == 2 and gt[14, 25] == 0
    assert (gt[16:, :] == 255).all()  # crowd -> ignore
    assert ds[1]["labels"].tolist() == [3]
    assert len(COCODataset(coco_root, "val", include_empty=True)) == 3


def test_coco_errors(coco_root, tmp_path):
    with pytest.raises(FmalibError, match="(?s)does not exist.*instances_train2014.json"):
        COCODataset(tmp_path / "nope", "val")
    with pytest.raises(FmalibError, match="(?s)instances_train2014.json does not exist.*expected layout"):
        COCODataset(coco_root, "train")
    with pytest.raises(FmalibError, match="unknown"):
        COCODataset(coco_root, "test")
    (coco_root / "val2014/COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(FmalibError, match="000073.jpg.*does not exist"):
        COCODataset(coco_root, "val")[1]


def test_open_dataset_synthetic_writes_once_and_reads(tmp_path):
    p = load_params("params/toy.yaml", {"data.root": str(tmp_path / "toy"), "data.synthetic.n_train": 4,
                                        "data.synthetic.n_val": 3})
    ds = open_dataset(p, p.data.val_split)
    assert len(ds) == 3 and ds.class_names == CLASS_NAMES and ds.ids[0] == "val_00000"
    stamp = (tmp_path / "toy/manifest.json").stat().st_mtime_ns
    train = open_dataset(p, p.data.train_split)
    assert len(train) == 4 and (tmp_path / "toy/manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(FmalibError, match="key data.kind is 'pascal'; expected one of synthetic, voc, coco"):
        load_params("params/toy.yaml", {"data.root": str(tmp_path / "toy"), "data.kind": "pascal"})


def test_open_dataset_voc(voc_root):
    p = load_params("params/voc.yaml", {"data.root": str(voc_root)})
    assert len(open_dataset(p, "train_aug")) == 2
    # the toy's six class names with VOC's 20-class masks: the dataset takes classes.names, and the masks'
    # ids above 6 are errors naming the file
    toy = load_params("params/toy.yaml", {"data.kind": "voc", "data.root": str(voc_root)})
    ds = open_dataset(toy, "train_aug")
    assert ds.class_names == tuple(toy.classes.names)
    with pytest.raises(FmalibError, match=r"SegmentationClassAug/2007_000001.png holds class ids 12, 15 but only 6"):
        ds[0]


def test_label_statistics_and_tables(voc_root):
    ds = VOCDataset(voc_root, "train_aug")
    st = stats.label_statistics(ds)
    assert st.loc["person", "images"] == 1 and st.loc["dog", "images"] == 1 and st.loc["car", "images"] == 1
    assert st.loc["background", "images"] == 1  # the all-car image has no background
    assert st["pixel_share"].sum() == pytest.approx(1.0)
    # person: 9 px of the 70 valid of image a plus 35 of image c
    assert st.loc["person", "pixel_share"] == pytest.approx(9 / (70 + 35))
    assert stats.labels_per_image(ds).to_dict() == {1: 1, 2: 1}
    co = stats.class_cooccurrence(ds)
    assert co.loc["person", "dog"] == 1 and co.loc["car", "car"] == 1 and co.loc["car", "person"] == 0


def test_cooccurrence_table_hand_computed():
    ann = {"class_names": ["ball", "boat"], "stuff_names": ["grass", "water"], "images": {
        "a": {"split": "train", "labels": [2], "instances": [{}], "stuff": [{"name": "water"}]},
        "b": {"split": "train", "labels": [2], "instances": [{}, {}], "stuff": [{"name": "grass"}, {"name": "water"}]},
        "c": {"split": "train", "labels": [1, 2], "instances": [{}, {}], "stuff": [{"name": "grass"}]},
        "d": {"split": "val", "labels": [1], "instances": [{}], "stuff": [{"name": "water"}]},
    }}
    t = stats.cooccurrence_table(ann, split="train")
    assert t.loc["boat", "water"] == pytest.approx(2 / 3) and t.loc["boat", "grass"] == pytest.approx(2 / 3)
    assert t.loc["ball", "grass"] == 1.0 and t.loc["ball", "water"] == 0.0
    assert t["images"].tolist() == [1, 3]
    assert stats.objects_per_image(ann).to_dict() == {1: 2, 2: 2}


def test_cooccurrence_in_written_benchmark(synthetic_root):
    t = stats.cooccurrence_table(read_annotations(synthetic_root))
    assert ((t.drop(columns="images") >= 0) & (t.drop(columns="images") <= 1)).all().all()


def test_sample_panels_pair_images_with_overlays(synthetic_root):
    ds = VOCDataset(synthetic_root, "train", CLASS_NAMES)
    images, titles = sample_panels(ds, n=3, seed=1)
    assert len(images) == len(titles) == 6
    assert images[0].shape == images[1].shape and not np.array_equal(images[0], images[1])
    assert titles[1] == "GT" and titles[0].split("\n")[0] in ds.ids
