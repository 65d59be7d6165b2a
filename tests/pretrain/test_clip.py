"""fmalib.pretrain.clip / clip_quality: resumable seeded pretraining (tiny run), the loaders' file, the
quality functions on hand-made cases."""
import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.method.metrics import average_precision
from fmalib.models import clip as C
from fmalib.pretrain import clip as P
from fmalib.pretrain import clip_quality as Q

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(tmp_path, name, **clip):
    over = {"workdir": str(tmp_path / name), "foundation.clip.pool_size": 24, "foundation.clip.batch_size": 6,
            "foundation.clip.steps": 2, "foundation.clip.warmup_steps": 1, "foundation.clip.eval_every": 0,
            "foundation.clip.eval.n_images": 4, "foundation.clip.checkpoint_every_s": 0,
            "clip.model": C.TINY_CLIP}  # the 4-block config: the same code, faster
    over.update({f"foundation.clip.{k}": v for k, v in clip.items()})
    return load_params("params/toy.yaml", over)


def test_resume_gives_the_same_bytes_and_open_clip_loads_them(tmp_path, monkeypatch):
    straight = tmp_path / "straight.pt"
    rep = P.pretrain_clip(_params(tmp_path, "a"), output=str(straight), evaluate_end=False)
    assert rep["steps"] == 2 and straight.stat().st_size < 25e6

    real = P.step_losses
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    resumed = tmp_path / "resumed.pt"
    monkeypatch.setattr(P, "step_losses", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        P.pretrain_clip(_params(tmp_path, "b"), output=str(resumed), evaluate_end=False)
    assert not resumed.exists()
    monkeypatch.setattr(P, "step_losses", real)
    P.pretrain_clip(_params(tmp_path, "b"), output=str(resumed), evaluate_end=False)  # resumes at step 1
    assert resumed.read_bytes() == straight.read_bytes()

    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(C.TINY_CLIP, pretrained=str(straight))
    state = torch.load(straight, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert torch.equal(model.state_dict()["visual.proj"], state["visual.proj"].float())


def test_losses_and_bad_config_is_named(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(C.TINY_CLIP, pretrained=None)
    pool = P.build_pool(0, 2_000_000, 6, (112, 112), 8)
    batch = P.make_batch(pool, 0, 0, 3, *C.image_normalization(model), ("a {}.", "a photo of a {}."))
    tok = C.get_tokenizer(C.TINY_CLIP)
    for kind in P.PATCH_LOSSES:
        losses = P.step_losses(model, P.Heads(), tok, batch, kind)
        assert set(losses) == {"caption", "concept"} | ({"patch"} if kind != "none" else set())
        assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    with pytest.raises(FmalibError, match="foundation.clip.pool"):
        P.pretrain_config(_params(tmp_path, "z", pool="cls"))
    with pytest.raises(FmalibError, match="foundation.clip.concept_templates.*with a \\{\\}"):
        P.pretrain_config(_params(tmp_path, "t", concept_templates=["a photo"]))
    with pytest.raises(FmalibError, match="foundation.clip.patch_loss"):
        P.pretrain_config(_params(tmp_path, "x", patch_loss="dens"))
    with pytest.raises(FmalibError, match="foundation.clip.lr"):
        P.pretrain_config(_params(tmp_path, "y", lr="fast"))


def _image_level_losses(model, heads, tok, batch, emb):
    """The caption InfoNCE (multi-positive, both directions) and concept sigmoid loss, written out for one embedding."""
    img = emb / emb.norm(dim=-1, keepdim=True)
    text = model.encode_text(tok(batch["captions"] + batch["prompts"]))
    text = text / text.norm(dim=-1, keepdim=True)
    cap, con = text[: len(batch["captions"])], text[len(batch["captions"]):]
    logits = model.logit_scale.exp() * img @ cap.T
    caption = 0.0
    for lg in (logits, logits.T):
        for i in range(len(lg)):
            pos = batch["same"][i] > 0
            caption = caption - (torch.log_softmax(lg[i], 0)[pos]).mean() / len(lg) / 2
    z = heads.concept[0].exp() * img @ con.T + heads.concept[1]
    y = batch["concepts"]
    concept = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    return caption, concept


def test_pooled_losses_match_a_direct_formula_and_value_tokens_are_the_attention_value_path():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(C.TINY_CLIP, pretrained=None)
    pool = P.build_pool(0, 2_000_000, 6, (112, 112), 8)
    batch = P.make_batch(pool, 1, 0, 4, *C.image_normalization(model), ("a {}.",))
    tok, heads = C.get_tokenizer(C.TINY_CLIP), P.Heads()
    out = C.encode_image_tokens(model, batch["x"])
    refs = {"patch_mean": [out.image_embed], "class_token": [out.class_embed],
            "both": [out.image_embed, out.class_embed]}
    for pool_kind, embeds in refs.items():
        got = P.step_losses(model, heads, tok, batch, "none", pool_kind)
        ref = [_image_level_losses(model, heads, tok, batch, e) for e in embeds]
        torch.testing.assert_close(got["caption"], sum(r[0] for r in ref) / len(ref), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["concept"], sum(r[1] for r in ref) / len(ref), atol=1e-5, rtol=1e-4)
    # value path = the last block's attention when every token attends only to itself
    blk = model.visual.transformer.resblocks[-1]
    y = blk.ln_1(out.block_input)
    n = y.shape[1]
    self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    a = blk.attn(y, y, y, need_weights=False, attn_mask=self_only)[0]
    ref = model.visual.ln_post(a[:, 1:]) @ model.visual.proj
    torch.testing.assert_close(C.last_block_value_tokens(model, out.block_input), ref, atol=1e-5, rtol=1e-4)


def test_patch_fractions_and_batch():
    from fmalib.data.synthetic import generate_sample

    s = generate_sample(0, 3, (112, 120))
    frac = P.patch_fractions(s, 8).astype(np.float32)
    assert frac.shape == (14, 15, 12)
    sums = frac.sum(-1)
    assert np.allclose(sums[sums > 0], 1, atol=1e-2) and (sums > 0).mean() > 0.9
    for c in s.labels:  # each object owns the majority of some patch
        assert frac[..., c - 1].max() > 0.5
    pool = P.build_pool(0, 2_000_000, 12, (112, 128), 8)
    b1 = P.make_batch(pool, 5, 0, 4, (0.5,) * 3, (0.25,) * 3, ("a {}.", "{} here"))
    b2 = P.make_batch(pool, 5, 0, 4, (0.5,) * 3, (0.25,) * 3, ("a {}.", "{} here"))
    assert all(p.startswith("a ") or p.endswith(" here") for p in b1["prompts"])
    assert torch.equal(b1["x"], b2["x"]) and b1["captions"] == b2["captions"]
    assert all(w not in " ".join(b1["captions"]) for w in ("water", "grass", "sky", "road", "sand", "wall"))
    assert torch.equal(torch.diagonal(b1["same"]), torch.ones(len(b1["x"])))


def test_average_precision_and_peak():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    gt = np.zeros((16, 16), np.uint8)
    gt[8:, 8:] = 3
    gt[8, 8:] = 255
    cam = np.zeros((4, 4), np.float32)
    cam[3, 3] = 1
    assert Q.peak_in_object(cam, gt, 3) and not Q.peak_in_object(cam, gt, 2)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1
    assert not Q.peak_in_object(cam, gt, 3)


def test_quality_functions_run_on_a_random_model():
    torch.manual_seed(0)
    model = C.load_clip(C.TINY_CLIP)
    tok = C.get_tokenizer(C.TINY_CLIP)
    params = load_params("params/toy.yaml")
    ims, labs, gts = P.val_set(params, 2)
    zs = Q.zero_shot_map(model, tok, ims, labs, list(params.classes.names))
    assert 0 <= zs["map"] <= 1 and set(zs["ap"]) == set(params.classes.names)
    cam = Q.cam_peak_hit_rate(model, tok, ims, labs, gts, list(params.classes.names), list(params.classes.bg_words))
    assert cam["n_pairs"] == sum(len(l) for l in labs) and 0 < cam["chance"] < 1
