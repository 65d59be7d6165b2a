"""Prompt learners (contexts only trainable, token layout) and the training loop (loss falls, resume)."""
import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.method.objectives import cls_batch_loss, seg_batch_loss
from fmalib.method.prompts import ClsPromptLearner, HandPrompts, SegPromptLearner, fg_similarity
from fmalib.models.clip import get_tokenizer, load_clip, token_embedding
from fmalib.stages.prompt_data import augment, batch_indices
from fmalib.stages.prompt_runs import load_context, save_context
from fmalib.stages.prompts import classification_map, lr_at, train_prompts

NAMES = ["ball", "person with clothes,people,human", "boat"]
BG = ["grass", "sky"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("fmalib-tiny-clip"), get_tokenizer("fmalib-tiny-clip")


def tiny_params(tmp_path, **overrides):
    base = {"workdir": str(tmp_path / "work"), "data.root": str(tmp_path / "data"), "clip.checkpoint": None,
            "data.synthetic.n_train": 8, "data.synthetic.n_val": 4, "prompts.batch_size": 4,
            "prompts.crop_size": 64, "prompts.long_side": [72, 96], "prompts.ckpt_every": 5}
    base.update(overrides)
    return load_params("params/toy.yaml", base)


def test_hand_prompts_equal_encode_text(tiny):
    model, tok = tiny
    hand = HandPrompts(model, tok, NAMES, BG)
    assert hand.texts[1] == "a clean origami person with clothes,people,human."
    assert list(hand.parameters()) == [] and hand.state_dict() == {}
    ref = model.encode_text(tok(hand.texts)[:, :32])
    assert torch.allclose(hand(), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


def test_cls_prompts_shared_context_class_last(tiny):
    model, tok = tiny
    pl = ClsPromptLearner(model, tok, NAMES, BG, n_ctx=4, init_std=0.015, seed=1)
    assert [n for n, _ in pl.named_parameters()] == ["ctx"] and list(pl.state_dict()) == ["ctx"]
    assert pl.ctx.shape == (1, 4, model.token_embedding.weight.shape[1])
    emb = pl.embeddings()
    for k in range(len(NAMES) + len(BG)):
        assert torch.equal(emb[k, 1:5], pl.ctx[0])  # context right after SOS, the name after it
    name_tokens = token_embedding(model, tok(["ball"])[:, 1:2])[0, 0]
    assert torch.equal(emb[0, 5], name_tokens)
    big = ClsPromptLearner(model, tok, NAMES, BG, n_ctx=16, init_std=0.015, seed=0)
    assert big.ctx.std().item() == pytest.approx(0.015, rel=0.1)


def test_seg_prompts_class_specific_name_first_bg_context_only(tiny):
    model, tok = tiny
    pl = SegPromptLearner(model, tok, NAMES, n_bg=2, n_ctx=4, init_std=0.0125, seed=0)
    assert pl.ctx.shape[:2] == (5, 4) and pl.n_fg == 3 and pl.n_bg == 2
    assert pl.texts[0].startswith("ball X") and pl.texts[3] == "X X X X ."
    emb = pl.embeddings()
    assert torch.equal(emb[0, 2:6], pl.ctx[0])  # SOS, "ball", then the context
    assert torch.equal(emb[1, 8:12], pl.ctx[1])  # 7 name tokens
    assert torch.equal(emb[4, 1:5], pl.ctx[4])
    assert not torch.equal(pl.ctx[0], pl.ctx[1])


def test_gradients_reach_only_the_contexts(tiny):
    model, tok = tiny
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 48, 40, generator=g)
    present = torch.tensor([[True, False, True], [False, True, False]])
    seeds = torch.randint(0, 4, (2, 48, 40), generator=g)
    for pl, loss_fn in ((ClsPromptLearner(model, tok, NAMES, BG, n_ctx=4),
                         lambda pl: cls_batch_loss(model, pl, images, present)),
                        (SegPromptLearner(model, tok, NAMES, 2, n_ctx=4),
                         lambda pl: seg_batch_loss(model, pl, images, present, seeds))):
        loss_fn(pl).backward()
        assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
    # seg: a class's CAM depends on its own context (and the bg ones), not on an absent class's
    pl = SegPromptLearner(model, tok, NAMES, 2, n_ctx=4)
    seg_batch_loss(model, pl, images[:1], present[:1], seeds[:1], pairs="image").backward()
    assert pl.ctx.grad[1].abs().sum() == 0 and pl.ctx.grad[0].abs().sum() > 0


def test_seg_pairs_come_from_the_cropped_seed_map(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 48, 40, generator=g)
    present = torch.tensor([[True, False, True], [True, True, False]])  # image-level labels
    seeds = torch.zeros(2, 48, 40, dtype=torch.long)
    seeds[0, 5:20, 5:20] = 1  # class 3 of image 0 was cropped out of view
    seeds[1, 30:40, 0:10] = 2
    seeds[1, 0:3, 0:3] = 3  # a class the image labels lack (seed noise) still makes a pair: the crop decides
    seeds[1, 40:] = 255
    from fmalib.method.objectives import seg_pairs

    assert seg_pairs(present, seeds, "crop").tolist() == [[True, False, False], [False, True, True]]
    assert seg_pairs(present, seeds, "image").tolist() == present.tolist()
    with pytest.raises(FmalibError, match="seg pairs="):
        seg_pairs(present, seeds, "boxes")
    # image 0: with crop pairs class 3's context gets no gradient (no pair, not in the softmax)
    for pairs, class3 in (("crop", False), ("image", True)):
        pl = SegPromptLearner(model, tok, NAMES, 2, n_ctx=4)
        seg_batch_loss(model, pl, images[:1], present[:1], seeds[:1], pairs=pairs).backward()
        assert (pl.ctx.grad[2].abs().sum() > 0) == class3 and pl.ctx.grad[0].abs().sum() > 0
    # the crop pairs are the loss's pairs: equal to the CAM loss over exactly those (image, class) pairs
    from fmalib.method.cam import gradcam
    from fmalib.method.losses import cam_activation_loss_pairs
    from fmalib.models.clip import encode_image_tokens

    pl = SegPromptLearner(model, tok, NAMES, 2, n_ctx=4)
    got = seg_batch_loss(model, pl, images, present, seeds)
    with torch.no_grad():
        out = encode_image_tokens(model, images)
        text = pl()
    b, c = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    allowed = torch.tensor([[True, False, False, True, True], [False, True, True, True, True]])
    cams = gradcam(model, out.block_input, out.grid, text, b, c, allowed)
    assert got.item() == pytest.approx(cam_activation_loss_pairs(cams, seeds, b, c + 1).item(), rel=1e-5)


def test_seg_prompt_layout_option_gives_the_coco_prompts(tiny, tmp_path):
    from fmalib.stages.prompt_runs import build_prompts

    model, _ = tiny
    voc = build_prompts("seg", model, tiny_params(tmp_path))
    assert voc.ctx.shape[0] == 6 + 7 and voc.texts[0].startswith("ball X")
    coco = build_prompts("seg", model, tiny_params(tmp_path, **{"prompts.seg.layout": "shared_end",
                                                                "prompts.seg.init_std": 0.015}))
    assert coco.ctx.shape[0] == 1 and coco.n_bg == 7  # one shared context; bg prompts keep their words
    assert coco.texts[0].endswith("X ball.") and coco.texts[-1].endswith("X wall.")
    assert coco.ctx.std().item() == pytest.approx(0.015, rel=0.15)
    with pytest.raises(FmalibError, match="prompts.seg.layout"):
        build_prompts("seg", model, tiny_params(tmp_path, **{"prompts.seg.layout": "front"}))


def test_context_save_load_and_errors(tiny, tmp_path):
    model, tok = tiny
    a = ClsPromptLearner(model, tok, NAMES, BG, n_ctx=4, seed=3)
    path = save_context(a, tmp_path / "ctx.pt")
    b = load_context(ClsPromptLearner(model, tok, NAMES, BG, n_ctx=4, seed=4), path)
    assert torch.equal(a.ctx, b.ctx)
    with pytest.raises(FmalibError, match="expect"):
        load_context(SegPromptLearner(model, tok, NAMES, 2, n_ctx=4), path)
    with pytest.raises(FmalibError, match="does not exist"):
        load_context(b, tmp_path / "missing.pt")
    with pytest.raises(FmalibError, match="context"):
        ClsPromptLearner(model, tok, ["a very long name " * 4], BG, n_ctx=16)


def test_schedule_sampling_and_augmentation():
    assert lr_at(0, 100, 1e-3, 10, 1e-5) == 1e-5 and lr_at(9, 100, 1e-3, 10, 1e-5) == 1e-5
    assert lr_at(10, 100, 1e-3, 10, 1e-5) == pytest.approx(1e-3)
    assert lr_at(55, 100, 1e-3, 10, 1e-5) == pytest.approx(5e-4) and lr_at(99, 100, 1e-3, 10, 1e-5) < 1e-6
    seen = batch_indices(10, 4, 0, 0) + batch_indices(10, 4, 1, 0) + batch_indices(10, 4, 2, 0)[:2]
    assert sorted(seen) == list(range(10))  # one epoch = one permutation
    cfg = {"crop_size": 32, "long_side": [40, 48], "color_jitter": {"brightness": 25.0, "contrast": [0.6, 1.4], "saturation": [0.5, 1.5], "hue": 25.0, "p": 0.5}, "flip": True}
    img = np.zeros((30, 20, 3), np.uint8)
    lab = np.zeros((30, 20), np.uint8)
    lab[:, 10:] = 1  # right half class 1
    x, y = augment(img, lab, np.random.default_rng(0), cfg)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and 0 <= x.min() and x.max() <= 1
    x2, y2 = augment(img, lab, np.random.default_rng(0), cfg)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # labels follow the geometry: the class stays one vertical half-plane
    cols = (y == 1).any(0)
    assert (y == 1).all(0)[cols].all()


def test_lr_schedule_is_what_the_optimizer_used(tmp_path):
    """The lr of every optimizer step, read from the optimizer itself, against the schedule's formula."""
    import math

    torch.set_num_threads(1)
    iters, warm, lr, warm_lr = 9, 3, 0.02, 1e-4
    params = tiny_params(tmp_path, **{"prompts.cls.iters": iters, "prompts.cls.warmup_iters": warm,
                                      "prompts.cls.lr": lr, "prompts.cls.warmup_lr": warm_lr})
    used = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        res = train_prompts(params, "cls", progress=False)
    finally:
        hook.remove()
    want = [warm_lr if it < warm else 0.5 * lr * (1 + math.cos(math.pi * (it - warm) / (iters - warm)))
            for it in range(iters)]
    assert used == pytest.approx(want, rel=1e-12) and res.lrs == pytest.approx(want, rel=1e-12)


def test_training_lowers_loss_and_resumes_identically(tmp_path):
    torch.set_num_threads(1)
    params = tiny_params(tmp_path, **{"prompts.cls.iters": 20, "prompts.cls.warmup_iters": 2,
                                      "prompts.cls.lr": 0.05})
    res = train_prompts(params, "cls", progress=False)
    assert len(res.losses) == 20 and res.context_path.is_file() and res.csv_path.is_file()
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    assert len(res.fg_similarity) == 20 and all(-1 <= v <= 1 for v in res.fg_similarity)
    cached = train_prompts(params, "cls", progress=False)  # a finished run is loaded from loss.csv
    assert cached.losses == res.losses and cached.fg_similarity == res.fg_similarity
    # an interrupted run resumed from its checkpoint gives the same contexts
    p2 = tiny_params(tmp_path, **{"prompts.cls.iters": 20, "prompts.cls.warmup_iters": 2,
                                  "prompts.cls.lr": 0.05, "workdir": str(tmp_path / "work2")})
    part = train_prompts(p2, "cls", progress=False, stop_after=7)
    assert not part.context_path.is_file() and len(part.losses) == 7
    full = train_prompts(p2, "cls", progress=False)
    assert full.losses == pytest.approx(res.losses, abs=1e-6)
    assert full.fg_similarity == pytest.approx(res.fg_similarity, abs=1e-6)
    a = torch.load(res.context_path, weights_only=True)["state"]["ctx"]
    b = torch.load(full.context_path, weights_only=True)["state"]["ctx"]
    assert torch.equal(a, b)


class _Images:
    class_names = NAMES

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        # two input sizes, interleaved: classification_map batches by size and must keep the item order
        self.items = [{"image": rng.integers(0, 256, ((64, 48) if j % 3 else (48, 64)) + (3,), dtype=np.uint8),
                       "labels": [1 + j % 3]} for j in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, j):
        return self.items[j]


def test_fg_similarity_and_map_against_background(tiny):
    model, tok = tiny
    assert fg_similarity(torch.nn.functional.normalize(torch.ones(4, 8), dim=-1), 3) == pytest.approx(1.0)
    assert fg_similarity(torch.eye(4), 3) == pytest.approx(0.0)
    from fmalib.method.metrics import average_precision
    from fmalib.models.clip import encode_image_tokens, logit_scale, to_input

    data = _Images(9)
    hand = HandPrompts(model, tok, NAMES, BG)
    res = classification_map(model, hand, data, progress=False)
    with torch.no_grad():
        text = hand()
        s = torch.cat([logit_scale(model) * torch.nn.functional.normalize(
            encode_image_tokens(model, to_input(model, it["image"])).image_embed.float(), dim=-1) @ text.T
            for it in data.items])
    odds = s[:, :3] - torch.logsumexp(s[:, 3:], 1, keepdim=True)  # class vs the bg prompts
    y = np.array([[c + 1 in it["labels"] for c in range(3)] for it in data.items])
    want = [average_precision(odds[:, k].numpy(), y[:, k]) for k in range(3)]
    assert list(res["ap_vs_bg"].values()) == pytest.approx(want, abs=1e-6)
    assert res["map_vs_bg"] == pytest.approx(np.mean(want), abs=1e-6)
    assert list(res["ap"].values()) == pytest.approx([average_precision(s[:, k].numpy(), y[:, k])
                                                      for k in range(3)], abs=1e-6)


def test_seg_training_reads_seed_maps(tmp_path):
    params = tiny_params(tmp_path, **{"prompts.seg.iters": 3, "prompts.seg.warmup_iters": 1})
    with pytest.raises(FmalibError, match="seeds_dir"):
        train_prompts(params, "seg", progress=False)
    from fmalib.data import open_dataset

    open_dataset(params, "train")  # writes the benchmark; its GT maps stand in for seeds here
    res = train_prompts(params, "seg", seeds_dir=tmp_path / "data" / "SegmentationClass", progress=False)
    assert len(res.losses) == 3 and all(np.isfinite(res.losses)) and res.context_path.is_file()
    ctx = torch.load(res.context_path, weights_only=True)["state"]["ctx"]
    assert ctx.shape[:2] == (6 + 7, 16)  # toy: 6 classes + 7 context-only bg prompts


def test_vit_b16_random_init_prompt_step_and_cam():
    """The paper's architecture end to end on CPU (few prompts: ViT-B's text tower dominates CPU time)."""
    from fmalib.method.image_cams import image_cams

    torch.manual_seed(0)
    model = load_clip("ViT-B-16")
    tok = get_tokenizer("ViT-B-16")
    pl = SegPromptLearner(model, tok, NAMES, n_bg=2, n_ctx=16)
    opt = torch.optim.SGD(pl.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(1, 3, 64, 96)  # a 4x6 patch grid
    present = torch.tensor([[True, False, True]])
    seeds = torch.zeros(1, 64, 96, dtype=torch.long)
    seeds[0, 10:40, 20:60] = 3
    before = pl.ctx.detach().clone()
    loss = seg_batch_loss(model, pl, images, present, seeds)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, pl.ctx.detach())
    with torch.no_grad():
        text = HandPrompts(model, tok, NAMES, BG)()
    img = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    cfg = {"target": "prob", "target_layer": "ln1_out", "caa_last_k": 8, "sinkhorn_iters": 1}
    out = image_cams(model, text, len(NAMES), img, [1, 3], **cfg, threshold=0.4, caa_source="raw")
    assert out["cam"].shape == (2, 5, 7) and out["cam_caa"].shape == (2, 5, 7)  # sides up to the patch
    assert np.isfinite(out["cam_caa"]).all()
