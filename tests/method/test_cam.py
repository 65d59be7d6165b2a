"""Grad-CAM on CLIP, CAA refinement, the CAM stage cache and CAM-argmax seeds."""
import json

import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.method.caa import box_mask, caa_affinity, caa_refine, sinkhorn
from fmalib.method.cam import gradcam
from fmalib.method.scores import min_max_norm
from fmalib.method.image_cams import image_cams
from fmalib.method.prompts import HandPrompts
from fmalib.method.seed_rules import bg_threshold_sweep, cam_argmax_seeds
from fmalib.models import clip as C
from fmalib.models.clip import to_input
from fmalib.pretrain.clip_quality import hand_prompt_gradcam
from fmalib.stages.cams import load_cams, run_cam_stage

CFG = {"target": "prob", "target_layer": "ln1_out", "caa_last_k": 8, "sinkhorn_iters": 1}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = C.load_clip("fmalib-tiny-clip")
    with torch.no_grad():
        text = HandPrompts(model, C.get_tokenizer("fmalib-tiny-clip"), ["ball", "star", "boat"], ["grass", "sky"])()
    return model, text


def _full_tower_gradcam(model, x, text, allowed_rows, cls_row, layer):
    """Independent reference: the whole open_clip vision tower forward with a hook on the last block —
    ``ln_1``'s output (ln1_out) or the block's input (block_input) swapped for a leaf — the patch-mean
    embedding, softmax over the allowed prompt rows, backprop of the class's probability; Grad-CAM by its
    definition: channel weights = token-mean gradients, CAM = weighted channel sum over patch tokens."""
    v = model.visual
    blk = v.transformer.resblocks[-1]
    store = {}
    if layer == "ln1_out":
        def hook(mod, inp, out):
            store["a"] = out.detach().requires_grad_(True)
            return store["a"]
        handle = blk.ln_1.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            store["a"] = args[0].detach().requires_grad_(True)
            return (store["a"],) + args[1:], kwargs
        handle = blk.register_forward_pre_hook(hook, with_kwargs=True)
    was = v.output_tokens
    v.output_tokens = True
    try:
        with torch.enable_grad():
            _, tokens = v(x)
            emb = torch.nn.functional.normalize((tokens @ v.proj).mean(1), dim=-1)[0]
            logits = model.logit_scale.exp() * emb @ text.T
            prob = torch.softmax(logits[allowed_rows], 0)[allowed_rows.index(cls_row)]
            (grad,) = torch.autograd.grad(prob, store["a"])
    finally:
        v.output_tokens = was
        handle.remove()
    a = store["a"].detach()[0, 1:]
    weights = grad[0, 1:].mean(0)
    side = int(round(a.shape[0] ** 0.5))
    return (a @ weights).reshape(side, side)


@pytest.mark.parametrize("layer", ["ln1_out", "block_input"])
def test_gradcam_equals_independent_full_tower_reference(tiny, layer):
    model, text = tiny
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))  # the tower's own 14x14 grid
    with torch.no_grad():
        out = C.encode_image_tokens(model, x)
    allowed = torch.tensor([[True, False, True, True, True], [False, True, False, True, True]])
    pi, pc = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    cams = gradcam(model, out.block_input, out.grid, text, pi, pc, allowed, target_layer=layer)
    assert cams.shape == (3, 14, 14)
    for p in range(3):
        b = int(pi[p])
        rows = [k for k in range(5) if allowed[b, k]]
        ref = _full_tower_gradcam(model, x[b:b + 1], text, rows, int(pc[p]), layer)
        assert torch.allclose(cams[p], ref, atol=1e-6, rtol=1e-4), (layer, p)
    other = gradcam(model, out.block_input, out.grid, text, pi, pc, allowed,
                    target_layer="block_input" if layer == "ln1_out" else "ln1_out")
    assert not torch.allclose(cams, other, atol=1e-4)  # the two targets are different maps


def test_gradcam_batched_equals_per_pair_and_rejects_bad_options(tiny):
    model, text = tiny
    x = torch.randn(2, 3, 40, 56)  # non-square: 5x7 grid
    with torch.no_grad():
        out = C.encode_image_tokens(model, x)
    allowed = torch.tensor([[True, False, True, True, True], [False, True, False, True, True]])
    pi, pc = torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1])
    cams = gradcam(model, out.block_input, out.grid, text, pi, pc, allowed)
    assert cams.shape == (3, 5, 7)
    for p in range(3):
        one = gradcam(model, out.block_input, out.grid, text, pi[p:p + 1], pc[p:p + 1], allowed)
        assert torch.allclose(cams[p], one[0], atol=1e-6, rtol=1e-4)
    with pytest.raises(FmalibError, match="gradcam: target="):
        gradcam(model, out.block_input, out.grid, text, pi, pc, allowed, target="logit")
    with pytest.raises(FmalibError, match="gradcam: target_layer="):
        gradcam(model, out.block_input, out.grid, text, pi, pc, allowed, target_layer="ln_2")


def test_cams_follow_their_prompt_rows_when_classes_are_permuted(tiny):
    model, text = tiny
    img = np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    base = image_cams(model, text, 3, img, [1, 3], **CFG, threshold=0.4)
    perm = [2, 0, 1]  # new row k holds old class perm[k]: old 1 -> new 2, old 3 -> new 1
    moved = torch.cat([text[perm], text[3:]])
    out = image_cams(model, moved, 3, img, [1, 2], **CFG, threshold=0.4)  # new ids of old classes 3 and 1
    # CAA's matrix products sum the permuted softmax in another order: ~1e-4 (measured 1.2e-4) where the CAMs
    # themselves agree to ~4e-7; the maps of different classes differ by far more (last assert)
    for key, atol in (("cam", 1e-5), ("cam_caa", 1e-3)):
        assert np.allclose(out[key][0], base[key][1], atol=atol)  # old class 3 = new class 1
        assert np.allclose(out[key][1], base[key][0], atol=atol)  # old class 1 = new class 2
    assert not np.allclose(base["cam"][0], base["cam"][1], atol=1e-3)  # the classes' maps differ at all


def test_image_cams_non_square_sizes_rounded_to_patch(tiny):
    model, text = tiny
    img = np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    assert to_input(model, img).shape[-2:] == (48, 64)
    out = image_cams(model, text, 3, img, [1, 3], **CFG, threshold=0.4)
    assert out["cam"].shape == (2, 6, 8) and out["cam_caa"].shape == (2, 6, 8)
    assert out["cam"].min() < 0 < out["cam"].max()  # raw Grad-CAMs, signed, as the original stores them
    assert out["cam"].max() < 0.5  # not min-max normalised
    empty = image_cams(model, text, 3, img, [], **CFG, threshold=0.4)
    assert empty["cam"].shape == (0, 6, 8)


def test_sinkhorn_rows_cols_and_affinity():
    a = torch.rand(30, 30, generator=torch.Generator().manual_seed(0)) + 0.01
    one = sinkhorn(a, 1)
    assert torch.allclose(one.sum(1), torch.ones(30), atol=1e-5)
    many = sinkhorn(a, 50)
    assert torch.allclose(many.sum(1), torch.ones(30), atol=1e-5)
    assert torch.allclose(many.sum(0), torch.ones(30), atol=1e-4)
    # column error shrinks with iterations (1 iteration: FMA-WSSS, 3: CLIP-ES)
    err = [(sinkhorn(a, n).sum(0) - 1).abs().max().item() for n in (1, 3, 10)]
    assert err[0] > err[1] > err[2]
    attn = [torch.rand(1, 1 + 12, 1 + 12), torch.rand(1, 1 + 12, 1 + 12)]
    aff = caa_affinity(attn, 3)
    assert aff.shape == (12, 12) and torch.allclose(aff, aff.T, atol=1e-6)
    s = (sinkhorn(((attn[0] + attn[1]) / 2)[0, 1:, 1:], 3))
    s = (s + s.T) / 2
    assert torch.allclose(aff, s @ s, atol=1e-6)


def test_box_mask_and_refine():
    cam = np.zeros((8, 10), np.float32)
    cam[1, 1:4] = 1.0
    cam[2, 2] = 0.8  # blob 1: rows 1-2, cols 1-3
    cam[6, 8] = 0.9  # blob 2: a single pixel
    cam[5, 5] = 0.2  # below threshold
    m = box_mask(cam, 0.4)
    expect = np.zeros_like(m)
    expect[1:3, 1:4] = True
    expect[6, 8] = True
    assert np.array_equal(m, expect)
    cams = torch.from_numpy(np.stack([cam, np.zeros_like(cam)]))
    out = caa_refine(min_max_norm(cams), torch.eye(80), 0.4)
    assert out.shape == (2, 8, 10)
    # identity affinity: the refined map is the score inside its boxes, not renormalised; a flat CAM stays 0
    score = cams[0] / (1 + 1e-7)  # min 0, max 1: (x - 0) / (1 - 0 + 1e-7)
    assert torch.allclose(out[0], score * torch.from_numpy(expect), atol=1e-7)
    assert out[1].abs().max() == 0


def test_caa_box_threshold_and_source():
    cam = np.zeros((6, 12), np.float32)
    cam[1:3, 1:3] = 1.0  # strong blob
    cam[3:5, 8:11] = 0.6  # weaker blob
    cams = torch.from_numpy(cam[None])
    spread = torch.full((72, 72), 1.0 / 72)  # every patch receives the mean of the propagated source
    low, high = caa_refine(cams, torch.eye(72), 0.5), caa_refine(cams, torch.eye(72), 0.7)
    assert low[0, 3:5, 8:11].min() > 0.5  # threshold 0.5 keeps the weak blob's box
    assert high[0, 3:5, 8:11].abs().max() == 0 and high[0, 1:3, 1:3].min() == 1  # 0.7 drops it
    # the source map is what gets propagated; the boxes still come from the normalised CAM
    raw = torch.from_numpy(np.where(cam > 0, 3 * cam, -0.3).astype(np.float32)[None])
    raw[0, 1, 1] = -2.0  # a negative raw value inside a box: propagated as is
    a = torch.rand(72, 72, generator=torch.Generator().manual_seed(0))
    got = caa_refine(cams, a, 0.5, source=raw)
    box = torch.from_numpy(box_mask(cam, 0.5))
    ref = (a @ (raw[0] * box).reshape(-1)).reshape(6, 12)  # raw: neither ReLU nor min-max (the original's)
    assert torch.allclose(got[0], ref, atol=1e-5)
    assert caa_refine(cams, torch.eye(72), 0.5, source=raw)[0, 1, 1] == -2.0  # no ReLU on the output
    assert not torch.allclose(got, caa_refine(cams, a, 0.5), atol=1e-3)
    flat = caa_refine(cams, spread, 0.7)  # every patch gets the mean of the strong blob's box
    assert torch.allclose(flat, torch.full((1, 6, 12), 4.0 / 72))


def test_cam_argmax_seeds_and_threshold_sweep():
    cams = np.array([[[1.0, 0.2], [0.5, 0.0]], [[0.0, 1.0], [0.5, 0.3]]], np.float32)  # each spans [0, 1]
    seeds = cam_argmax_seeds(cams, [2, 5], 0.4)
    assert seeds.dtype == np.uint8 and seeds.tolist() == [[2, 5], [2, 0]]  # class tie -> lower index
    # 0.5 scores 0.5 / (1 + 1e-7) (the original's min-max eps), just below a background of 0.5
    assert cam_argmax_seeds(cams, [2, 5], 0.5).tolist() == [[2, 5], [0, 0]]
    assert cam_argmax_seeds(cams, [2, 5], 0.5 - 1e-6).tolist() == [[2, 5], [2, 0]]
    # raw maps of any scale and sign are scored first: ReLU, then per-map min-max (the original's cam2score)
    raw = np.array([[[2e-3, -1e-3], [1e-3, -5e-3]], [[-4e-3, 3e-3], [1.5e-3, 0.9e-3]]], np.float32)
    ref = np.maximum(raw, 0)
    ref = (ref - ref.min((1, 2), keepdims=True)) / (ref.max((1, 2), keepdims=True) - ref.min((1, 2), keepdims=True)
                                                      + 1e-7)  # [[1, 0], [.5, 0]] and [[0, 1], [.5, .3]]
    expect = np.where(ref.max(0) > 0.4, np.array([2, 5])[ref.argmax(0)], 0)
    assert cam_argmax_seeds(raw, [2, 5], 0.4).tolist() == expect.tolist() == [[2, 5], [5, 0]]
    assert cam_argmax_seeds(cams, [2, 5], 0.4, size=(4, 4)).shape == (4, 4)
    assert cam_argmax_seeds(np.zeros((0, 3, 3)), [], 0.5).tolist() == [[0] * 3] * 3
    with pytest.raises(FmalibError):
        cam_argmax_seeds(cams, [2], 0.4)
    gt = np.array([[2, 5], [2, 255]], np.uint8)
    table = bg_threshold_sweep([(cams, np.array([2, 5]), gt)], [0.1, 0.4, 0.6], 6)
    assert table[0.4] == pytest.approx(1.0) and table[0.6] < 1.0


def test_run_cam_stage_caches_shards_and_resumes(tmp_path):
    params = load_params("params/toy.yaml", {
        "workdir": str(tmp_path / "work"), "data.root": str(tmp_path / "data"), "clip.checkpoint": None,
        "data.synthetic.n_train": 4, "data.synthetic.n_val": 5})
    c0 = run_cam_stage(params, "val", "hand", shard=(0, 2), progress=False)
    assert len(c0.done_ids()) == 3
    c1 = run_cam_stage(params, "val", "hand", shard=(1, 2), progress=False)
    assert c1.dir == c0.dir and len(c1.done_ids()) == 5
    some = sorted(c0.done_ids())[0]
    mtime = c0.path(some).stat().st_mtime_ns
    run_cam_stage(params, "val", "hand", progress=False)  # everything cached: nothing rewritten
    assert c0.path(some).stat().st_mtime_ns == mtime
    raw = c0.load_npz(some)
    assert raw["cam"].dtype == np.float32 and raw["cam_caa"].dtype == np.float32  # raw maps: float16 is too coarse
    cams, labels = load_cams(c0, some)
    assert cams.dtype == np.float32 and cams.shape[0] == len(labels) >= 1
    with pytest.raises(FmalibError, match="train_prompts"):
        run_cam_stage(params, "val", "cls", progress=False)
    with pytest.raises(FmalibError, match="shard"):
        run_cam_stage(params, "val", "hand", shard=(2, 2), progress=False)


def test_argmax_seed_miou_is_kept_beside_the_cams_and_reused(tmp_path):
    from fmalib.data import open_dataset
    from fmalib.stages.cam_argmax import argmax_seed_miou, cached_items

    params = load_params("params/toy.yaml", {
        "workdir": str(tmp_path / "work"), "data.root": str(tmp_path / "data"), "clip.checkpoint": None,
        "data.synthetic.n_train": 4, "data.synthetic.n_val": 3, "cam.bg_thresholds": [0.2, 0.5, 0.8]})
    first = argmax_seed_miou(params, "hand")
    train = run_cam_stage(params, "train", "hand", progress=False)
    (memo,) = train.dir.glob("argmax_eval-*.json")
    # an independent sweep over the cached maps: the threshold is the train argmax, the number val's
    ds = {s: open_dataset(params, s) for s in ("train", "val")}
    val = run_cam_stage(params, "val", "hand", progress=False)
    for caa in (False, True):
        t_tab = bg_threshold_sweep(cached_items(train, ds["train"], caa), [0.2, 0.5, 0.8], 7)
        v_tab = bg_threshold_sweep(cached_items(val, ds["val"], caa), [0.2, 0.5, 0.8], 7)
        best = max(t_tab, key=lambda k: (np.nan_to_num(t_tab[k], nan=-1.0), -k))
        got = first["caa" if caa else "no_caa"]
        assert got["bg_threshold"] == best
        assert got["val_miou"] == pytest.approx(v_tab[best])
    memo.write_text(memo.read_text().replace('"bg_threshold"', '"bg_threshold_x"', 1))
    assert "bg_threshold_x" in json.dumps(argmax_seed_miou(params, "hand"))  # read back, not recomputed
    other = load_params(params.to_dict(), {"cam.bg_thresholds": [0.3, 0.6]})
    argmax_seed_miou(other, "hand")
    assert len(list(train.dir.glob("argmax_eval-*.json"))) == 2  # other thresholds: another result


def test_masked_softmax_is_the_originals_with_a_large_excluded_logit():
    from fmalib.method.cam import masked_softmax

    x = np.array([[1.0, 2.0, 30.0, 0.5], [0.3, -1.0, 0.2, 0.1]])
    m = np.array([[True, True, False, True], [True, False, True, True]])
    e = np.exp(x - x.max(axis=1, keepdims=True)) * m  # AlchemyCat's MaskedSoftmax, written out
    ref = e / (e.sum(axis=1, keepdims=True) + 1e-5)
    got = masked_softmax(torch.tensor(x), torch.tensor(m)).numpy()
    assert np.allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert got[0].sum() < 1e-6  # the excluded 30 shifts every allowed entry towards 0 (a -inf fill sums to 1)
    assert np.allclose(got[1].sum(), 1.0, atol=1e-4)
    assert torch.allclose(masked_softmax(torch.tensor(x), None), torch.tensor(x).softmax(-1))


def _scoremap2bbox_reference(cam, threshold):
    """The original's scoremap2bbox, written out: uint8 truncation, strict threshold at int(t · max), one box
    per 8-connected region (a plain flood fill), boundingRect's end clipped to W - 1 / H - 1."""
    q = (cam * 255).astype(np.uint8)
    fg = q > int(threshold * q.max())
    h, w = fg.shape
    seen, boxes = np.zeros_like(fg), []
    for y in range(h):
        for x in range(w):
            if fg[y, x] and not seen[y, x]:
                stack, ys, xs = [(y, x)], [], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    ys.append(cy)
                    xs.append(cx)
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
                bx, by, bw, bh = min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1
                boxes.append((bx, by, min(bx + bw, w - 1), min(by + bh, h - 1)))
    return sorted(boxes)


def test_caa_boxes_are_scoremap2bbox():
    from fmalib.method.caa import box_mask, scoremap_boxes

    cam = np.zeros((12, 13), np.float32)
    cam[0:3, 10:13] = 1.0  # touches the top and right edges: loses its last column
    cam[9:12, 0:2] = 0.9  # touches the bottom and left edges: loses its last row
    cam[5, 12] = 0.95  # a 1-px region on the right edge: an empty box
    cam[3:8, 1:8] = 0.8  # a ring with a blob in its hole: nested boxes
    cam[4:7, 2:7] = 0.0
    cam[5, 4] = 0.7
    cam[2, 5] = 0.402  # 0.402 * 255 -> 102, not above int(0.4 * 255) = 102: the threshold is strict
    for t in (0.4, 0.5, 0.85):
        assert sorted(scoremap_boxes(cam, t)) == _scoremap2bbox_reference(cam, t), t
    boxes = sorted(scoremap_boxes(cam, 0.4))
    assert boxes == [(0, 9, 2, 11), (1, 3, 8, 8), (4, 5, 5, 6), (10, 0, 12, 3), (12, 5, 12, 6)]
    mask = box_mask(cam, 0.4)
    assert mask[0:3, 10:12].all() and not mask[:, 12].any() and not mask[11, :].any() and not mask[2, 5]
    assert not box_mask(np.zeros((4, 4), np.float32), 0.4).any()  # no region: no box
    rng = np.random.default_rng(0)
    for _ in range(20):
        rand = rng.random((7, 9)).astype(np.float32) ** 3
        assert sorted(scoremap_boxes(rand, 0.4)) == _scoremap2bbox_reference(rand, 0.4)
