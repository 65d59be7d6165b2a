"""CLIP checkpoints in every form users have: OpenAI's TorchScript archive (QuickGELU), a state dict taken from
it, open_clip state dicts (plain, state_dict / module. wrapped, fp16, safetensors), unreadable files; the
activation check; no open_clip "initialized randomly" line.

The architectures are random-init ViT-B/16s of reduced width (``narrow-ViT-B-16`` / ``-quickgelu``: patch 16
at 224 px and the 49,408-token vocabulary as ViT-B/16, widths 64, 2 layers per tower, 3.2 M params), so an
OpenAI-style archive traces, saves and loads in a second; the full ViT-B/16 round trip is in test_models_clip.
"""
import json
import logging
import warnings

import open_clip
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.models import clip as C

pytestmark = pytest.mark.usefixtures("one_thread")

NARROW = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
GELU, QUICK = "narrow-ViT-B-16", "narrow-ViT-B-16-quickgelu"


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    cfg_dir = tmp_path_factory.mktemp("clip_cfgs")
    (cfg_dir / f"{GELU}.json").write_text(json.dumps(NARROW))
    (cfg_dir / f"{QUICK}.json").write_text(json.dumps({**NARROW, "quick_gelu": True}))
    open_clip.add_model_config(cfg_dir)
    return cfg_dir


def _openai_style_archive(path):
    """A QuickGELU CLIP traced and saved as OpenAI ships theirs: TorchScript, fp16, with OpenAI's
    input_resolution / context_length / vocab_size entries and the causal mask as a constant, not a buffer."""
    torch.manual_seed(3)
    src = open_clip.create_model(QUICK, pretrained=None).eval()
    mask = src.attn_mask
    del src._buffers["attn_mask"]
    src.attn_mask = mask
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(src, key):
            delattr(src, key)
        src.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # MultiheadAttention's shape asserts
        traced = torch.jit.trace(src, (torch.randn(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
        torch.jit.save(traced.half(), str(path))
    return src


@pytest.fixture(scope="module")
def archive(narrow, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "ViT-B-16.pt"
    return path, _openai_style_archive(path)


def _same_weights(model, ref_state):
    got = model.state_dict()
    for key, ref in ref_state.items():
        if key in got:
            assert torch.equal(got[key], ref.to(got[key].dtype)), key


def test_openai_torchscript_archive_loads_as_open_clip_reads_it(archive):
    path, src = archive
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CLIPActivationWarning)
        model = C.load_clip(QUICK, path)
    info = model.checkpoint_info
    assert info["format"] == "torchscript" and info["activation"] == "quick_gelu"
    assert "QuickGELU" in info["activation_source"]
    _same_weights(model, {k: v.half() for k, v in src.state_dict().items()})
    # open_clip's own reader of OpenAI archives builds the same weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
    _same_weights(model, ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), atol=1e-5, rtol=1e-4)


def test_openai_archive_into_a_gelu_config_is_an_error(archive):
    path, _ = archive
    with pytest.raises(FmalibError, match=rf"{path}.*quick_gelu.*QuickGELU.*builds gelu.*clip.model: {QUICK}"):
        C.load_clip(GELU, path)


def test_state_dict_taken_from_an_openai_archive_is_quickgelu(archive, tmp_path):
    path, src = archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert "input_resolution" in state
    torch.save(state, tmp_path / "from_archive.pt")
    with pytest.raises(FmalibError, match="OpenAI's metadata entries"):
        C.load_clip(GELU, tmp_path / "from_archive.pt")
    model = C.load_clip(QUICK, tmp_path / "from_archive.pt")
    assert model.checkpoint_info["format"] == "state_dict"
    _same_weights(model, {k: v.half() for k, v in src.state_dict().items()})


@pytest.mark.parametrize("form", ["plain", "wrapped", "fp16", "safetensors"])
def test_open_clip_state_dict_forms(narrow, tmp_path, form):
    torch.manual_seed(4)
    state = open_clip.create_model(GELU, pretrained=None).state_dict()
    if form == "wrapped":  # what open_clip's training and DataParallel save
        saved = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif form == "fp16":
        saved = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    else:
        saved = state
    if form == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    else:
        path = tmp_path / "clip.pt"
        torch.save(saved, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CLIPActivationWarning)  # no open_clip weights of this name: nothing to say
        model = C.load_clip(GELU, path)
    _same_weights(model, {k: v.half() for k, v in state.items()} if form == "fp16" else state)
    assert model.checkpoint_info["format"] == ("safetensors" if form == "safetensors" else "state_dict")
    assert model.checkpoint_info["activation"] == "gelu"
    assert "does not record" in model.checkpoint_info["activation_source"]


def test_unrecorded_activation_warns_only_where_open_clip_knows_the_other(narrow, tmp_path):
    """A plain state dict cannot say its activation; open_clip's table says which names are ambiguous."""
    ckpt = C.ClipCheckpoint(tmp_path / "x.pt", {}, "state_dict", None, "not recorded")
    gelu, quick = C.build_clip(GELU), C.build_clip(QUICK)
    with pytest.warns(C.CLIPActivationWarning, match="openai.*clip.model: ViT-B-16-quickgelu"):
        C.check_activation(gelu, "ViT-B-16", ckpt)  # OpenAI's (QuickGELU) and LAION's (GELU) both exist
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.CLIPActivationWarning)
        C.check_activation(quick, "ViT-B-16-quickgelu", ckpt)  # every listed weight is QuickGELU
        C.check_activation(gelu, C.TINY_CLIP, ckpt)


def test_unreadable_files_name_the_path_and_what_was_tried(archive, tmp_path):
    path, _ = archive
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(FmalibError, match=r"trunc\.pt.*bytes.*tried: torch\.load\(weights_only=True\).*TorchScript"):
        C.load_clip(QUICK, tmp_path / "trunc.pt")
    # a TorchScript archive with damaged content: the zip directory intact, a record overwritten
    import zipfile

    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "damaged.pt", "w") as zout:
        for item in zin.infolist():
            body = zin.read(item.filename)
            zout.writestr(item, b"garbage" if item.filename.endswith("constants.pkl") else body)
    with pytest.raises(FmalibError, match=r"damaged\.pt.*tried: torch\.jit\.load as a TorchScript archive"):
        C.load_clip(QUICK, tmp_path / "damaged.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FmalibError, match=r"bad\.safetensors.*tried: safetensors"):
        C.load_clip(QUICK, tmp_path / "bad.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(FmalibError, match=r"meta\.pt.*not a mapping of tensors"):
        C.load_clip(QUICK, tmp_path / "meta.pt")


def test_no_random_init_log_line_on_load(narrow, tmp_path, caplog):
    torch.save(open_clip.create_model(GELU, pretrained=None).state_dict(), tmp_path / "c.pt")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        C.load_clip(GELU, tmp_path / "c.pt")
        C.load_clip(GELU)
        C.get_tokenizer(GELU)
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert not [r for r in caplog.records if r.pathname.endswith("factory.py")]
    assert any("loaded CLIP" in r.getMessage() for r in caplog.records)  # fmalib's own line stays


@pytest.mark.parametrize("name", ["voc", "coco"])
def test_shipped_params_build_quickgelu_for_openai_weights(name):
    model = load_params(f"params/{name}.yaml").clip.model
    assert open_clip.get_model_config(model).get("quick_gelu") is True, model


def test_identity_names_the_file(archive):
    path, _ = archive
    ident = C.clip_identity(C.load_clip(QUICK, path), QUICK)
    assert ident["format"] == "torchscript" and ident["activation"] == "quick_gelu"
    assert ident["patch size"] == 16 and ident["vision layers"] == 2 and len(ident["sha256"]) == 64
    assert ident["known as"] is None  # not one of open_clip's downloads
