"""Cache keys hold the code that computes a stage: an edit to a function a stage uses recomputes it (and what is
downstream of it), an edit elsewhere — or to a comment — reuses it. The stages run in a copy of fmalib, in a
subprocess each (the edited module must be imported afresh)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fmalib
from fmalib.core.code_key import code_closure, code_digest, code_manifest, source_digest

REPO = Path(fmalib.__file__).resolve().parents[1]

DRIVER = """
import hashlib, json, sys
import fmalib
from fmalib.study import setup
from fmalib.stages.masks import run_mask_stage
from fmalib.stages.cams import run_cam_stage
from fmalib.stages.seeds import make_seeds

params = setup(sys.argv[1], fast=True, overrides=json.loads(sys.argv[2]))
masks = run_mask_stage(params, "train", (0, 1))
cams = run_cam_stage(params, "train", "hand", (0, 1))
seeds = make_seeds(params, "train", cams, "fine", shard=(0, 1))
pngs = sorted(seeds.dir.glob("*.png"))
print(json.dumps({"fmalib": fmalib.__file__, "masks": masks.key, "cams": cams.key, "seeds": seeds.dir.name,
                  "p": seeds.bg_power, "n_png": len(pngs),
                  "png": hashlib.sha256(b"".join(p.read_bytes() for p in pngs)).hexdigest()}))
"""

OVERRIDES = {"data.root": "data/t", "workdir": "work/t", "data.synthetic.n_train": 4, "data.synthetic.n_val": 1,
             "sams.power_images": 4, "sams.bg_power.fine": "auto", "sams.power_grid": [0.3, 0.5, 1.0, 3.0]}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: the test's edit target moved"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(REPO / "fmalib", root / "fmalib", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "assets").symlink_to(REPO / "assets")
    (root / "driver.py").write_text(DRIVER)
    return root


def _run(tree: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, str(tree / "driver.py"), str(REPO / "params/toy.yaml"),
                           json.dumps(OVERRIDES)], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["fmalib"]).resolve().is_relative_to(tree.resolve())  # the copy ran, not the checkout
    return out, proc.stderr


def test_an_edit_recomputes_exactly_the_stages_that_use_it(tree):
    first, _ = _run(tree)
    assert first["n_png"] == 4

    # the experiment of the issue: SAMS's GT-free power choice always takes the largest power
    _edit(tree / "fmalib/method/sams.py", 'return float(table["bg_power"].iloc[tied[(len(tied) - 1) // 2]]), table',
          "return float(max(powers)), table")
    edited, log = _run(tree)
    assert (edited["masks"], edited["cams"]) == (first["masks"], first["cams"])  # upstream reused
    assert edited["seeds"] != first["seeds"] and edited["p"] == 3.0 != first["p"]
    assert edited["png"] != first["png"]
    assert "code changed: fmalib/method/sams.py" in log
    assert "SAM masks of train shard 0/1: reused 4 cached" in log and "CAMs hand/train shard 0/1: reused" in log

    # a module no stage here imports, and a comment and a docstring in one they do: everything reused
    _edit(tree / "fmalib/segment/train.py", "def quiet_detectron2_logs() -> None:",
          "def _added() -> int:\n    return 1\n\n\ndef quiet_detectron2_logs() -> None:")
    _edit(tree / "fmalib/method/sams.py", "def choose_bg_power(", "# a new comment\ndef choose_bg_power(")
    _edit(tree / "fmalib/method/generator.py", '"""All filtered masks of an (H, W, 3) uint8 RGB image."""',
          '"""All filtered masks of an (H, W, 3) uint8 RGB image (reworded)."""')
    again, log = _run(tree)
    assert again == edited
    assert "computing" not in log

    # upstream: the mask generator keeps one mask per image -> masks and the seeds on them recompute
    _edit(tree / "fmalib/method/generator.py",
          'return raw.select(overlap_filter(raw.rles(), raw.levels, self.overlap_thresh))',
          "return raw.select([0])")
    upstream, log = _run(tree)
    assert upstream["masks"] != edited["masks"] and upstream["cams"] == edited["cams"]
    assert upstream["seeds"] != edited["seeds"] and upstream["png"] != edited["png"]
    assert "code changed: fmalib/method/generator.py" in log


def test_closures_follow_the_imports():
    masks, cams, seeds = (code_closure(f"fmalib.stages.{m}") for m in ("masks", "cams", "seeds"))
    assert "fmalib.method.generator" in masks and "fmalib.method.generator" not in cams
    assert "fmalib.method.sams" in seeds and "fmalib.method.sams" not in masks + cams
    assert "fmalib.method.caa" in cams and {"fmalib", "fmalib.method", "fmalib.core.cache"} <= set(cams)
    # the CAM stage reads trained contexts (prompt_runs), not the loop that trains them: a training edit
    # reaches CAMs through the context file's content only
    assert "fmalib.stages.prompt_runs" in cams and "fmalib.stages.prompts" not in cams + seeds
    assert "fmalib.method.objectives" not in cams
    assert not any(m.startswith(("fmalib.segment", "fmalib.study", "fmalib.pretrain")) for m in masks + cams + seeds)
    # one digest per module: a manifest names what changed
    assert set(code_manifest("fmalib.stages.cams")) == set(cams)
    assert code_digest("fmalib.stages.cams") != code_digest("fmalib.stages.masks")
    with pytest.raises(KeyError, match="fmalib.nope"):
        code_closure("fmalib.nope")


def test_source_digest_ignores_comments_and_docstrings_only(tmp_path):
    base = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    variants = {"comment": 'def f(x):\n    """Doc."""\n    return x + 1  # two\n',
                "docstring": 'def f(x):\n    """Other doc."""\n\n    return x + 1\n',
                "code": 'def f(x):\n    """Doc."""\n    return x + 2\n',
                "string": 'def f(x):\n    """Doc."""\n    "kept: not the first statement"\n    return x + 1\n'}
    digests = {}
    for name, text in {"base": base, **variants}.items():
        (tmp_path / f"{name}.py").write_text(text)
        digests[name] = source_digest(tmp_path / f"{name}.py")
    assert digests["comment"] == digests["docstring"] == digests["base"]
    assert digests["code"] != digests["base"] and digests["string"] != digests["base"]


def test_no_hand_set_version_in_any_key():
    """The package version string is not read anywhere in fmalib (keys hold the code instead)."""
    users = [p for p in (REPO / "fmalib").rglob("*.py") if "__version__" in p.read_text() and p.name != "__init__.py"]
    assert users == []
