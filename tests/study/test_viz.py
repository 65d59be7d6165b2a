import numpy as np
import pandas as pd

from fmalib.study import viz


def test_overlay_keeps_background_and_colours_classes():
    img = np.full((4, 5, 3), 100, np.uint8)
    lab = np.zeros((4, 5), np.uint8)
    lab[1, 1] = 1  # VOC class 1 = (128, 0, 0)
    out = viz.overlay(img, lab, alpha=0.5)
    assert (out[0, 0] == 100).all()
    assert out[1, 1].tolist() == [114, 50, 50]


def test_mask_mosaic_and_savefig(tmp_path):
    img = np.zeros((6, 6, 3), np.uint8)
    masks = np.zeros((2, 6, 6), bool)
    masks[0, :3] = True
    out = viz.mask_mosaic(img, masks)
    assert out[:3].any() and not out[3:].any()
    fig = viz.per_class_bars(pd.DataFrame({"class": ["a", "b"], "iou": [0.2, 0.7]}))
    path = viz.savefig(fig, tmp_path, "bars")
    assert path.read_bytes()[:4] == b"\x89PNG"
