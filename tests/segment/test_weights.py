"""Stage-2 backbone weights as users have them: a torchvision ResNet .pth converted when weights_style says
torchvision, refused under another style, a file that fills nothing refused, the count in done.json.
ResNet-18 at random init stands in for ResNet-101 (same layout, 11.7 M params)."""
from __future__ import annotations

import pickle

import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (make install / tools/install_detectron2.sh)")

import torch  # noqa: E402
import torchvision  # noqa: E402

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.segment.config import build_config  # noqa: E402
from fmalib.segment.weights import backbone_keys, checkpointer_class, torchvision_to_detectron2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"stage2.iters": 2, "stage2.batch_size": 2, "stage2.crop_size": 64, "stage2.scale_range": [1.0, 1.0],
        "stage2.fpn_channels": 32, "stage2.head_channels": 32, "stage2.warmup_iters": 0,
        "stage2.checkpoint_period": 1000, "stage2.log_period": 1}


@pytest.fixture(scope="module")
def tv_resnet18(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so a copy is visible
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2w")
    return load_params("params/toy.yaml", {
        "data.root": str(tmp / "bench"), "workdir": str(tmp / "work"), "data.synthetic.n_train": 4,
        "data.synthetic.n_val": 2, "data.synthetic.size_min": 64, "data.synthetic.size_max": 72, **TINY})


def _model(params, weights, style):
    stage2 = {**params.stage2, "weights": str(weights), "weights_style": style}
    cfg = build_config(stage2, 7)  # applies fmalib's Detectron2 bridges first
    from detectron2.modeling import build_model

    model = build_model(cfg)
    return model, checkpointer_class()(model, weights=str(weights), weights_style=style)


def test_torchvision_layout_converted_and_every_backbone_tensor_filled(params, tv_resnet18, tmp_path):
    path, ref = tv_resnet18
    model, ckpt = _model(params, path, "torchvision")
    ckpt.load(str(path))
    n = len(backbone_keys(model))
    assert n > 60 and ckpt.backbone_report == {"file": str(path.resolve()), "weights_style": "torchvision",
                                               "matched": n, "backbone_tensors": n}
    bottom_up = model.backbone.bottom_up
    assert torch.equal(bottom_up.res3[0].conv1.weight, ref["layer2.0.conv1.weight"])
    assert torch.equal(bottom_up.res3[0].shortcut.norm.running_mean, ref["layer2.0.downsample.1.running_mean"])
    assert torch.equal(bottom_up.stem.conv1.norm.running_mean, ref["bn1.running_mean"])
    # the same weights in Detectron2's own .pkl format (as the model zoo's) load by Detectron2's heuristics
    pkl = tmp_path / "R-18.pkl"
    pkl.write_bytes(pickle.dumps({"model": torchvision_to_detectron2(ref), "__author__": "fmalib test",
                                  "matching_heuristics": True}))
    model, ckpt = _model(params, pkl, "msra")
    ckpt.load(str(pkl))
    assert ckpt.backbone_report["matched"] == n
    assert torch.equal(model.backbone.bottom_up.res3[0].conv1.weight, ref["layer2.0.conv1.weight"])


def test_torchvision_file_under_another_style_is_an_error(params, tv_resnet18):
    path, _ = tv_resnet18
    _, ckpt = _model(params, path, "deeplab")
    with pytest.raises(FmalibError, match=rf"{path.name}.*torchvision ResNet.*'deeplab'.*weights_style: torchvision"):
        ckpt.load(str(path))


def test_a_file_that_fills_nothing_is_an_error(params, tmp_path):
    torch.save({"encoder.blocks.0.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    _, ckpt = _model(params, tmp_path / "other.pth", "msra")
    with pytest.raises(FmalibError, match=r"other\.pth filled none of the backbone's \d+ ResNet tensors.*'msra'"):
        ckpt.load(str(tmp_path / "other.pth"))


def test_training_checks_the_weights_it_starts_from(params, tv_resnet18, tmp_path):
    """The Why: an unconverted torchvision .pth used to train from random init with exit code 0."""
    from fmalib.segment.train import train_segmenter

    path, _ = tv_resnet18
    bad = load_params(params.to_dict(), {"stage2.weights": str(path), "stage2.weights_style": "msra"})
    with pytest.raises(FmalibError, match="weights_style: torchvision"):
        train_segmenter(bad, None, tmp_path / "bad")
    good = load_params(params.to_dict(), {"stage2.weights": str(path), "stage2.weights_style": "torchvision"})
    summary = train_segmenter(good, None, tmp_path / "good")
    report = summary["backbone_weights"]
    assert report["matched"] == report["backbone_tensors"] > 60 and report["file"] == str(path.resolve())
