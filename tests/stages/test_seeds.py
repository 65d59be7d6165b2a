"""make_seeds end to end on a tiny benchmark: GT-region masks in the mask cache + blurry low-res CAMs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.data.labels import read_label_png
from fmalib.method.masks import MaskSet
from fmalib.method.metrics import mean_iou
from fmalib.method.rle import MaskRuns
from fmalib.stages.masks import mask_cache, save_masks
from fmalib.stages.seeds import make_seeds
from fmalib.stages.seed_eval import evaluate_seeds, seed_power_sweep


@pytest.fixture
def setup(tmp_path):
    params = load_params("params/toy.yaml", {
        "data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "work"),
        "data.synthetic.n_train": 5, "data.synthetic.n_val": 1,
        "sam.checkpoint": None, "sams.power_images": 5,
    })
    ds = open_dataset(params, "train")
    cache = mask_cache(params, "train")
    cams = {}
    for j in range(len(ds)):
        item = ds[j]
        gt = item["gt"]
        regions = [gt == c for c in np.unique(gt) if c != 255]  # each class region is a whole mask
        if j == 0:
            regions = []  # no mask at all: the CAM-argmax fallback
        masks = np.stack(regions) if regions else np.zeros((0, *gt.shape), bool)
        ms = MaskSet.from_runs(MaskRuns.from_bool(masks), [2] * len(masks), [0.9] * len(masks), [1.0] * len(masks))
        save_masks(cache, item["id"], ms)
        # a blurry CAM: the class indicator averaged onto an 8x8 grid
        labels = item["labels"]
        h, w = gt.shape
        low = np.stack([(gt == c).astype(np.float32)[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8)
                        .mean((1, 3)) for c in labels])
        cams[item["id"]] = (low, labels)
    return params, ds, cams


def test_make_seeds_writes_resumable_palette_pngs(setup):
    params, ds, cams = setup
    source = cams.__getitem__
    seeds = make_seeds(params, "train", source, "fine")
    assert seeds.power_table is not None and seeds.bg_power in params.sams.power_grid
    assert seeds.stats == {"images": 5, "fallback": 1}
    for j in range(len(ds)):
        label = read_label_png(seeds.path(ds.ids[j]))
        assert label.shape == ds[j]["gt"].shape
        assert set(np.unique(label)) <= {0, *ds[j]["labels"].tolist()}
    conf = evaluate_seeds(ds, seeds.dir)
    # perfect masks + blurry CAMs: SAMS recovers the regions (image 0, mask-less, is the CAM argmax)
    assert mean_iou(conf) > 0.8
    meta = json.loads((seeds.dir / "meta.json").read_text())
    assert meta["bg_power"] == seeds.bg_power and seeds.fallback_images == 1  # fallback-0of1.json
    again = make_seeds(params, "train", source, "fine")  # resumes: nothing left to write
    assert again.dir == seeds.dir and again.stats["images"] == 0
    fixed = make_seeds(params, "train", source, "coarse", bg_power=0.5, shard=(1, 2))
    assert fixed.power_table is None and fixed.stats["images"] == 2 and fixed.dir != seeds.dir
    sweep = seed_power_sweep(params, "train", source, [0.3, 1.0])
    assert list(sweep["bg_power"]) == [0.3, 1.0] and sweep["miou"].between(0, 1).all()


def test_make_seeds_needs_the_masks(setup):
    params, ds, cams = setup
    with pytest.raises(FmalibError, match="not cached"):
        make_seeds(load_params(dict(params), {"masks.overlap_thresh": 0.2}), "train", cams.__getitem__)
    with pytest.raises(FmalibError, match="cam_source"):
        make_seeds(params, "train", 42)
    with pytest.raises(FmalibError, match="kind .medium."):
        make_seeds(params, "train", cams.__getitem__, "medium")


def test_params_reject_swapped_confident_levels(setup):
    """Swapped sams.confident_hi / confident_lo would score p on the uncertain band: both the params and the
    seeding stage refuse them, naming both keys."""
    params, ds, cams = setup
    for hi, lo in ((0.1, 0.9), (0.5, 0.5)):
        with pytest.raises(FmalibError, match=r"sams\.confident_hi.*sams\.confident_lo"):
            load_params(dict(params), {"sams.confident_hi": hi, "sams.confident_lo": lo})
    # a params object edited after validation is still caught when "auto" needs the levels
    bad = load_params(dict(params))
    bad["sams"]["confident_hi"], bad["sams"]["confident_lo"] = 0.1, 0.9
    with pytest.raises(FmalibError, match=r"confident_hi.*confident_lo"):
        make_seeds(bad, "train", cams.__getitem__, "fine")
