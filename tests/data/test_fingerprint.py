"""Caches keyed by what determines the result — content, params, code — never by where things are; missing
checkpoints are errors; every CLI flag a subcommand lists is its own."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fmalib.core.cache import files_fingerprint, strict_json
from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.models.checkpoints import clip_fingerprint, sam_fingerprint
from fmalib.stages.cams import cam_cache
from fmalib.stages.masks import mask_cache
from fmalib.study.cli import main


def _params(root, work, **extra):
    return load_params("params/toy.yaml", {"data.root": str(root), "workdir": str(work), "data.synthetic.n_train": 4,
                                           "data.synthetic.n_val": 2, **extra})


def test_cache_keys_follow_content_not_location(tmp_path):
    a = _params(tmp_path / "a", tmp_path / "work")
    open_dataset(a, "train")
    keys_a = mask_cache(a, "train").dir.name, cam_cache(a, "train", "hand").dir.name
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # new path, new mtimes, same bytes
    b = _params(tmp_path / "moved", tmp_path / "elsewhere" / "work")
    assert (mask_cache(b, "train").dir.name, cam_cache(b, "train", "hand").dir.name) == keys_a
    ds = open_dataset(b, "train")
    label = np.array(Image.open(ds.gt_path(0)))
    label[label == label.max()] = 0  # an edited label: CAMs (which classes are present) change, masks do not
    Image.fromarray(label, mode="P").save(ds.gt_path(0))
    assert mask_cache(b, "train").dir.name == keys_a[0]
    assert cam_cache(b, "train", "hand").dir.name != keys_a[1]
    image = np.array(Image.open(ds.image_path(0)))
    Image.fromarray(255 - image).save(ds.image_path(0))
    assert mask_cache(b, "train").dir.name != keys_a[0]
    for key_file in (tmp_path / "elsewhere" / "work").rglob("key.json"):
        text = key_file.read_text()
        assert str(tmp_path) not in text and "/work/" not in text, key_file


def test_files_fingerprint_rehashes_only_changed_files(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"one")
    index = tmp_path / "index.json"
    first = files_fingerprint({"x": f}, index)
    assert json.loads(index.read_text())["x"][2] == __import__("hashlib").sha256(b"one").hexdigest()
    assert files_fingerprint({"x": f}, index) == first
    f.write_bytes(b"two")
    assert files_fingerprint({"x": f}, index) != first
    assert files_fingerprint({"x": tmp_path / "gone"}, index) != first  # a missing file counts as missing


def test_missing_checkpoint_is_an_error_random_only_when_asked(tmp_path):
    params = _params(tmp_path / "d", tmp_path / "w", **{"clip.checkpoint": "assets/nope.pt",
                                                         "sam.checkpoint": "assets/nope.pth"})
    with pytest.raises(FmalibError, match=r"params clip.checkpoint: .*assets/nope.pt does not exist"):
        clip_fingerprint(params)
    with pytest.raises(FmalibError, match=r"params sam.checkpoint: .*assets/nope.pth does not exist"):
        sam_fingerprint(params)
    null = _params(tmp_path / "d", tmp_path / "w", **{"clip.checkpoint": None, "sam.checkpoint": None})
    assert clip_fingerprint(null)["random_init_seed"] == sam_fingerprint(null)["random_init_seed"] == 0


def test_strict_json_writes_null_for_nan():
    text = strict_json({"a": float("nan"), "b": [np.float32(1.5), np.inf], "c": np.int64(3)})
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 3} and "NaN" not in text


def test_each_subcommand_has_its_own_flags_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prompts", "--shard", "0/2"])  # prompt training is one process: a shard would be ignored
    assert exc.value.code == 2 and "unrecognized arguments: --shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["masks", "--help"])
    masks_help = capsys.readouterr().out
    assert "--shard" in masks_help and "--labels" not in masks_help
    with pytest.raises(SystemExit):
        main(["stage2", "--help"])
    assert "--labels" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["masks", "--shard", "2/2"])
    assert exc.value.code == 2 and "0 <= i < n" in capsys.readouterr().err


def test_prompt_augmentation_bounds_extreme_aspect_ratios(monkeypatch):
    import fmalib.stages.prompt_data as pd_mod

    sizes, resize = [], pd_mod.TF.resize
    monkeypatch.setattr(pd_mod.TF, "resize", lambda x, size, **kw: sizes.append(tuple(size)) or resize(x, size, **kw))
    cfg = {"crop_size": 32, "long_side": [40, 60], "color_jitter": {"brightness": 0, "contrast": [1, 1], "saturation": [1, 1], "hue": 0, "p": 0}, "flip": False}
    x, y = pd_mod.augment(np.zeros((1, 3000, 3), np.uint8), np.zeros((1, 3000), np.uint8), np.random.default_rng(0), cfg)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert max(sizes[0]) == 4 * 60 and min(sizes[0]) == 32  # not 32 x 96,000
    sizes.clear()
    pd_mod.augment(np.zeros((30, 40, 3), np.uint8), None, np.random.default_rng(0), cfg)
    assert 40 <= max(sizes[0]) <= 60 and min(sizes[0]) >= 32  # an ordinary image is untouched by the cap
