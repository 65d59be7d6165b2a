"""The original's prompt-training recipe details: AlchemyCat's colour jitter (its parameter ranges,
probabilities and order, statistically; its pixel arithmetic against formulas written here), gradient
accumulation with each sub-batch's loss normalised on its own, and the CAMs' contexts from an earlier
iteration (the original's COCO recipe)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fmalib.stages.prompts as prompts_stage
from fmalib.core.params import load_params
from fmalib.method.objectives import cls_batch_loss
from fmalib.models.checkpoints import load_clip_from_params
from fmalib.stages.prompt_data import color_jitter, jitter_draws
from fmalib.stages.prompt_runs import build_prompts, load_context, trained_context_path

pytestmark = pytest.mark.usefixtures("one_thread")

ALCHEMYCAT = {"brightness": 25.0, "contrast": [0.6, 1.4], "saturation": [0.5, 1.5], "hue": 25.0, "p": 0.5}


def test_jitter_draws_follow_randcolorjitter_ranges_probabilities_and_order():
    rng = np.random.default_rng(0)
    draws = [jitter_draws(rng, ALCHEMYCAT) for _ in range(4000)]
    for step, lo, hi in (("brightness", -25, 25), ("contrast", 0.6, 1.4), ("saturation", 0.5, 1.5),
                         ("hue", -25, 25)):
        values = np.array([d[step] for d in draws if d[step] is not None])
        assert abs(len(values) / len(draws) - 0.5) < 0.03, step  # each step with p = 0.5 (4 sigma ~ 0.032)
        assert lo <= values.min() and values.max() <= hi, step
        assert values.min() < lo + 0.02 * (hi - lo) and values.max() > hi - 0.02 * (hi - lo), step  # whole range
        assert abs(values.mean() - (lo + hi) / 2) < 0.03 * (hi - lo), step  # uniform: centred
        assert abs(np.mean(values < (lo + hi) / 2) - 0.5) < 0.04, step
    orders = {tuple(d["order"]) for d in draws}
    assert orders == set(itertools.permutations(range(4)))  # a random order of the four steps, every one seen
    never = jitter_draws(np.random.default_rng(1), {**ALCHEMYCAT, "p": 0.0})
    assert [never[s] for s in ("brightness", "contrast", "saturation", "hue")] == [None] * 4


def _only(step: str, value) -> dict:
    return {"brightness": None, "contrast": None, "saturation": None, "hue": None, step: value, "order": [0, 1, 2, 3]}


def test_jitter_pixels_follow_opencv_convertscaleabs():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    # brightness: |x + d| rounded, saturated at 255 (a negative delta clips at 0 by the absolute value only
    # where x + d < 0: |x + d| > 0 there)
    for delta in (17.4, -23.6):
        want = np.clip(np.abs(image.astype(float) + delta), 0, 255)
        assert np.array_equal(color_jitter(image, _only("brightness", delta)), np.rint(want).astype(np.uint8))
    # contrast: x * m, no centring on the mean (torchvision's ColorJitter blends with the mean grey instead)
    want = np.rint(np.clip(image.astype(float) * 1.3, 0, 255)).astype(np.uint8)
    assert np.array_equal(color_jitter(image, _only("contrast", 1.3)), want)
    # saturation of a grey image: S = 0 stays 0 whatever the factor
    grey = np.repeat(rng.integers(0, 256, (5, 5, 1), dtype=np.uint8), 3, axis=2)
    assert np.array_equal(color_jitter(grey, _only("saturation", 1.5)), grey)
    # hue on a 0-255 circle, not wrapped: pure red (H = 0) shifted by -25 is |0 - 25| = 25, the same as +25
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    up, down = color_jitter(red, _only("hue", 25.0)), color_jitter(red, _only("hue", -25.0))
    assert np.array_equal(up, down)
    assert up[0, 0, 0] == 255 and 130 <= up[0, 0, 1] <= 160 and up[0, 0, 2] == 0  # 25/256 of 360° ≈ 35°: orange


def tiny_params(tmp_path, **overrides):
    base = {"workdir": str(tmp_path / "work"), "data.root": str(tmp_path / "data"), "clip.checkpoint": None,
            "data.synthetic.n_train": 8, "data.synthetic.n_val": 2, "prompts.batch_size": 4,
            "prompts.crop_size": 64, "prompts.long_side": [72, 96], "prompts.ckpt_every": 5,
            "prompts.momentum": 0.0, "prompts.cls.weight_decay": 0.0, "prompts.cls.iters": 3,
            "prompts.cls.warmup_iters": 1, "prompts.cls.warmup_lr": 0.5}
    base.update(overrides)
    return load_params("params/toy.yaml", base)


def test_sub_batches_average_their_own_losses(tmp_path, monkeypatch):
    """One SGD step (no momentum, no decay) with the batch in 2 sub-batches moves the contexts by
    -lr * grad of (L(first half) + L(second half)) / 2, each L the loss of its half alone."""
    params = tiny_params(tmp_path, **{"prompts.cls.sub_batches": 2})
    seen = []

    def spy(model, prompts, images, present, loss="absent_fg"):
        seen.append((images.clone(), present.clone()))
        return cls_batch_loss(model, prompts, images, present, loss)

    monkeypatch.setattr(prompts_stage, "cls_batch_loss", spy)
    torch.manual_seed(0)
    model = load_clip_from_params(params)
    res = prompts_stage.train_prompts(params, "cls", model=model, progress=False, stop_after=1)
    assert [len(x) for x, _ in seen] == [2, 2]  # batch 4 in two sub-batches of 2
    before = build_prompts("cls", model, params)
    after = load_context(build_prompts("cls", model, params), res.out_dir / "ckpt.pt")
    parts = [cls_batch_loss(model, before, x, p) for x, p in seen]
    ((sum(parts) / 2)).backward()
    for name, p in before.named_parameters():
        moved = dict(after.named_parameters())[name].detach() - p.detach()
        assert torch.allclose(moved, -0.5 * p.grad, atol=1e-6), name
    assert res.losses[0] == pytest.approx(float(sum(parts).detach() / 2), rel=1e-5)


def test_cams_read_the_contexts_of_cam_iter(tmp_path):
    params = tiny_params(tmp_path, **{"prompts.cls.cam_iter": 2})
    torch.manual_seed(0)
    model = load_clip_from_params(params)
    res = prompts_stage.train_prompts(params, "cls", model=model, progress=False)
    assert res.cam_context_path.name == "context_at_2.pt" and trained_context_path(params, "cls") == \
        res.cam_context_path
    early = load_context(build_prompts("cls", model, params), res.cam_context_path)
    final = load_context(build_prompts("cls", model, params), res.context_path)
    last = tiny_params(tmp_path / "last", **{"prompts.cls.cam_iter": 3})  # the last iteration: context.pt
    assert prompts_stage.cam_context(tmp_path, last, "cls").name == "context.pt"
    # the snapshot holds the contexts after iteration 2: the same run stopped there
    stopped = tiny_params(tmp_path / "stopped")
    prompts_stage.train_prompts(stopped, "cls", model=model, progress=False, stop_after=2)
    at_two = load_context(build_prompts("cls", model, params),
                          prompts_stage.train_cache(stopped, "cls").dir / "ckpt.pt")
    for (name, a), b in zip(early.named_parameters(), at_two.parameters()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(early.parameters(), final.parameters()))
