"""Tags datasets (data.kind tags): images with image-level tags only — CSV, JSON Lines, one folder per class —
and every bad-tags case reported at once, each with its message."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset, with_classes
from fmalib.data.check import check_split, problems_error
from fmalib.data.layouts import TAGS_SPLITS, export_tags, write_tags_layout, write_voc_layout
from fmalib.data.synthetic import CLASS_NAMES
from fmalib.data.tags import TagsDataset
from fmalib.study.cli import main

NAMES = ["dog", "cat", "potted plant"]


def _photo(path, size=(20, 24), value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _params(root, tags, names=NAMES, **data):
    classes = {"bg_words": ["ground"], **({"names": names} if names is not None else {})}
    return load_params({"name": "t", "workdir": str(root / "work"), "classes": classes,
                        "data": {"kind": "tags", "root": str(root), "train_split": "train", "val_split": "val",
                                 "tags": tags, **data}})


def test_csv_with_bom_without_header_reads_labels_in_file_order(tmp_path):
    for name in ("b.jpg", "a.jpg", "sub/c.png"):
        _photo(tmp_path / "img" / name)
    (tmp_path / "tags.csv").write_bytes("\ufeffb.jpg,dog;cat\na.jpg, Potted  Plant \nsub/c.png,cat\n".encode())
    ds = TagsDataset(tmp_path, "train", {"images": "img", "tags": "tags.csv"}, NAMES)
    assert ds.ids == ["b", "a", "sub_c"]  # the file's order; sub-folders joined with _
    assert [ds.image_labels(i).tolist() for i in range(3)] == [[1, 2], [3], [2]]
    item = ds[0]
    assert item["gt"] is None and item["image"].shape == (20, 24, 3) and not ds.has_masks
    notes = [str(p) for p in ds.problems]
    assert len(notes) == 1 and "' Potted  Plant ' read as 'potted plant' (case / spaces normalised)" in notes[0]


def test_csv_header_and_jsonl_give_the_same_dataset(tmp_path):
    for name in ("x.jpg", "y.jpg"):
        _photo(tmp_path / "img" / name)
    (tmp_path / "t.csv").write_text("image,labels\nx.jpg,dog\ny.jpg,cat;dog\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "x.jpg", "labels": ["dog"]}) + "\n\n"
                                      + json.dumps({"image": "y.jpg", "labels": ["cat", "dog"]}) + "\n")
    a = TagsDataset(tmp_path, "train", {"images": "img", "tags": "t.csv"}, NAMES)
    b = TagsDataset(tmp_path, "train", {"images": "img", "tags": "t.jsonl"}, NAMES)
    assert a.ids == b.ids == ["x", "y"]
    assert [a.image_labels(i).tolist() for i in range(2)] == [b.image_labels(i).tolist() for i in range(2)] \
        == [[1], [1, 2]]


def test_one_folder_per_class_is_single_label_data(tmp_path):
    _photo(tmp_path / "train" / "dog" / "001.jpg")
    _photo(tmp_path / "train" / "cat" / "001.jpg")
    _photo(tmp_path / "train" / "cat" / "002.png")
    params = _params(tmp_path, {"train": {"images": "train"}}, names=None)
    params = with_classes(params)
    assert params.classes.names == ["cat", "dog"] and params.classes.synonyms == ["cat", "dog"]
    ds = open_dataset(params, "train")
    assert ds.ids == ["cat_001", "cat_002", "dog_001"]
    assert [ds.image_labels(i).tolist() for i in range(3)] == [[1], [1], [2]]


def test_every_bad_tags_case_is_listed_in_one_error(tmp_path):
    for name in ("ok.jpg", "twice.jpg", "untagged.jpg", "unlisted.jpg", "same.jpg"):
        _photo(tmp_path / "img" / name)
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "tags.csv").write_text(
        "image,labels\n"
        "ok.jpg,dgo\n"              # 2: unknown class, close to dog
        "gone.jpg,dog\n"            # 3: missing image
        "untagged.jpg,\n"           # 4: no tags (refused)
        "twice.jpg,dog\n"           # 5
        "twice.jpg,cat\n"           # 6: repeated with other tags
        "same.jpg,cat\n"
        "same.jpg,CAT\n"            # 8: repeated with the same tags (normalised): a note
        "broken.jpg,dog\n")         # 9: undecodable, found by the data check
    with pytest.raises(FmalibError) as exc:
        TagsDataset(tmp_path, "train", {"images": "img", "tags": "tags.csv"}, NAMES)
    msg = str(exc.value)
    assert "4 problem(s)" in msg
    assert "tags.csv:2: unknown class 'dgo'" in msg and "closest known: dog" in msg
    assert "tags.csv:3: image" in msg and "gone.jpg does not exist" in msg
    assert "tags.csv:4: image 'untagged.jpg' has no tags" in msg and "data.untagged: background" in msg
    assert "tags.csv:6: image 'twice.jpg' repeated with other tags than at" in msg and "tags.csv:5" in msg

    # the data check adds each image's decode check and keeps the notes
    ds = TagsDataset(tmp_path, "train", {"images": "img", "tags": "tags.csv"}, NAMES, untagged="background",
                     strict=False)
    problems = check_split(ds)
    errors = [str(p) for p in problems if p.error]
    notes = [str(p) for p in problems if not p.error]
    assert any("broken.jpg: cannot be decoded" in e for e in errors)
    assert not any("untagged" in e for e in errors)
    assert any("'untagged.jpg' has no tags: kept as background only" in n for n in notes)
    assert any("'same.jpg' repeats" in n and "read once" in n for n in notes)
    assert any("1 image(s) have no row in tags.csv" in n and "unlisted.jpg" in n for n in notes)
    assert any("'CAT' read as 'cat'" in n for n in notes)
    assert "4 problem(s) in 4 file(s)" in str(problems_error(problems, "train"))
    assert ds.image_labels(ds.ids.index("untagged")).tolist() == []


def test_python_m_fmalib_data_lists_every_problem_of_both_splits(tmp_path, capsys):
    write_tags_layout(tmp_path / "d", n_train=3, n_val=2)
    (tmp_path / "d" / "train.csv").write_text("image,labels\n2008_000000.jpg,bal\n2008_000001.jpg,star\n")
    (tmp_path / "d" / "val" / "2007_000001.jpg").write_bytes(b"truncated")
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({"name": "t", "workdir": str(tmp_path / "w"),
                                  "classes": {"names": list(CLASS_NAMES), "bg_words": ["ground"]},
                                  "data": {"kind": "tags", "root": str(tmp_path / "d"), "train_split": "train",
                                           "tags": TAGS_SPLITS}}))
    assert main(["data", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s) in 2 file(s)" in err
    assert "unknown class 'bal'" in err and "closest known: ball" in err
    assert "2007_000001.jpg: cannot be decoded" in err


def test_derived_classes_are_sorted_and_logged_but_masks_need_the_names(tmp_path, caplog):
    write_tags_layout(tmp_path, n_train=6, n_val=2)
    params = _params(tmp_path, {"train": TAGS_SPLITS["train"]}, names=None)
    with caplog.at_level(logging.INFO):
        names = with_classes(params).classes.names
    assert names == sorted(names) and set(names) <= set(CLASS_NAMES) and len(names) >= 3
    assert "classes from the tags (classes.names not given), sorted: " + ", ".join(names) in caplog.text
    with pytest.raises(FmalibError, match=r"data.tags.val.masks is set but classes.names is not"):
        open_dataset(_params(tmp_path, TAGS_SPLITS, names=None), "train")
    with pytest.raises(FmalibError, match=r"missing key classes.names .*only data.kind tags"):
        load_params({"name": "t", "workdir": "w", "classes": {"bg_words": ["x"]},
                     "data": {"kind": "voc", "root": "r"}})


def test_tags_layout_matches_the_voc_layout_image_for_image(tmp_path):
    """The same JPEG bytes and ids; the tags equal the mask-derived labels; val masks give mIoU as VOC's do."""
    write_tags_layout(tmp_path / "tags", n_train=4, n_val=2)
    write_voc_layout(tmp_path / "voc", n_train=4, n_val=2, stand_ins=False)
    params = _params(tmp_path / "tags", TAGS_SPLITS, names=list(CLASS_NAMES))
    voc = load_params({**params.to_dict(), "data": {"kind": "voc", "root": str(tmp_path / "voc"),
                                                    "train_split": "train", "val_split": "val"}})
    for split in ("train", "val"):
        t, v = open_dataset(params, split), open_dataset(voc, split)
        assert t.ids == v.ids
        for i in range(len(t)):
            assert t.image_path(i).read_bytes() == v.image_path(i).read_bytes()
            assert t.image_labels(i).tolist() == v.image_labels(i).tolist()
            if split == "val":
                assert np.array_equal(t[i]["gt"], v[i]["gt"])
    with pytest.raises(FmalibError, match=r"tags split 'train' has no masks \(params data.tags.train.masks\)"):
        open_dataset(params, "train").load_gt(0)
    shutil.rmtree(tmp_path / "voc")


def test_export_tags_writes_a_split_back_as_photos_tags_and_masks(tmp_path):
    params = load_params("params/toy.yaml", {"data.root": str(tmp_path / "toy"), "workdir": str(tmp_path / "w"),
                                             "data.synthetic.n_train": 3, "data.synthetic.n_val": 2})
    splits = export_tags(params, tmp_path / "tags", masks_for=("val",))
    assert splits == {"train": {"images": "train", "tags": "train.csv"},
                      "val": {"images": "val", "tags": "val.csv", "masks": "val_masks"}}
    back = load_params({**params.to_dict(), "data": {"kind": "tags", "root": str(tmp_path / "tags"),
                                                      "train_split": "train", "val_split": "val", "tags": splits}})
    for split in ("train", "val"):
        a, b = open_dataset(params, split), open_dataset(back, split)
        assert a.ids == b.ids and b.has_masks == (split == "val")
        for i in range(len(a)):
            assert a.image_labels(i).tolist() == b.image_labels(i).tolist()
            assert np.abs(a.load_image(i).astype(int) - b.load_image(i).astype(int)).mean() < 3  # JPEG q95
            if split == "val":
                assert np.array_equal(a.load_gt(i), b.load_gt(i))


def test_tags_splits_merge_through_base_files_and_bad_entries_are_named(tmp_path):
    over = tmp_path / "my.yaml"
    over.write_text(f"_BASE_: {Path('params/tags.yaml').resolve()}\ndata:\n  tags:\n"
                    "    val: {images: photos, tags: v.jsonl, masks: null}\n")
    tags = load_params(over).data.tags
    assert tags["val"] == {"images": "photos", "tags": "v.jsonl", "masks": None}
    assert tags["train"] == {"images": "train", "tags": "train.csv"}  # the base file's
    with pytest.raises(FmalibError, match=r"key data.tags.train is \{'imgs': 'x'\}; expected \{images: folder"):
        load_params("params/tags.yaml", {"data.tags": {"train": {"imgs": "x"}}})
