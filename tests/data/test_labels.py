"""Label PNG round trips with the VOC palette."""
import numpy as np
import pytest

from fmalib.core.errors import FmalibError
from fmalib.data.labels import VOC_PALETTE, read_label_png, write_label_png


def test_label_png_round_trip_with_palette(tmp_path):
    label = np.random.default_rng(0).integers(0, 21, (7, 5)).astype(np.uint8)
    label[0, 0] = 255
    write_label_png(tmp_path / "l.png", label)
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), label)
    assert VOC_PALETTE[3:6] == [128, 0, 0] and VOC_PALETTE[-3:] == [224, 224, 192]
    with pytest.raises(FmalibError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")
