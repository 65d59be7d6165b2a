"""The GT-free view of seeds (a split without masks): per class, the share of the foreground seed pixels
against the share of the tags, how often a tagged class shows, and images left all background — by hand."""
import numpy as np
import pytest

from fmalib.data.labels import write_label_png
from fmalib.study.seed_report import seed_diagnostics


class TwoImages:
    class_names = ("cat", "dog")
    ids = ["a", "b"]
    has_masks = False

    def __len__(self):
        return 2

    def image_labels(self, i):
        return np.array([[1, 2], [2]][i])


def test_seed_diagnostics_by_hand(tmp_path):
    a = np.zeros((2, 5), np.uint8)
    a[0, :3] = 1            # 3 cat pixels; the tagged dog does not show
    b = np.zeros((2, 5), np.uint8)  # the tagged dog does not show: an image left all background
    write_label_png(tmp_path / "a.png", a)
    write_label_png(tmp_path / "b.png", b)
    d = seed_diagnostics(TwoImages(), {"S": tmp_path}).set_index("class")
    # tags: cat once, dog twice -> 1/3, 2/3; seed pixels: 3 cat of 3 fg; 17 bg of 20
    assert d.loc["cat", "tag_share"] == pytest.approx(1 / 3) and d.loc["dog", "tag_share"] == pytest.approx(2 / 3)
    assert d.loc["cat", "pixel_share"] == 1.0 and d.loc["dog", "pixel_share"] == 0.0
    assert d.loc["background", "pixel_share"] == pytest.approx(17 / 20)
    assert d.loc["cat", "shown"] == 1.0 and d.loc["dog", "shown"] == 0.0
    assert d.loc["background", "shown"] == 0.5  # image b: tagged, all background
