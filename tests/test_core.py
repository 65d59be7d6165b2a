"""params validation, atomic cache writes and resume, mIoU on hand-computed matrices, label PNG io."""
import numpy as np
import pytest

from fmalib.core.cache import StageCache, atomic_path, atomic_save_npz, load_npz, stable_hash
from fmalib.core.errors import FmalibError

from fmalib.data.labels import VOC_PALETTE, read_label_png, write_label_png
from fmalib.method.metrics import ConfusionMeter, confusion_matrix, iou_table, mean_iou


# ---------- cache ----------
def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_npz_bytes_deterministic_and_corrupt_file_named(tmp_path):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    atomic_save_npz(tmp_path / "a.npz", x=a)
    atomic_save_npz(tmp_path / "b.npz", x=a)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(load_npz(tmp_path / "a.npz")["x"], a)
    (tmp_path / "c.npz").write_bytes(b"garbage")
    with pytest.raises(FmalibError, match="c.npz"):
        load_npz(tmp_path / "c.npz")


def test_stage_cache_resumes_after_interruption(tmp_path):
    calls = []

    def run(ids, fail_at=None):
        cache = StageCache(tmp_path, "cams", {"p": 1}, code="fmalib.stages.cams")
        for i in ids:
            if cache.has(i):
                continue
            if i == fail_at:
                raise KeyboardInterrupt
            calls.append(i)
            cache.save_npz(i, v=np.full(3, int(i)))
        return cache

    with pytest.raises(KeyboardInterrupt):
        run(["1", "2", "3", "4"], fail_at="3")
    cache = run(["1", "2", "3", "4"])
    assert calls == ["1", "2", "3", "4"]  # 1 and 2 were not recomputed
    assert cache.done_ids() == {"1", "2", "3", "4"}
    other = StageCache(tmp_path, "cams", {"p": 2}, code="fmalib.stages.cams")
    assert other.dir != cache.dir  # other params, other directory
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})


# ---------- metrics ----------
def test_confusion_matrix_and_miou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = confusion_matrix(pred, gt, 3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 3, 0], [1, 0, 1]])
    # IoU: bg 1/(2+2-1)=1/3, c1 3/(3+4-3)=3/4, c2 1/(2+1-1)=1/2
    assert mean_iou(conf) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_miou_skips_absent_classes_and_accumulates():
    meter = ConfusionMeter(4)
    meter.add(np.array([0, 1, 1]), np.array([0, 1, 255]))
    meter.add(np.array([1, 0]), np.array([1, 0]))
    # class 2 and 3 never occur in gt or prediction: excluded from the mean (not counted as 0)
    assert meter.mean_iou() == pytest.approx(1.0)
    table = iou_table(meter.matrix, ["bg", "a", "b", "c"])
    assert table["iou"].isna().tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="outside 0..3"):
        confusion_matrix(np.array([5]), np.array([0]), 4)


# ---------- labels ----------
def test_label_png_round_trip_with_palette(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (7, 5)).astype(np.uint8)
    label[0, 0] = 255
    write_label_png(tmp_path / "l.png", label)
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), label)
    assert VOC_PALETTE[3:6] == [128, 0, 0] and VOC_PALETTE[-3:] == [224, 224, 192]
    with pytest.raises(FmalibError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    import stat

    atomic_save_npz(tmp_path / "p.npz", x=np.zeros(1))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "p.npz").stat().st_mode) == 0o666 & ~umask
