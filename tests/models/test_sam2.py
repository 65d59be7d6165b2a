"""SAM 2 as a mask generator (masks.generator: sam2): the registry, the cache key, the install message, and a
random-init Hiera-tiny SAM 2 at 64 px yielding a valid MaskSet with levels (skipped without the sam2 package)."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.method.masks import MaskSet
from fmalib.models.checkpoints import load_sam2_from_params, sam2_fingerprint
from fmalib.models.sam2 import load_sam2, require_sam2, sam2_config_file
from fmalib.stages.mask_generators import GENERATORS, build_mask_generator, generator_key
from fmalib.stages.masks import load_masks, mask_cache, run_mask_stage

pytestmark = pytest.mark.usefixtures("one_thread")

HAVE_SAM2 = importlib.util.find_spec("sam2") is not None
needs_sam2 = pytest.mark.skipif(not HAVE_SAM2, reason='the optional sam2 package is not installed '
                                                      '(pip install -e ".[sam2]")')


def params(tmp_path, **overrides):
    base = {"data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "work"), "data.synthetic.n_train": 2,
            "data.synthetic.n_val": 1, "masks.generator": "sam2", "sam2.image_size": 64,
            "masks.points_per_side": 4, "masks.pred_iou_thresh": 0.0, "masks.stability_score_thresh": 0.0}
    return load_params("params/toy.yaml", {**base, **overrides})


def test_registry_and_cache_key(tmp_path):
    assert set(GENERATORS) == {"sam", "sam2"}
    p2 = params(tmp_path)
    p1 = load_params(dict(p2), {"masks.generator": "sam"})
    assert generator_key(p2) == {"generator": "sam2", "model": {"config": "sam2.1_hiera_t", "image_size": 64,
                                                               "random_init_seed": 0}}
    assert generator_key(p1)["generator"] == "sam"
    assert mask_cache(p1, "train").dir != mask_cache(p2, "train").dir
    assert mask_cache(p2, "train").dir != mask_cache(load_params(dict(p2), {"sam2.image_size": 96}), "train").dir
    with pytest.raises(FmalibError, match="key masks.generator is 'sam3'; expected one of sam, sam2"):
        load_params(dict(p2), {"masks.generator": "sam3"})
    with pytest.raises(FmalibError, match="sam2.checkpoint: .*nope.pt does not exist"):
        sam2_fingerprint(load_params(dict(p2), {"sam2.checkpoint": str(tmp_path / "nope.pt")}))
    with pytest.raises(FmalibError, match="sam2.config 'hiera_x' is unknown"):
        sam2_config_file("hiera_x")
    assert sam2_config_file("sam2_hiera_b+") == "configs/sam2/sam2_hiera_b+.yaml"


def test_without_sam2_the_option_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sam2", None)  # import sam2 -> ImportError, as when it is not installed
    with pytest.raises(FmalibError, match=r'pip install -e "\.\[sam2\]"'):
        require_sam2()
    with pytest.raises(FmalibError, match="needs the sam2 package"):
        load_sam2_from_params(params(tmp_path))
    with pytest.raises(FmalibError, match="needs the sam2 package"):
        run_mask_stage(params(tmp_path), "train")


@pytest.fixture(scope="module")
def sam2_model():
    if not HAVE_SAM2:
        pytest.skip('the optional sam2 package is not installed (pip install -e ".[sam2]")')
    torch.manual_seed(0)
    return load_sam2("sam2.1_hiera_t", None, image_size=64)


def _check_maskset(masks: MaskSet, shape) -> None:
    assert (masks.height, masks.width) == shape
    assert len(masks.counts) == len(masks.levels) == len(masks.scores) == len(masks.stability) > 0
    assert masks.levels.dtype == np.uint8 and set(masks.levels.tolist()) <= {0, 1, 2}
    assert masks.scores.dtype == np.float32 and masks.stability.dtype == np.float32
    dense = masks.to_bool()
    assert dense.shape == (len(masks), *shape) and dense.reshape(len(masks), -1).any(1).all()
    again = MaskSet.from_arrays(masks.to_arrays())
    assert again.counts == masks.counts and np.array_equal(again.levels, masks.levels)


@needs_sam2
def test_sam2_generator_yields_a_maskset_with_levels(tmp_path, sam2_model):
    p = params(tmp_path, **{"masks.box_nms_thresh": 1.0, "masks.min_mask_region_area": 0})
    generator = build_mask_generator(p, sam2_model)
    assert type(generator).__name__ == "MultiLevelSam2MaskGenerator"
    image = (np.random.default_rng(0).random((60, 52, 3)) * 255).astype(np.uint8)
    raw = generator.generate_unfiltered(image)
    _check_maskset(raw, (60, 52))
    # every point's three multimask outputs, each with its index as the level (no NMS here: box IoU <= 1)
    assert np.bincount(raw.levels, minlength=3).tolist() == [16, 16, 16]
    kept = generator.generate(image)  # the overlap filter: wholes kept, covered parts / subparts dropped
    _check_maskset(kept, (60, 52))
    assert (kept.levels == 2).sum() == 16 and len(kept) <= len(raw)
    with pytest.raises(FmalibError, match="uint8 RGB"):
        generator.generate(image[..., 0])


@needs_sam2
def test_levels_are_the_multimask_index(tmp_path, sam2_model, monkeypatch):
    """A decoder stand-in: output i is a square of half-side 3 + 6 i around the point, so the level of every mask
    must be readable from its area, and the overlap filter must drop parts / subparts inside kept wholes."""
    p = params(tmp_path, **{"masks.points_per_side": 2, "masks.min_mask_region_area": 0,
                            "masks.box_nms_thresh": 0.99})
    generator = build_mask_generator(p, sam2_model)
    pred = generator.predictor

    def fake_predict(coords, labels, multimask_output=True, return_logits=False, **_):
        h, w = pred._orig_hw[-1]
        pts = coords[:, 0]  # in the model's frame (image_size px): back to the crop's pixels
        pts = pts * torch.tensor([w, h]) / pred.model.image_size
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out = torch.stack([torch.stack([torch.where(((yy - y).abs() <= 3 + 6 * i) & ((xx - x).abs() <= 3 + 6 * i),
                                                    10.0, -10.0) for i in range(3)]) for x, y in pts.tolist()])
        return out, torch.full((len(pts), 3), 0.9), None

    monkeypatch.setattr(pred, "_predict", fake_predict)
    image = np.zeros((80, 80, 3), np.uint8)
    raw = generator.generate_unfiltered(image)
    sides = np.sqrt(raw.to_bool().reshape(len(raw), -1).sum(1))
    np.testing.assert_array_equal(sides, 2 * (3 + 6 * raw.levels.astype(float)) + 1)
    assert np.bincount(raw.levels, minlength=3).tolist() == [4, 4, 4]
    kept = generator.generate(image)
    assert kept.levels.tolist() == [2, 2, 2, 2]  # each part / subpart lies inside its point's whole


@needs_sam2
def test_mask_stage_caches_sam2_masks(tmp_path, sam2_model):
    p = params(tmp_path)
    cache = run_mask_stage(p, "train", model=sam2_model)
    key = json.loads((cache.dir / "key.json").read_text())["key"]
    assert key["generator"] == "sam2" and key["model"]["image_size"] == 64
    for image_id in ("train_00000", "train_00001"):
        masks = load_masks(cache, image_id)
        assert len(masks) >= 1 and set(masks.levels.tolist()) <= {0, 1, 2}


@needs_sam2
def test_sam2_checkpoint_round_trip(tmp_path, sam2_model):
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": sam2_model.state_dict()}, path)  # Meta's release layout
    p = params(tmp_path, **{"sam2.checkpoint": str(path)})
    loaded = load_sam2_from_params(p)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam2_model.state_dict().values()))
    assert "sha256" in sam2_fingerprint(p)
    state = dict(sam2_model.state_dict())
    state.pop(next(iter(state)))
    torch.save(state, path)
    with pytest.raises(FmalibError, match="lacks key"):
        load_sam2_from_params(p)
    with pytest.raises(FmalibError, match="multiple of 32"):
        load_sam2("sam2.1_hiera_t", None, image_size=100)
