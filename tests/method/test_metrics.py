"""mIoU on hand-computed confusion matrices."""
import numpy as np
import pytest

from fmalib.method.metrics import ConfusionMeter, confusion_matrix, iou_table, mean_iou


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
