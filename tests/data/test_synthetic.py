"""The embedded synthetic benchmark: determinism, label/instance consistency, co-occurrence, atomic writes."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from fmalib.core.errors import FmalibError
from fmalib.data import synthetic as syn
from fmalib.data.labels import read_label_png


@pytest.fixture(scope="module")
def samples():
    return [syn.generate_sample(3, i, syn.sample_size(3, i, (112, 128))) for i in range(40)]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = syn.write_benchmark(tmp_path / "a", 6, 4, seed=7, size_range=(112, 128))
    b = syn.write_benchmark(tmp_path / "b", 6, 4, seed=7, size_range=(112, 128))
    c = syn.write_benchmark(tmp_path / "c", 6, 4, seed=8, size_range=(112, 128))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 10 + 10 + 2 + 2 + 2  # images, labels, split lists, COCO jsons, annotations + manifest
    assert fa == fb
    assert fa["JPEGImages/train_00000.png"] != fc["JPEGImages/train_00000.png"]


def test_samples_independent_of_split_sizes(tmp_path):
    small = syn.write_benchmark(tmp_path / "s", 2, 2, seed=1, size_range=(112, 128))
    big = syn.write_benchmark(tmp_path / "b", 5, 3, seed=1, size_range=(112, 128))
    for name in ("JPEGImages/train_00001.png", "SegmentationClass/val_00001.png"):
        assert (small / name).read_bytes() == (big / name).read_bytes()


def test_generate_sample_is_a_pure_function_of_seed_and_index():
    s1, s2 = syn.generate_sample(5, 11, (120, 112)), syn.generate_sample(5, 11, (120, 112))
    assert s1.image.shape == (120, 112, 3) and s1.image.dtype == np.uint8
    assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.semantic, s2.semantic)
    assert s1.caption == s2.caption
    assert not np.array_equal(s1.image, syn.generate_sample(5, 12, (120, 112)).image)


def test_labels_semantic_and_instances_agree(samples):
    for s in samples:
        assert 1 <= len(s.instances) <= 3
        h, w = s.semantic.shape
        from_inst = np.zeros((h, w), np.uint8)
        union = np.zeros((h, w), bool)
        for inst in s.instances:
            assert not (union & inst.mask).any(), "visible instance masks must be disjoint"
            union |= inst.mask
            from_inst[inst.mask] = inst.class_id
            assert inst.parts and len(inst.parts) <= len(syn.PART_NAMES[syn.CLASS_NAMES[inst.class_id - 1]])
            parts = np.zeros((h, w), int)
            for p in inst.parts:
                assert not (p & ~inst.mask).any(), "parts lie inside their instance"
                parts += p
            assert parts.max() <= 1 and np.array_equal(parts.astype(bool), inst.mask), "parts tile the instance"
        valid = s.semantic != 255
        assert np.array_equal(s.semantic[valid], from_inst[valid])
        assert set(np.unique(s.semantic)) - {0, 255} == set(s.labels)
        assert s.labels == tuple(sorted({i.class_id for i in s.instances}))
        ignore = s.semantic == 255
        assert 0 < ignore.mean() < 0.2  # thin boundaries only
        assert (ignore <= _dilate(union)).all(), "255 only next to objects"
        stuff = np.zeros((h, w), int)
        for name, m in s.stuff:
            assert name in syn.STUFF_NAMES
            stuff += m
        assert (stuff == 1).all(), "stuff regions partition the image"
        assert 1 <= len(s.stuff) <= 3
        for inst in s.instances:
            assert syn.CLASS_NAMES[inst.class_id - 1] in s.caption


def _dilate(m):
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    d[:, 1:] |= m[:, :-1]
    d[:, :-1] |= m[:, 1:]
    return d


def test_parts_exist_for_part_classes(samples):
    n_parts = Counter()
    for s in samples:
        for inst in s.instances:
            n_parts[syn.CLASS_NAMES[inst.class_id - 1]] = max(n_parts[syn.CLASS_NAMES[inst.class_id - 1]], len(inst.parts))
    assert sum(n >= 2 for n in n_parts.values()) >= 3


def test_class_stuff_cooccurrence_present():
    """Boats sit on water, kites fly in sky, cars drive on roads far more often than chance."""
    with_stuff, total = Counter(), Counter()
    for i in range(150):
        s = syn.generate_sample(0, i, 112)
        names = {n for n, _ in s.stuff}
        for c in s.labels:
            cls = syn.CLASS_NAMES[c - 1]
            total[cls] += 1
            pref = max(syn.STUFF_PREFERENCE[cls], key=syn.STUFF_PREFERENCE[cls].get)
            with_stuff[cls] += pref in names
    for cls in ("boat", "kite", "car"):
        assert total[cls] >= 10
        assert with_stuff[cls] / total[cls] >= 0.7, (cls, with_stuff[cls], total[cls])


def test_sizes_are_multiples_of_8_in_range_and_not_always_square():
    sizes = [syn.sample_size(0, i, (112, 128)) for i in range(50)]
    assert all(112 <= v <= 128 and v % 8 == 0 for hw in sizes for v in hw)
    assert any(h != w for h, w in sizes)


def test_caption_text():
    assert syn.make_caption([3, 2], ["water"]) == "a boat and a star on water"
    assert syn.make_caption([1, 1, 6]) == "two balls and a kite"


def test_annotations_roundtrip(tmp_path):
    root = syn.write_benchmark(tmp_path / "b", 3, 2, seed=2, size_range=(112, 120))
    ann = syn.read_annotations(root)
    assert ann["class_names"] == list(syn.CLASS_NAMES)
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == ["val_00000", "val_00001"]
    s = syn.generate_sample(2, syn.SPLIT_OFFSET["val"] + 1, syn.sample_size(2, syn.SPLIT_OFFSET["val"] + 1, (112, 120)))
    back = syn.load_sample(root, "val_00001", ann)
    assert np.array_equal(back.image, s.image) and np.array_equal(back.semantic, s.semantic)
    assert np.array_equal(read_label_png(root / "SegmentationClass/val_00001.png"), s.semantic)
    assert [i.class_id for i in back.instances] == [i.class_id for i in s.instances]
    for a, b in zip(back.instances, s.instances):
        assert np.array_equal(a.mask, b.mask) and all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts))
    assert back.caption == s.caption and ann["images"]["val_00001"]["size"] == list(s.semantic.shape)


def test_existing_benchmark_skipped_changed_settings_replaced(tmp_path):
    root = syn.write_benchmark(tmp_path / "b", 2, 1, seed=0, size_range=(112, 112))
    stamp = (root / "annotations.json").stat().st_mtime_ns
    syn.write_benchmark(root, 2, 1, seed=0, size_range=(112, 112))
    assert (root / "annotations.json").stat().st_mtime_ns == stamp
    syn.write_benchmark(root, 3, 1, seed=0, size_range=(112, 112))
    assert len(syn.read_annotations(root)["images"]) == 4
    assert json.loads((root / "manifest.json").read_text())["n_train"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp dirs left behind


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = syn._render

    def flaky(args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(args)

    monkeypatch.setattr(syn, "_render", flaky)
    with pytest.raises(KeyboardInterrupt):
        syn.write_benchmark(tmp_path / "b", 4, 2, seed=0, size_range=(112, 112))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FmalibError, match="manifest"):
        syn.write_benchmark(tmp_path / "mine", 2, 1, seed=0)
    with pytest.raises(FmalibError, match="annotations.json"):
        syn.read_annotations(tmp_path / "mine")


def test_parallel_writer_gives_the_same_bytes(tmp_path):
    a = syn.write_benchmark(tmp_path / "a", 3, 2, seed=9, size_range=(112, 112), workers=1)
    b = syn.write_benchmark(tmp_path / "b", 3, 2, seed=9, size_range=(112, 112), workers=2)
    assert _files(a) == _files(b)
