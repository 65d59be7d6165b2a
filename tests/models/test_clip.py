"""fmalib.models.clip: open_clip save→load round trips (tiny and ViT-B-16), checkpoint errors, pos-embed
resize, the text tower on embeddings, gradients at the last block's input."""
import open_clip
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.models import clip as C

TINY = C.TINY_CLIP


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return C.load_clip(TINY)


def _roundtrip(name, tmp_path, half=False, direct=True):
    torch.manual_seed(1)
    src = open_clip.create_model(name, pretrained=None)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in src.state_dict().items()}
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    loaded = C.load_clip(name, checkpoint=path)
    got = loaded.state_dict()
    for key, ref in state.items():
        assert torch.equal(got[key], ref.to(got[key].dtype)), key
    if direct:  # the plain open_clip call a user makes loads the same weights
        plain, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(path))
        assert all(torch.equal(v, got[k]) for k, v in plain.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    return src, loaded


def test_tiny_roundtrip_and_outputs_match_open_clip(tmp_path):
    src, loaded = _roundtrip(TINY, tmp_path)
    src.eval()
    x = torch.randn(2, 3, 112, 112)
    out = C.encode_image_tokens(loaded, x)
    # pool_type avg: open_clip's own image embedding IS the mean of projected patch tokens
    torch.testing.assert_close(out.image_embed, src.encode_image(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.image_embed, out.patch_embed.mean(dim=(1, 2)))


def test_vit_b16_random_init_roundtrip(tmp_path):
    # fp16 file: half the disk, same load path; a plain state dict does not say GELU or QuickGELU, and
    # open_clip lists both for ViT-B-16 (LAION's, OpenAI's), so the load says so
    with pytest.warns(C.CLIPActivationWarning, match="ViT-B-16-quickgelu"):
        _, loaded = _roundtrip("ViT-B-16", tmp_path, half=True, direct=False)
    assert C.patch_size(loaded) == 16
    out = C.encode_image_tokens(loaded, torch.randn(1, 3, 64, 96), attn_last_k=8)
    assert out.grid == (4, 6) and out.patch_embed.shape == (1, 4, 6, 512) and len(out.attn) == 8
    # ViT-B-16 pools the class token (pool_type tok): open_clip's image embedding is out.class_embed
    x = torch.randn(1, 3, 224, 224)  # open_clip's own forward needs the 14x14 grid it was built for
    torch.testing.assert_close(C.encode_image_tokens(loaded, x).class_embed.float(),
                               loaded.encode_image(x).float(), atol=2e-3, rtol=2e-3)


def test_wrong_or_truncated_checkpoint_names_the_key(tmp_path):
    state = open_clip.create_model(TINY, pretrained=None).state_dict()
    bad = dict(state)
    bad["visual.proj"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(FmalibError, match="visual.proj"):
        C.load_clip(TINY, tmp_path / "shape.pt")
    missing = {k: v for k, v in state.items() if k != "ln_final.weight"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(FmalibError, match="ln_final.weight"):
        C.load_clip(TINY, tmp_path / "missing.pt")
    torch.save(state, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FmalibError, match="trunc.pt"):
        C.load_clip(TINY, tmp_path / "trunc.pt")
    with pytest.raises(FmalibError, match="does not exist"):
        C.load_clip(TINY, tmp_path / "nope.pt")
    with pytest.raises(FmalibError, match="not-a-model"):
        C.load_clip("not-a-model")


def test_resize_pos_embed_non_square():
    grid = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 4)
    pos = torch.cat([torch.full((1, 2), -1.0), torch.stack([grid.flatten(), -grid.flatten()], 1)])
    out = C.resize_pos_embed(pos, (2, 6))
    assert out.shape == (1 + 12, 2)
    assert torch.equal(out[0], pos[0])  # class position untouched
    patch = out[1:, 0].reshape(2, 6)
    assert (patch[1] > patch[0]).all() and (patch[:, 1:] >= patch[:, :-1]).all()  # orientation kept
    assert torch.equal(C.resize_pos_embed(pos, (4, 4)), pos)
    with pytest.raises(FmalibError):
        C.resize_pos_embed(pos[:-1], (2, 2))


def test_non_square_input_and_patch_multiple(tiny):
    out = C.encode_image_tokens(tiny, torch.randn(1, 3, 96, 128), attn_last_k=2)
    assert out.grid == (12, 16) and out.patch_embed.shape == (1, 12, 16, 128)
    assert out.block_input.shape == (1, 1 + 12 * 16, 128)
    assert out.attn[-1].shape == (1, 193, 193)
    torch.testing.assert_close(out.attn[-1].sum(-1), torch.ones(1, 193))
    with pytest.raises(FmalibError, match="multiple of the patch"):
        C.encode_image_tokens(tiny, torch.randn(1, 3, 100, 128))


def test_encode_text_embeddings_equals_encode_text(tiny):
    tok = C.get_tokenizer(TINY)(["a clean origami ball.", "a star and a boat", "kite"])
    ref = tiny.encode_text(tok)
    got = C.encode_text_embeddings(tiny, C.token_embedding(tiny, tok), tok.argmax(-1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # shorter prompts (L < context length) give the same EOT feature: the mask is causal
    L = int(tok.argmax(-1).max()) + 1
    short = C.encode_text_embeddings(tiny, C.token_embedding(tiny, tok[:, :L]), tok.argmax(-1))
    torch.testing.assert_close(short, ref, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_block_input(tiny):
    out = C.encode_image_tokens(tiny, torch.randn(2, 3, 112, 112))
    text = tiny.encode_text(C.get_tokenizer(TINY)(["a ball"]))
    score = torch.nn.functional.cosine_similarity(out.image_embed, text).sum()
    (grad,) = torch.autograd.grad(score, out.block_input)
    assert grad.shape == out.block_input.shape and grad[:, 1:].abs().sum() > 0
    with torch.no_grad():
        assert not C.encode_image_tokens(tiny, torch.randn(1, 3, 112, 112)).block_input.requires_grad


def test_cam_input_sides_round_up_with_pil_bicubic(tiny):
    """The original's inference input: each side up to a multiple of the patch (ceil(side / p) * p), the uint8
    image resized by PIL's bicubic filter, then CLIP's normalisation."""
    import math
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    vit16 = SimpleNamespace(visual=SimpleNamespace(patch_size=(16, 16)))
    for (h, w), want in {(375, 500): (384, 512), (500, 333): (512, 336), (17, 300): (32, 304),
                         (384, 512): (384, 512), (1, 1): (16, 16)}.items():
        assert C.input_size(vit16, h, w) == want == tuple(max(1, math.ceil(s / 16)) * 16 for s in (h, w))
    assert C.input_size(vit16, 3000, 2000, 512) == (512, 352)  # capped: 512 x 341.3 -> sides up, long side kept
    model = tiny
    image = np.random.default_rng(0).integers(0, 256, (17, 30, 3), dtype=np.uint8)
    x = C.to_input(model, image)
    ref = np.asarray(Image.fromarray(image).resize((32, 24), Image.BICUBIC), np.float32) / 255.0
    mean, std = (np.asarray(v, np.float32) for v in C.image_normalization(model))
    assert x.shape == (1, 3, 24, 32)
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), (ref - mean) / std, atol=1e-6)
