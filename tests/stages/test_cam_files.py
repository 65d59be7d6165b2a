"""CAM files of other methods (fmalib.stages.cam_files) and ``python -m fmalib sams``: CLIP-ES's .npy dicts
written as its generate_cams_voc12.py writes them, the plain npz form, every bad-file case, the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmalib.core.errors import FmalibError
from fmalib.data.labels import read_label_png
from fmalib.stages.cam_files import CamFiles, check_cams, plausible_grid, read_clip_es, read_npz
from fmalib.study.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def write_clip_es(path, keys, maps):
    """Exactly CLIP-ES's save (generate_cams_voc12.py): keys = torch.tensor of 0-based class indices, the
    refined high-res CAMs stacked as torch tensors, then float16, np.save of a plain dict -> <id>.npy."""
    keys = torch.tensor(list(keys))
    refined = torch.stack([torch.tensor(np.asarray(m, np.float32)) for m in maps], dim=0)
    np.save(path, {"keys": keys.numpy(), "attn_highres": refined.cpu().numpy().astype(np.float16)})


def test_clip_es_file_as_clip_es_writes_it(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.random((2, 30, 40)).astype(np.float32)
    write_clip_es(tmp_path / "img_1.npy", [4, 0], maps)  # CLIP-ES order: first appearance, not sorted
    raw = np.load(tmp_path / "img_1.npy", allow_pickle=True).item()
    assert raw["keys"].dtype == np.int64 and raw["attn_highres"].dtype == np.float16
    cams, labels = read_clip_es(tmp_path / "img_1.npy")
    assert labels.tolist() == [5, 1]  # keys + 1, as CLIP-ES's eval_cam.py
    assert cams.shape == (2, 30, 40)
    files = CamFiles(tmp_path, "clip-es", ["img_1"], num_classes=6, image_size=lambda i: (30, 40))
    cams, labels = files("img_1")
    assert cams.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(cams, maps.astype(np.float16).astype(np.float32))
    assert files.cache_key["cam_files"] == "clip-es" and files.cache_key["key"] == "attn_highres"
    with pytest.raises(FmalibError, match="no entry 'highres'"):
        read_clip_es(tmp_path / "img_1.npy", "highres")


def test_npz_file_and_patch_grids(tmp_path):
    np.savez(tmp_path / "a.npz", labels=np.array([2, 6]), cams=np.ones((2, 8, 10), np.float16))
    files = CamFiles(tmp_path, "npz", ["a"], num_classes=6, image_size=lambda i: (120, 160))
    cams, labels = files("a")
    assert labels.tolist() == [2, 6] and cams.shape == (2, 8, 10) and cams.dtype == np.float32
    cams, labels = read_npz(tmp_path / "a.npz")
    assert labels.dtype == np.int64
    assert plausible_grid((24, 32), (375, 500))  # CLIP-ES's ViT-B/16 grid: ceil(375 / 16) x ceil(500 / 16)
    assert plausible_grid((23, 31), (375, 500))  # rounded down
    assert plausible_grid((21, 32), (2000, 3000))  # fmalib's capped input: 512 px long side, patch 16
    assert plausible_grid((1, 1), (5, 7))
    assert not plausible_grid((32, 24), (375, 500))  # transposed
    assert not plausible_grid((24, 16), (375, 500))  # half the width: a crop
    assert not plausible_grid((376, 500), (375, 500))  # larger than the image


def test_content_keys_the_seeds(tmp_path):
    np.savez(tmp_path / "a.npz", labels=np.array([1]), cams=np.ones((1, 4, 4)))
    key = CamFiles(tmp_path, "npz", ["a"], 6, index_path=tmp_path / "idx.json").cache_key
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "a.npz").write_bytes((tmp_path / "a.npz").read_bytes())
    assert CamFiles(moved, "npz", ["a"], 6).cache_key == key  # the content, not the folder
    np.savez(tmp_path / "a.npz", labels=np.array([1]), cams=np.zeros((1, 4, 4)))
    assert CamFiles(tmp_path, "npz", ["a"], 6, index_path=tmp_path / "idx.json").cache_key != key


def _bad_cases(d):
    """name -> (writer, expected message part)."""
    good = np.ones((1, 6, 8), np.float32)
    return {
        "k_mismatch": (lambda p: write_clip_es(p, [0, 1], good), "1 maps for 2 classes"),
        "key_outside": (lambda p: write_clip_es(p, [6], good), "outside the 6 classes"),
        "size": (lambda p: write_clip_es(p, [0], np.ones((1, 8, 6))), "neither the image's 60x80 nor a patch grid"),
        "garbage": (lambda p: p.write_bytes(b"not a numpy file at all"), "cannot be read"),
        "truncated": (lambda p: (write_clip_es(p, [0], good), p.write_bytes(p.read_bytes()[:60])), "cannot be read"),
        "not_dict": (lambda p: np.save(p, good), "not CLIP-ES's dict"),
        "nan": (lambda p: write_clip_es(p, [0], good * np.nan), "NaN"),
        "repeat": (lambda p: write_clip_es(p, [2, 2], np.ones((2, 6, 8))), "repeat a class"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases(None)))
def test_bad_clip_es_files_name_the_file(tmp_path, case):
    write, message = _bad_cases(tmp_path)[case]
    path = tmp_path / f"{case}.npy"
    write(path)
    files = CamFiles(tmp_path, "clip-es", [case], num_classes=6, image_size=lambda i: (60, 80))
    with pytest.raises(FmalibError, match=message) as err:
        files(case)
    assert str(path) in str(err.value)


def test_bad_npz_files_name_the_file(tmp_path):
    cases = {"zero": (dict(labels=np.array([0]), cams=np.ones((1, 6, 8))), "outside the 6 classes"),
             "k": (dict(labels=np.array([1, 2]), cams=np.ones((3, 6, 8))), "3 maps for 2 classes"),
             "nolabels": (dict(cams=np.ones((1, 6, 8))), "no array 'labels'"),
             "flat": (dict(labels=np.array([1]), cams=np.ones((1, 48))), r"numeric \(K, h, w\)"),
             "floatlabels": (dict(labels=np.array([1.0]), cams=np.ones((1, 6, 8))), "1-D integer")}
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 broken zip")
    np.save(tmp_path / "single.npy", np.ones(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    cases.update(junk=(None, "cannot be read"), single=(None, "single .npy array"))
    files = CamFiles(tmp_path, "npz", list(cases), num_classes=6, image_size=lambda i: (60, 80))
    for name, (_, message) in cases.items():
        with pytest.raises(FmalibError, match=message) as err:
            files(name)
        assert str(tmp_path / f"{name}.npz") in str(err.value), name
    with pytest.raises(FmalibError, match="missing.npz for image 'missing' does not exist"):
        CamFiles(tmp_path, "npz", ["k", "missing"], 6)
    with pytest.raises(FmalibError, match="CAM folder .* does not exist"):
        CamFiles(tmp_path / "nope", "npz", ["k"], 6)
    with pytest.raises(FmalibError, match="CAM format"):
        CamFiles(tmp_path, "png", ["k"], 6)
    assert check_cams(tmp_path / "x", np.ones((0, 6, 8)), np.zeros(0, np.int64), 6, (60, 80))[0].shape == (0, 6, 8)


# --- the CLI end to end ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 4-image toy slice and CAMs made from its ground truth (class indicators on an 8-px patch grid, and the
    same maps upsampled to the image as CLIP-ES writes them)."""
    from fmalib.study import setup

    tmp = tmp_path_factory.mktemp("sams_cli")
    sets = {"data.root": str(tmp / "data"), "workdir": str(tmp / "work"), "data.synthetic.n_train": 4,
            "data.synthetic.n_val": 1, "sams.power_images": 4}
    from fmalib.data import open_dataset

    ds = open_dataset(setup("params/toy.yaml", fast=True, overrides=sets), "train")
    (tmp / "npz").mkdir()
    (tmp / "clip_es").mkdir()
    for j in range(len(ds)):
        item = ds[j]
        gt, labels = item["gt"], item["labels"]
        h, w = gt.shape
        grid = np.stack([(gt == c)[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8).mean((1, 3))
                         for c in labels]).astype(np.float16)
        np.savez(tmp / "npz" / f"{item['id']}.npz", labels=labels, cams=grid)
        write_clip_es(tmp / "clip_es" / f"{item['id']}.npy", labels - 1, grid)  # the same maps, 0-based keys
    args = ["--fast"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return tmp, args, ds


def test_sams_cli_end_to_end(toy, capsys):
    tmp, args, ds = toy
    assert main(["sams", *args, "--cams", str(tmp / "npz"), "--cam-format", "npz", "--out", str(tmp / "out_npz")]) == 0
    summary = json.loads((tmp / "out_npz" / "summary.json").read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary
    assert summary["n_images"] == 4 and summary["bg_power_rule"].startswith("auto")
    assert summary["bg_power"] in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0]
    assert isinstance(summary["fallback_images"], int) and 0 <= summary["seed_miou"] <= 1
    assert summary["mask_generator"] == "sam"
    for j in range(len(ds)):
        label = read_label_png(tmp / "out_npz" / f"{ds.ids[j]}.png")
        assert label.shape == ds[j]["gt"].shape and set(np.unique(label)) <= {0, *ds[j]["labels"].tolist()}
    # the same maps as CLIP-ES files, the masks reused: the same labels, p and mIoU
    assert main(["sams", *args, "--cams", str(tmp / "clip_es"), "--cam-format", "clip-es",
                 "--out", str(tmp / "out_clip_es")]) == 0
    other = json.loads((tmp / "out_clip_es" / "summary.json").read_text())
    assert other["masks_cache"] == summary["masks_cache"]
    assert (other["bg_power"], other["seed_miou"]) == (summary["bg_power"], summary["seed_miou"])
    for i in ds.ids:
        np.testing.assert_array_equal(read_label_png(tmp / "out_clip_es" / f"{i}.png"),
                                      read_label_png(tmp / "out_npz" / f"{i}.png"))
    # a fixed p
    assert main(["sams", *args, "--cams", str(tmp / "npz"), "--cam-format", "npz", "--bg-power", "0.7",
                 "--out", str(tmp / "out_fixed")]) == 0
    fixed = json.loads((tmp / "out_fixed" / "summary.json").read_text())
    assert fixed["bg_power"] == 0.7 and fixed["bg_power_rule"] == "fixed"


def test_sams_cli_bad_file_is_one_error(toy, capsys):
    tmp, args, ds = toy
    bad = tmp / "bad"
    bad.mkdir()
    for i in ds.ids:
        (bad / f"{i}.npy").write_bytes((tmp / "clip_es" / f"{i}.npy").read_bytes())
    write_clip_es(bad / f"{ds.ids[2]}.npy", [0, 1, 2], np.ones((2, 4, 4)))
    assert main(["sams", *args, "--cams", str(bad), "--cam-format", "clip-es", "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad / ds.ids[2]}.npy" in err and "2 maps for 3 classes" in err
    (bad / f"{ds.ids[1]}.npy").unlink()
    assert main(["sams", *args, "--cams", str(bad), "--cam-format", "clip-es", "--out", str(tmp / "o")]) == 2
    assert f"{bad / ds.ids[1]}.npy for image {ds.ids[1]!r} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sams", *args, "--cams", str(bad), "--cam-format", "clip-es", "--bg-power", "-1", "--out", "o"])
