"""Stage 2 on Detectron2: dataset registration, augmentation, training + resume, evaluation vs fmalib.method.metrics."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2", reason="detectron2 is not installed (make install / tools/install_detectron2.sh)")

import torch  # noqa: E402

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset  # noqa: E402
from fmalib.data.labels import read_label_png, write_label_png  # noqa: E402
from fmalib.method.metrics import ConfusionMeter, iou_per_class, mean_iou
from fmalib.segment import compat  # noqa: E402
from fmalib.segment import evaluate as seg_eval  # noqa: E402
from fmalib.segment.config import build_config  # noqa: E402
from fmalib.segment.datasets import SemSegMapper, random_scale_crop_flip, register_gt, register_pseudo  # noqa: E402
from fmalib.segment.train import read_metrics, train_segmenter  # noqa: E402

# A tiny, fast schedule: R18 with narrow FPN/head (GroupNorm needs multiples of 32), 64 px crops, no rescale.
TINY = {
    "stage2.iters": 8, "stage2.batch_size": 2, "stage2.crop_size": 64, "stage2.scale_range": [1.0, 1.0],
    "stage2.fpn_channels": 32, "stage2.head_channels": 32, "stage2.lr": 0.02, "stage2.warmup_iters": 0,
    "stage2.checkpoint_period": 3, "stage2.log_period": 1,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage2")
    return load_params("params/toy.yaml", {
        "data.root": str(tmp / "bench"), "workdir": str(tmp / "work"), "data.synthetic.n_train": 6,
        "data.synthetic.n_val": 4, "data.synthetic.size_min": 64, "data.synthetic.size_max": 72, **TINY})


@pytest.fixture(scope="module")
def trained(params, tmp_path_factory):
    """One tiny run on the ground truth (8 iterations; checkpoints after 3 and 6, the last one kept, and final)."""
    out = tmp_path_factory.mktemp("run") / "gt"
    summary = train_segmenter(params, None, out)
    return out, summary


def test_compat_bridges_only_what_is_missing():
    compat.ensure_detectron2()
    compat.ensure_detectron2()  # idempotent: nothing applied twice
    assert len(compat.APPLIED) == len(set(compat.APPLIED))
    from PIL import Image

    assert Image.LINEAR == Image.BILINEAR
    assert np.int is int or not any("np.int" in a for a in compat.APPLIED)
    import detectron2._C as ops
    import detectron2.evaluation  # noqa: F401  (imports detectron2._C at import time)

    if "detectron2._C placeholder" in compat.APPLIED:
        with pytest.raises(AttributeError, match="DETECTRON2_SRC"):
            ops.nms_rotated  # noqa: B018


def test_registration_round_trip(params, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    ds = open_dataset(params, "train")
    # a degraded copy of the ground truth stands in for the pseudo-labels
    for i, iid in enumerate(ds.ids):
        gt = ds.load_gt(i).copy()
        gt[:8] = 255
        write_label_png(tmp_path / f"{iid}.png", gt)
    name = register_pseudo(params, tmp_path)
    assert register_pseudo(params, tmp_path) == name  # re-registering replaces, no error
    records = DatasetCatalog.get(name)
    assert [r["image_id"] for r in records] == ds.ids
    assert [r["file_name"] for r in records] == [str(ds.image_path(i)) for i in range(len(ds))]
    first = read_label_png(records[0]["sem_seg_file_name"])
    assert (first[:8] == 255).all() and np.array_equal(first[8:], ds.load_gt(0)[8:])
    meta = MetadataCatalog.get(name)
    assert meta.stuff_classes == ["background", *params.classes.names]
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert meta.stuff_colors[:2] == [(0, 0, 0), (128, 0, 0)]  # VOC palette

    gt_name = register_gt(params, "val")
    assert [read_label_png(r["sem_seg_file_name"]).shape for r in DatasetCatalog.get(gt_name)] == \
        [open_dataset(params, "val").load_gt(i).shape for i in range(4)]

    (tmp_path / f"{ds.ids[-1]}.png").unlink()
    with pytest.raises(FmalibError, match=ds.ids[-1]):
        register_pseudo(params, tmp_path)


def test_augmentation_keeps_labels_on_their_pixels():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 7, (40, 50)).astype(np.uint8)
    image = np.stack([label * 30, label * 30 + 1, 255 - label], -1).astype(np.uint8)  # colour encodes the class
    for _ in range(10):
        img, lab = random_scale_crop_flip(image, label, (1.0, 1.0), 48, True, rng)
        assert img.shape == (48, 48, 3) and lab.shape == (48, 48)
        pad = lab == 255
        assert pad.any() and (img[pad] == 0).all()  # 40 < 48: padded rows are ignore, image black
        assert np.array_equal(img[~pad][:, 0], lab[~pad] * 30)
    img, lab = random_scale_crop_flip(image, label, (2.0, 2.0), 32, False, rng)  # nearest labels at 2x
    assert set(np.unique(lab)) <= set(np.unique(label))
    mapper = SemSegMapper(is_train=False, input_format="BGR")
    assert mapper.is_train is False


def test_training_lowers_the_loss_and_checkpoints(trained):
    out, summary = trained
    losses = [m["total_loss"] for m in read_metrics(out)]
    assert len(losses) == 8 and summary["iters"] == 8 and summary["resumed_from"] == 0
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()


def test_resume_from_a_checkpoint(params, trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    assert not (run / "model_0000002.pth").exists()  # older periodic checkpoints are pruned
    # simulate a crash after iteration 6: only the periodic checkpoint survived
    (run / "model_final.pth").unlink()
    (run / "done.json").unlink()
    (run / "last_checkpoint").write_text("model_0000005.pth")
    summary = train_segmenter(params, None, run)
    assert summary["resumed_from"] == 6 and summary["iters"] == 8
    assert [m["iteration"] for m in read_metrics(run)][-2:] == [6, 7]
    assert (run / "model_final.pth").is_file()
    before = (run / "done.json").read_text()
    assert train_segmenter(params, None, run)["resumed_from"] == 6  # finished: not retrained
    assert (run / "done.json").read_text() == before


def test_semseg_evaluator_agrees_with_fmalib_metrics(params):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import SemSegEvaluator

    name = register_gt(params, "val")
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    meter = ConfusionMeter(7)
    rng = np.random.default_rng(0)
    for rec in DatasetCatalog.get(name):
        gt = read_label_png(rec["sem_seg_file_name"])
        # mostly-right predictions with noise, including classes absent from this image
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 0, gt), rng.integers(0, 7, gt.shape))
        logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 7).permute(2, 0, 1).float()
        evaluator.process([{"file_name": rec["file_name"]}], [{"sem_seg": logits}])
        meter.add(pred, gt)
    assert (read_label_png(rec["sem_seg_file_name"]) == 255).any()  # ignore pixels are exercised
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] / 100 == pytest.approx(mean_iou(meter.matrix), abs=1e-9)
    ious = iou_per_class(meter.matrix)
    present = meter.matrix.sum(1) > 0
    d2 = np.array([res[f"IoU-{c}"] for c in ["background", *params.classes.names]]) / 100
    np.testing.assert_allclose(d2[present], ious[present], atol=1e-9)


def test_evaluate_segmenter_matches_and_caches(params, trained, tmp_path):
    out, _ = trained
    res = seg_eval.evaluate_segmenter(params, out, "val", save_predictions=tmp_path)
    assert res["n_images"] == 4 and res["miou"] == pytest.approx(res["d2_miou"], abs=1e-9)
    assert res["confusion"].sum() == sum((open_dataset(params, "val").load_gt(i) != 255).sum() for i in range(4))
    assert len(list(tmp_path.glob("*.png"))) == 4
    again = seg_eval.evaluate_segmenter(params, out, "val")  # from the cache
    assert np.array_equal(again["confusion"], res["confusion"])


def test_tta_probabilities(params, trained):
    out, _ = trained
    seg = seg_eval.load_segmenter(params, out, scales=[0.75, 1.0, 1.25], flip=True)
    image = open_dataset(params, "val")[0]["image"][:61, :53]  # odd size
    probs = seg.probs(image)
    assert probs.shape == (7, 61, 53)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # flip TTA is flip-equivariant: the mirrored image gets the mirrored probabilities
    np.testing.assert_allclose(seg.probs(image[:, ::-1].copy()), probs[:, :, ::-1], atol=1e-5)


def test_dense_crf_or_clear_skip(params, trained, monkeypatch, caplog):
    out, _ = trained
    if seg_eval.crf_available():
        image = np.zeros((24, 24, 3), np.uint8)
        image[:, 12:] = 255
        probs = np.full((2, 24, 24), 0.5, np.float32)
        probs[0, :, :12], probs[1, :, :12] = 0.8, 0.2
        probs[0, :, 12:], probs[1, :, 12:] = 0.3, 0.7
        probs[:, 5, 5] = [0.45, 0.55]  # one noisy pixel inside the left region
        refined = seg_eval.dense_crf(image, probs, params.stage2.crf)
        assert refined.shape == probs.shape and refined.argmax(0)[5, 5] == 0
        np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4)
    monkeypatch.setattr(seg_eval, "crf_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        seg = seg_eval.load_segmenter(params, out, crf=True)
    assert seg.crf is None and "pydensecrf2" in caplog.text


@pytest.mark.parametrize("model,depth", [("deeplabv3plus", 18), ("deeplabv3plus", 50), ("semantic_fpn", 18)])
def test_configs_build_models_for_any_image_size(params, model, depth):
    from detectron2.modeling import build_model

    stage2 = {**params.stage2, "model": model, "backbone_depth": depth, "head_channels": 32, "fpn_channels": 32}
    cfg = build_config(stage2, 7)
    net = build_model(cfg).eval()
    with torch.no_grad():
        out = net([{"image": torch.zeros(3, 50, 37, dtype=torch.uint8), "height": 50, "width": 37}])
    assert out[0]["sem_seg"].shape == (7, 50, 37)
    with pytest.raises(FmalibError, match="stage2.model"):
        build_config({**stage2, "model": "mask2former"}, 7)
    with pytest.raises(FmalibError, match="stage2.weights"):
        build_config({**stage2, "weights": "/nonexistent/R-101.pkl"}, 7)


def test_cli_trains_and_evaluates(params, trained, tmp_path, capsys):
    from fmalib.study.cli import main

    out, _ = trained
    overrides = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()] + [
        f"--set=data.root={params.data.root}", f"--set=workdir={tmp_path}", "--set=data.synthetic.n_train=6",
        "--set=data.synthetic.n_val=4", "--set=data.synthetic.size_min=64", "--set=data.synthetic.size_max=72"]
    # the same settings as the fixture's run: the CLI finds it trained and only evaluates
    assert main(["stage2", "--params", "params/toy.yaml", *overrides, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["train"]["iters"] == 8 and report["train"]["resumed_from"] == 0
    assert report["eval"]["n_images"] == 4 and 0 <= report["eval"]["miou"] <= 1
    assert main(["stage2", "--params", "params/toy.yaml", *overrides, "--labels", str(tmp_path / "nope")]) == 2
    assert "pseudo-label folder" in capsys.readouterr().err


def test_pseudo_label_dir_contract(params, tmp_path):
    from fmalib.study.results import record
    from fmalib.study.stage2 import pseudo_label_dir

    with pytest.raises(FmalibError, match="06_fine_seeds"):
        pseudo_label_dir(params, tmp_path)  # notebook 06 has not run, stage2.labels is null
    record(tmp_path, "06_fine_seeds", label_dir=str(tmp_path / "seeds"))
    with pytest.raises(FmalibError, match="does not exist"):
        pseudo_label_dir(params, tmp_path)
    (tmp_path / "seeds").mkdir()
    assert pseudo_label_dir(params, tmp_path) == tmp_path / "seeds"
    (tmp_path / "mine").mkdir()
    explicit = load_params(params.to_dict(), {"stage2.labels": str(tmp_path / "mine")})
    assert pseudo_label_dir(explicit, tmp_path) == tmp_path / "mine"  # params win over the recorded seeds


def test_same_seed_same_weights(params, tmp_path):
    short = load_params(params.to_dict(), {"stage2.iters": 2})
    for run in ("a", "b"):
        train_segmenter(short, None, tmp_path / run, resume=False)
    a, b = (torch.load(tmp_path / run / "model_final.pth", weights_only=False)["model"] for run in ("a", "b"))
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
