"""Stage 2 on Detectron2: dataset registration, augmentation, training + resume, evaluation vs fmalib.method.metrics."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

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
from fmalib.segment.datasets import SemSegMapper, augment, register_gt, register_pseudo  # noqa: E402
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


# one colour per class (every channel > 0, so no blend of them is the black of the padding)
COLOURS = np.array([[20, 200, 40], [200, 30, 60], [60, 60, 220], [230, 220, 20], [30, 210, 210], [180, 40, 200],
                    [120, 120, 120]], np.uint8)


def _blocky_label(h, w, seed, block=8):
    """Random classes 0..6 in ``block`` x ``block`` squares (odd sizes leave partial blocks at the edges)."""
    cells = np.random.default_rng(seed).integers(0, len(COLOURS), (-(-h // block), -(-w // block)))
    return np.kron(cells, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def _decode(pixels):
    """The class whose colour is nearest to each RGB pixel."""
    return np.abs(pixels[..., None, :].astype(int) - COLOURS.astype(int)).sum(-1).argmin(-1)


def _interior(label, r=2):
    """Pixels whose (2r+1)^2 neighbourhood has one class and no padding: bilinear colours are exact there."""
    h, w = label.shape
    padded = np.pad(label.astype(int), r, constant_values=-1)
    windows = np.stack([padded[dy:dy + h, dx:dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)])
    return (windows == label).all(0) & (label != 255)


def test_augmentation_labels_follow_the_image_pixel_for_pixel():
    label = _blocky_label(37, 53, seed=0, block=12)
    image = COLOURS[label]
    np.random.seed(0)
    padded_draws = 0
    for _ in range(30):
        img, lab = augment(image, label, (0.6, 1.8), 48, True)
        assert img.shape == (48, 48, 3) and lab.shape == (48, 48) and img.dtype == lab.dtype == np.uint8
        pad = lab == 255
        assert np.array_equal(pad, (img == 0).all(-1))  # ignore labels exactly where the image is padded black
        rows = (~pad).any(1)
        assert rows[:rows.sum()].all()  # padding only below (and beside) the image, never inside it
        padded_draws += pad.any()
        inner = _interior(lab)
        assert inner.sum() > 0.2 * (~pad).sum()
        assert np.array_equal(_decode(img[inner]), lab[inner])  # each label on its own pixel, scaled/cropped/flipped
        assert (_decode(img[~pad]) == lab[~pad]).mean() > 0.9  # boundaries blend colours, labels stay nearest
        assert set(np.unique(lab[~pad])) <= set(np.unique(label))
    assert 0 < padded_draws < 30  # 37 * s < 48 for s < 1.3: some draws pad, others do not
    img, lab = augment(image, label, (1.0, 1.0), 48, True)  # no rescale: every pixel exact
    pad = lab == 255
    assert pad.sum() == 48 * 48 - 37 * 48 and np.array_equal(img[~pad], COLOURS[lab[~pad]])


def test_augmentation_scales_by_the_image_size_and_crops_anywhere():
    yy, xx = np.mgrid[:60, :80]
    image = np.stack([yy, xx, np.full_like(yy, 7)], -1).astype(np.uint8)  # each pixel carries its coordinates
    label = (yy % 5).astype(np.uint8)
    np.random.seed(2)
    for s in (0.5, 1.5):  # s of the image's own size, whatever the crop would be
        img, lab = augment(image, label, (s, s), 0, False)
        assert img.shape == (round(60 * s), round(80 * s), 3) and lab.shape == img.shape[:2]
    offsets = []
    for _ in range(300):
        img, lab = augment(image, label, (1.0, 1.0), 24, False)
        y, x = int(img[0, 0, 0]), int(img[0, 0, 1])
        assert np.array_equal(img, image[y:y + 24, x:x + 24]) and np.array_equal(lab, label[y:y + 24, x:x + 24])
        offsets.append((y, x))
    ys, xs = np.array(offsets).T
    assert ys.min() <= 2 and ys.max() >= 34 and xs.min() <= 2 and xs.max() >= 54  # windows reach every border
    assert abs(np.corrcoef(ys, xs)[0, 1]) < 0.2 and len(set(offsets)) > 200  # y and x drawn independently


def test_augmentation_flips_about_half_the_time_and_replays_from_the_seed():
    label = _blocky_label(32, 40, seed=1)
    image = COLOURS[label]
    np.random.seed(3)
    flips = 0
    for _ in range(400):
        img, lab = augment(image, label, (1.0, 1.0), 0, True)
        flipped = np.array_equal(lab, label[:, ::-1])
        assert np.array_equal(img, image[:, ::-1] if flipped else image)  # image and label flip together
        assert flipped or np.array_equal(lab, label)
        flips += flipped
    assert 160 < flips < 240  # p = 0.5: 200 +- 4 sigma
    assert all(np.array_equal(augment(image, label, (1.0, 1.0), 0, False)[1], label) for _ in range(20))

    def draws(seed):
        np.random.seed(seed)  # what Detectron2 seeds per data-loader worker
        return [augment(image, label, (0.5, 2.0), 24, True) for _ in range(5)]

    a, b, c = draws(7), draws(7), draws(8)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_mapper_reads_palette_labels_and_augments(tmp_path):
    label = _blocky_label(30, 44, seed=2)
    label[:8, :8] = 5  # VOC palette index 5 is (128, 0, 128): read as luminance it would not be 5
    Image.fromarray(COLOURS[label]).save(tmp_path / "a.png")
    write_label_png(tmp_path / "a_label.png", label)
    record = {"file_name": str(tmp_path / "a.png"), "sem_seg_file_name": str(tmp_path / "a_label.png"), "image_id": "a"}
    np.random.seed(0)
    out = SemSegMapper(True, "BGR", (1.0, 1.0), 40, True)(record)
    assert (out["height"], out["width"]) == (30, 44)
    sem, img = out["sem_seg"].numpy(), out["image"].numpy().transpose(1, 2, 0)[:, :, ::-1]  # BGR back to RGB
    assert out["sem_seg"].dtype == torch.int64 and sem.shape == (40, 40) and img.shape == (40, 40, 3)
    valid = sem != 255
    assert valid.sum() == 30 * 40 and np.array_equal(img[valid], COLOURS[sem[valid]])
    assert np.array_equal(np.sort(np.unique(sem[valid])), np.unique(label))
    test = SemSegMapper(is_train=False, input_format="RGB")(record)
    assert "sem_seg" not in test and tuple(test["image"].shape) == (3, 30, 44)
    assert np.array_equal(test["image"].numpy().transpose(1, 2, 0), COLOURS[label])


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


def test_crf_options_from_one_pass_equal_separate_evaluations(params, trained, tmp_path):
    out, _ = trained
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("eval"))
    both = seg_eval.evaluate_segmenter_crf_options(params, run, "val", (False, True), scales=[1.0, 1.25], flip=True)
    assert [r["crf_applied"] for r in both] == [False, seg_eval.crf_available()]
    for crf, res in zip((False, True), both):
        alone = seg_eval.evaluate_segmenter(params, run, "val", scales=[1.0, 1.25], flip=True, crf=crf, force=True)
        np.testing.assert_array_equal(res["confusion"], alone["confusion"])
        assert res["d2_miou"] == pytest.approx(alone["d2_miou"], abs=1e-12)
    cached = sorted((run / "eval").glob("*.json"))
    assert len(cached) == (2 if seg_eval.crf_available() else 1)
    with pytest.raises(FmalibError, match="one CRF option"):
        seg_eval.evaluate_segmenter_crf_options(params, run, "val", (False, True), save_predictions=tmp_path)


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
