"""Segmenting new images with a trained stage-2 run: the maps evaluation scores, written atomically, resumable,
and every bad input named."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (make install / tools/install_detectron2.sh)")

from fmalib.core.errors import FmalibError  # noqa: E402
from fmalib.core.params import load_params  # noqa: E402
from fmalib.data import open_dataset  # noqa: E402
from fmalib.data.labels import read_label_png  # noqa: E402
from fmalib.segment import evaluate_segmenter, load_segmenter, train_segmenter  # noqa: E402
from fmalib.segment.predict import PREDICTIONS, predict_images  # noqa: E402
from fmalib.study.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"stage2.iters": 4, "stage2.batch_size": 2, "stage2.crop_size": 64, "stage2.scale_range": [1.0, 1.0],
        "stage2.fpn_channels": 32, "stage2.head_channels": 32, "stage2.warmup_iters": 0,
        "stage2.checkpoint_period": 100, "stage2.log_period": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    params = load_params("params/toy.yaml", {
        "data.root": str(tmp / "bench"), "workdir": str(tmp / "work"), "data.synthetic.n_train": 4,
        "data.synthetic.n_val": 3, "data.synthetic.size_min": 64, "data.synthetic.size_max": 80, **TINY})
    run = tmp / "run"
    train_segmenter(params, None, run)
    return params, run, open_dataset(params, "val")


def test_predict_gives_the_maps_evaluation_scores_pixel_for_pixel(setup, tmp_path):
    params, run, val = setup
    tta = {"scales": [0.75, 1.0], "flip": True, "crf": False}
    evaluate_segmenter(params, run, "val", save_predictions=tmp_path / "eval", **tta)
    images = [val.image_path(i) for i in range(len(val))]
    record = predict_images(params, run, images, tmp_path / "pred", overlay=True, **tta)
    classes_seen = set()
    assert record["test"] == {"scales": [0.75, 1.0], "flip": True, "crf": False}
    for i, iid in enumerate(val.ids):
        stem = images[i].stem
        pred = read_label_png(tmp_path / "pred" / f"{stem}.png")
        assert np.array_equal(pred, read_label_png(tmp_path / "eval" / f"{iid}.png"))
        assert pred.shape == val[i]["image"].shape[:2]  # the image's own size
        classes_seen.update(np.unique(pred).tolist())
        shares = record["images"][stem]["shares"]
        counts = np.bincount(pred.ravel(), minlength=7)
        assert shares == {n: pytest.approx(counts[c] / pred.size, abs=1e-6)
                          for c, n in enumerate(record["classes"]) if counts[c]}
        with Image.open(tmp_path / "pred" / "overlay" / f"{stem}.jpg") as im:
            assert im.size == (pred.shape[1], pred.shape[0])
    assert len(classes_seen) > 1  # maps with content: the comparison could fail
    on_disk = json.loads((tmp_path / "pred" / PREDICTIONS).read_text())
    assert on_disk["images"].keys() == record["images"].keys() and "/" not in on_disk["model"]["run"]
    # the Python object: a label map per image
    seg = load_segmenter(params, run, scales=[0.75, 1.0], flip=True, crf=False)
    assert np.array_equal(seg.predict(val[0]["image"]), read_label_png(tmp_path / "eval" / f"{val.ids[0]}.png"))


def test_rerun_skips_done_images_and_force_or_other_settings_redo_them(setup, tmp_path, caplog):
    params, run, val = setup
    folder = val.image_path(0).parent
    out = tmp_path / "pred"
    predict_images(params, run, [val.image_path(0)], out)
    first = (out / f"{val.image_path(0).stem}.png").stat().st_mtime_ns
    caplog.set_level("INFO")
    record = predict_images(params, run, [folder], out)  # a folder: every image in it
    assert "predict: %d of %d images" % (len(list(folder.glob("*.png"))) - 1, len(list(folder.glob("*.png")))) \
        in caplog.text
    assert (out / f"{val.image_path(0).stem}.png").stat().st_mtime_ns == first
    assert len(record["images"]) == len(list(folder.glob("*.png")))
    caplog.clear()
    predict_images(params, run, [val.image_path(0)], out, force=True)
    assert "predict: 1 of 1 images" in caplog.text
    caplog.clear()
    predict_images(params, run, [val.image_path(0)], out, flip=True)  # another test procedure: redone
    assert "redoing every image" in caplog.text


def test_bad_inputs_each_get_one_clear_error(setup, tmp_path):
    params, run, val = setup
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(FmalibError, match=r"1 problem\(s\) in 1 file\(s\):\n  .*broken.jpg: cannot be decoded"):
        predict_images(params, run, [val.image_path(0), bad], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written
    with pytest.raises(FmalibError, match=r"--images .*nowhere: no such file or folder"):
        predict_images(params, run, [tmp_path / "nowhere"], tmp_path / "out")
    other = load_params(params.to_dict(), {"stage2.head_channels": 64})
    with pytest.raises(FmalibError, match=r"does not match params.*MODEL.SEM_SEG_HEAD.CONVS_DIM is 32, params give 64"):
        predict_images(other, run, [val.image_path(0)], tmp_path / "out")
    empty = tmp_path / "untrained"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("*.pth"))
    with pytest.raises(FmalibError, match=r"model_final.pth does not exist: train the run first"):
        predict_images(params, empty, [val.image_path(0)], tmp_path / "out")
    twins = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]
    for p in twins:
        p.parent.mkdir()
        shutil.copy(val.image_path(0), p)
    with pytest.raises(FmalibError, match=r"share the name 'x'"):
        predict_images(params, run, twins, tmp_path / "out")


def test_cli_predict(setup, tmp_path, capsys):
    params, run, val = setup
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["predict", "--params", "params/toy.yaml", "--run", str(run), "--images", str(val.image_path(1)),
            "--out", str(tmp_path / "cli"), "--no-flip", "--scales", "1.0"]
    for o in overrides + [f"data.root={params.data.root}", f"workdir={params.workdir}"]:
        argv += ["--set", o]
    assert main(argv) == 0
    assert "1 label maps in" in capsys.readouterr().out
    assert (tmp_path / "cli" / f"{val.image_path(1).stem}.png").is_file()
    assert main(argv[:-6] + ["--images", str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "cli")]) == 2
    assert "missing.jpg: no such file or folder" in capsys.readouterr().err
