"""fmalib.models.sam (load_sam through segment_anything's registry) and the tiny-SAM pretraining pieces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor, sam_model_registry

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.models.sam import build_sam_tiny, load_sam, sam_image_size
from fmalib.pretrain import sam as pt
from fmalib.pretrain.sam_quality import amg_object_recall, center_point, point_prompt_iou


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = pt.init_for_training(build_sam_tiny(), seed=0)
    path = tmp_path_factory.mktemp("sam") / "tiny.pth"
    pt.save_weights(model.eval(), path, fp16=False)
    return model, path


@pytest.fixture(scope="module")
def vit_b_ckpt(tmp_path_factory):
    """A randomly initialised real ViT-B SAM saved as a plain state dict, as sam_vit_b_01ec64.pth is."""
    torch.manual_seed(0)
    model = sam_model_registry["vit_b"]()
    path = tmp_path_factory.mktemp("sam") / "vit_b.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_tiny_round_trip(tiny_ckpt):
    model, path = tiny_ckpt
    loaded = load_sam("fmalib_tiny", path)
    _same_state(model, loaded)
    assert sam_image_size(loaded) == 112 and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert sam_model_registry["fmalib_tiny"] is build_sam_tiny  # registered beside vit_h / vit_l / vit_b


def test_vit_b_round_trip(vit_b_ckpt):
    model, path = vit_b_ckpt
    loaded = load_sam("vit_b", path)
    _same_state(model, loaded)
    assert sam_image_size(loaded) == 1024


def test_fp16_weights_load_as_float(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    path = pt.save_weights(model, tmp_path / "half.pth", fp16=True)
    loaded = load_sam("fmalib_tiny", path)
    w = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert loaded.state_dict()[w].dtype == torch.float32
    assert torch.allclose(loaded.state_dict()[w], model.state_dict()[w], atol=1e-3)


def test_wrong_model_checkpoint_names_key_and_shape(vit_b_ckpt, tmp_path):
    _, vit_b_path = vit_b_ckpt
    with pytest.raises(FmalibError, match=r"image_encoder\.pos_embed.*shape \(1, 64, 64, 768\).*\(1, 14, 14, 128\)"):
        load_sam("fmalib_tiny", vit_b_path)
    shallow = tmp_path / "shallow.pth"
    torch.save(build_sam_tiny(encoder_depth=2).state_dict(), shallow)
    with pytest.raises(FmalibError, match=r"lacks key 'image_encoder\.blocks\.2\."):
        load_sam("fmalib_tiny", shallow)


def test_truncated_checkpoint(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FmalibError, match=r"cut\.pth.*truncated or corrupt"):
        load_sam("fmalib_tiny", cut)
    state = torch.load(path, weights_only=True)
    keys = list(state)
    partial = tmp_path / "partial.pth"
    torch.save({k: state[k] for k in keys[: len(keys) // 2]}, partial)
    with pytest.raises(FmalibError, match=rf"lacks key '{keys[len(keys) // 2]}'"):
        load_sam("fmalib_tiny", partial)
    with pytest.raises(FmalibError, match="does not exist"):
        load_sam("fmalib_tiny", tmp_path / "missing.pth")
    with pytest.raises(FmalibError, match="model_type 'vit_x'"):
        load_sam("vit_x")


def test_predictor_on_non_square_image(tiny_ckpt):
    model = load_sam("fmalib_tiny", tiny_ckpt[1])
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 255, (96, 136, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, low = predictor.predict(point_coords=np.array([[100, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 96, 136) and scores.shape == (3,) and low.shape == (3, 56, 56)


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return load_params("params/toy.yaml", {
        "workdir": str(work), "foundation.sam.batch_size": 1, "foundation.sam.points_per_image": 2,
        "foundation.sam.warmup_steps": 1, "foundation.sam.lr": 0.003, "foundation.sam.checkpoint_every": 2,
        "foundation.sam.steps": 4, "foundation.sam.object_only_steps": 2,
        "foundation.sam.output": str(work / "tiny_sam.pth")})


def test_region_maps_partition_image_and_nest_parts():
    from fmalib.data.synthetic import generate_sample

    s = next(s for s in (generate_sample(0, i, (112, 128)) for i in range(50))
             if any(len(inst.parts) > 1 for inst in s.instances))
    whole, part, n_inst = pt.region_maps(s)
    assert n_inst == len(s.instances) and (whole != pt.PAD).all()
    for p in np.unique(part):  # each part lies inside one whole
        assert len(np.unique(whole[part == p])) == 1
    inst = next(i for i, inst in enumerate(s.instances) if len(inst.parts) > 1)
    assert np.array_equal(whole == inst, s.instances[inst].mask)
    reg = pt.to_model_frame(s, 128)
    assert reg.image.shape == (128, 128, 3) and max(reg.hw) == 128
    ys, xs = np.nonzero(reg.whole == inst)
    p_mask, w_mask = pt.point_targets(reg, np.array([[xs[0], ys[0]]]))
    assert (p_mask <= w_mask).all() and p_mask.sum() < w_mask.sum()


def test_pretraining_images_stay_outside_the_splits(params):
    """The frozen SAM must never see the study's own train/val images."""
    cfg = pt.pretrain_config(params)
    assert cfg["index_offset"] >= 1_000_000 + params["data"]["synthetic"]["n_val"]
    syn = params["data"]["synthetic"]
    # train starts at 0, val at 1,000,000; 4 steps × 1 image from each offset reach into the split
    for offset in (0, syn["n_train"] - 3, 1_000_000 + syn["n_val"] - 1):
        bad = load_params("params/toy.yaml", {"foundation.sam.index_offset": offset, "foundation.sam.steps": 4,
                                              "foundation.sam.batch_size": 1})
        with pytest.raises(FmalibError, match="foundation.sam.index_offset.*overlap the (train|val) split"):
            pt.pretrain_config(bad)
    from fmalib.pretrain import clip as pclip
    bad = load_params("params/toy.yaml", {"foundation.clip.pool_offset": 999_000})
    with pytest.raises(FmalibError, match="foundation.clip.pool_offset.*overlap the val split"):
        pclip.pretrain_config(bad)


def test_training_steps_lower_loss(params):
    cfg = pt.pretrain_config(params)
    torch.manual_seed(0)
    model = pt.init_for_training(build_sam_tiny(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    batch = pt.make_batch(params, cfg, 0, sam_image_size(model))
    cfg = dict(cfg, steps=1000, warmup_steps=1)
    losses = [pt.train_step(model, opt, batch, cfg, step)["loss"] for step in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses


def test_resumed_run_gives_same_bytes(params, monkeypatch):
    out = params.resolve_path("foundation.sam.output")
    pt.pretrain_sam(params, evaluate=False)
    straight = out.read_bytes()
    sdir = pt.state_dir(params, pt.pretrain_config(params))
    (sdir / "state.pt").unlink()
    real_step = pt.train_step

    def crash_at_3(model, opt, batch, cfg, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(model, opt, batch, cfg, step)

    monkeypatch.setattr(pt, "train_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        pt.pretrain_sam(params, evaluate=False)
    monkeypatch.setattr(pt, "train_step", real_step)
    pt.pretrain_sam(params, evaluate=False)  # resumes at step 2 from the checkpoint
    assert out.read_bytes() == straight
    load_sam("fmalib_tiny", out)


def test_quality_functions_on_ground_truth(tiny_ckpt):
    from fmalib.data.synthetic import generate_sample

    samples = [generate_sample(0, 1_000_000 + i, (112, 120)) for i in range(2)]
    x, y = center_point(samples[0].instances[0].mask)
    assert samples[0].instances[0].mask[y, x]
    gt = amg_object_recall(None, samples, mask_fn=lambda image: [])
    assert gt["recall"] == 0.0
    by_image = {id(s.image): [i.mask for i in s.instances] for s in samples}
    perfect = amg_object_recall(None, samples, mask_fn=lambda image: by_image[id(image)])
    assert perfect["recall"] == 1.0 and perfect["n_instances"] == sum(len(s.instances) for s in samples)
    res = point_prompt_iou(load_sam("fmalib_tiny", tiny_ckpt[1]), samples[:1])
    assert 0.0 <= res["best_of_3"] <= 1.0 and res["n_instances"] == len(samples[0].instances)
