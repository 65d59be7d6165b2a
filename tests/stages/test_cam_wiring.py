"""The CAM stage hands each prompt kind its own settings: what reaches ``image_cams`` (and the Grad-CAM and CAA
inside it) for hand, cls and seg prompts, and which prompts the Grad-CAM softmax runs over."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fmalib.method.image_cams as image_cams_module
import fmalib.stages.cams as cams_stage
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.models.checkpoints import load_clip_from_params
from fmalib.stages.prompt_runs import build_prompts, save_context

pytestmark = pytest.mark.usefixtures("one_thread")

PER_KIND = {"cam.sinkhorn_iters.hand": 3, "cam.sinkhorn_iters.cls": 1, "cam.sinkhorn_iters.seg": 2,
            "cam.caa_threshold.hand": 0.45, "cam.caa_threshold.cls": 0.35, "cam.caa_threshold.seg": 0.55,
            "cam.caa_source.hand": "normalized", "cam.caa_source.cls": "raw", "cam.caa_source.seg": "raw",
            "cam.target_layer": "block_input", "cam.target": "score", "cam.caa_last_k": 3, "cam.max_side": 96}


@pytest.fixture
def params(tmp_path):
    return load_params("params/toy.yaml", {"data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "work"),
                                           "data.synthetic.n_train": 2, "data.synthetic.n_val": 1,
                                           "data.synthetic.size_min": 48, "data.synthetic.size_max": 56,
                                           "clip.checkpoint": None, **PER_KIND})


def test_each_prompt_kind_gets_its_own_cam_settings(params, tmp_path, monkeypatch):
    seen = []
    real = cams_stage.image_cams

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cams_stage, "image_cams", spy)
    torch.manual_seed(0)
    model = load_clip_from_params(params)
    for kind in ("hand", "cls", "seg"):
        # contexts as a trained run leaves them (random: only the wiring is under test)
        ctx = None if kind == "hand" else save_context(build_prompts(kind, model, params), tmp_path / f"{kind}.pt")
        seen.clear()
        cams_stage.run_cam_stage(params, "train", kind, (0, 1), ctx_path=ctx, model=model, progress=False)
        assert len(seen) == 2
        for kw in seen:
            assert kw == {"target": "score", "target_layer": "block_input", "caa_last_k": 3, "max_side": 96,
                          "sinkhorn_iters": PER_KIND[f"cam.sinkhorn_iters.{kind}"],
                          "threshold": PER_KIND[f"cam.caa_threshold.{kind}"],
                          "caa_source": PER_KIND[f"cam.caa_source.{kind}"]}, kind


def test_gradcam_softmax_runs_over_present_classes_and_background(params, monkeypatch):
    """image_cams' softmax mask: the image's present classes and every background prompt, no absent class."""
    seen = []
    real = image_cams_module.gradcam

    def spy(model, block_input, grid, text, pair_image, pair_class, allowed=None, *args, **kwargs):
        seen.append((allowed.clone(), pair_class.clone(), text.shape[0]))
        return real(model, block_input, grid, text, pair_image, pair_class, allowed, *args, **kwargs)

    monkeypatch.setattr(image_cams_module, "gradcam", spy)
    model = load_clip_from_params(params)
    pset = build_prompts("hand", model, params)
    with torch.no_grad():
        text = pset()
    item = open_dataset(params, "train")[0]
    labels = [2, 5]
    image_cams_module.image_cams(model, text, pset.n_fg, item["image"], labels, **cams_stage.cam_arguments(params, "hand"))
    allowed, pair_class, k = seen[0]
    n_fg = pset.n_fg
    expected = np.zeros(k, bool)
    expected[[label - 1 for label in labels]] = True
    expected[n_fg:] = True  # every background prompt
    assert allowed.shape == (1, k) and allowed[0].numpy().tolist() == expected.tolist()
    assert pair_class.tolist() == [label - 1 for label in labels]


def test_raw_caa_maps_reach_sams_and_each_kind_reads_its_own_use_caa(params, tmp_path):
    """The CAM stage stores image_cams' raw maps; the seeds stage feeds the CAA map of a kind whose
    ``cam.use_caa`` is on (the plain Grad-CAM otherwise) through SAMS, which upsamples, ReLUs and normalises
    them — equal to the plain reference loop of tests/method/test_sams.py on the raw map."""
    from pycocotools import mask as mask_utils

    from fmalib.data.labels import read_label_png
    from fmalib.stages.masks import load_masks, run_mask_stage
    from fmalib.stages.seeds import cam_loader, make_seeds
    from tests.method.test_sams import reference_sams

    p = load_params(params.to_dict(), {"cam.use_caa.hand": True, "cam.use_caa.cls": False,
                                       "cam.caa_source.hand": "raw", "sams.bg_power.fine": 0.7})
    torch.manual_seed(0)
    model = load_clip_from_params(p)
    cams = cams_stage.run_cam_stage(p, "train", "hand", (0, 1), model=model, progress=False)
    masks = run_mask_stage(p, "train", (0, 1))
    seeds = make_seeds(p, "train", cams, "fine", shard=(0, 1))
    pset = build_prompts("hand", model, p)
    with torch.no_grad():
        text = pset()
    for item in open_dataset(p, "train"):
        direct = image_cams_module.image_cams(model, text, pset.n_fg, item["image"], item["labels"],
                                              **cams_stage.cam_arguments(p, "hand"))
        stored, labels = cam_loader(p, cams)[0](item["id"])
        assert np.array_equal(stored, direct["cam_caa"])  # hand: use_caa on -> the raw CAA map, as computed
        assert (stored.reshape(len(stored), -1).max(1) < 0.5).all()  # raw, not min-max'd: SAMS normalises
        ms = load_masks(masks, item["id"])
        dense = np.stack([mask_utils.decode(r).astype(bool) for r in ms.rles()]) if len(ms) else \
            np.zeros((0, ms.height, ms.width), bool)
        want, _ = reference_sams(stored, dense, ms.levels, labels, 0.7)
        assert np.array_equal(read_label_png(seeds.path(item["id"])), want)
    cls_cache = cams_stage.cam_cache(p, "train", "cls", save_context(build_prompts("cls", model, p),
                                                                      tmp_path / "ctx.pt"))
    assert cams_stage.caa_for(p, cls_cache) is False and cams_stage.caa_for(p, cams) is True
