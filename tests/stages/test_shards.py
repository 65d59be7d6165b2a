"""Image stages under launchers: torchrun / SLURM array shards (fmalib.stages.shards), the torchrun mask cache equal
to a one-process run byte for byte, and the refusal of incomplete upstream caches."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params, repo_root
from fmalib.data import open_dataset
from fmalib.method.masks import MaskSet
from fmalib.method.rle import MaskRuns
from fmalib.stages.cams import cam_cache
from fmalib.stages.masks import mask_cache, save_masks
from fmalib.stages.seeds import make_seeds
from fmalib.stages.shards import launcher_device, launcher_shard, resolve_shard
from fmalib.study.cli import main

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_ARRAY_TASK_ID",
                 "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """Tests start outside any launcher, whatever runs pytest."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def _digests(cache_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache_dir.glob("*.npz"))}


def test_torchrun_masks_equal_one_process_byte_for_byte(tmp_path, one_thread, capsys, monkeypatch):
    common = ["--fast", "--set", f"data.root={tmp_path / 'data'}", "--set", "data.synthetic.n_train=4",
              "--set", "data.synthetic.n_val=1"]
    assert main(["masks", *common, "--set", f"workdir={tmp_path / 'one'}"]) == 0  # one process, one thread
    one = sorted((tmp_path / "one" / "masks").iterdir())
    assert len(one) == 1 and len(_digests(one[0])) == 4
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fmalib", "masks", *common,
                          "--set", f"workdir={tmp_path / 'two'}"], cwd=repo_root(), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "shard 0/2: computing 2 of 2" in log and "shard 1/2: computing 2 of 2" in log  # each rank did its half
    two = sorted((tmp_path / "two" / "masks").iterdir())
    assert [d.name for d in two] == [d.name for d in one]  # the same cache key
    assert _digests(two[0]) == _digests(one[0])
    # an explicit --shard wins over the launcher's; without one the SLURM array task is the shard
    capsys.readouterr()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["masks", *common, "--set", f"workdir={tmp_path / 'one'}", "--shard", "1/2"]) == 0
    assert "shard 1/2 done; 4 images cached" in capsys.readouterr().out
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    for name, value in (("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "2")):
        monkeypatch.setenv(name, value)
    assert main(["masks", *common, "--set", f"workdir={tmp_path / 'one'}"]) == 0
    assert "shard 1/2 done" in capsys.readouterr().out
    # prompts and seeds chain stages in one process: several launcher processes are refused
    assert main(["seeds", *common, "--set", f"workdir={tmp_path / 'one'}"]) == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and "python -m fmalib masks" in err


def test_launcher_environment_to_shard():
    assert launcher_shard({}) is None and resolve_shard(None, {}) == (0, 1)
    assert launcher_shard({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == (3, 8)
    slurm = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert launcher_shard(slurm) == (2, 4)
    assert launcher_shard({**slurm, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}) == (2, 4)  # --array=5-8
    assert launcher_shard({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
                           "SLURM_ARRAY_TASK_STEP": "2"}) == (2, 3)  # --array=0-4:2
    # torchrun inside each array task: the task's share split again, (task * WORLD_SIZE + RANK, count * WORLD_SIZE)
    assert launcher_shard({**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (5, 8)
    # an explicit shard wins over any launcher
    assert resolve_shard((0, 1), {**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (0, 1)
    assert resolve_shard(None, slurm) == (2, 4)
    with pytest.raises(FmalibError, match="does not map to a shard"):
        launcher_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"})  # --array=1,3,9,11-style lists
    with pytest.raises(FmalibError, match="SLURM_ARRAY_TASK_COUNT"):
        launcher_shard({"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(FmalibError, match="RANK=2"):
        launcher_shard({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(FmalibError, match="not an integer"):
        launcher_shard({"RANK": "x", "WORLD_SIZE": "2"})
    # the device: cuda under torchrun is this process's GPU; cpu and explicit cuda:N stay
    assert launcher_device("cuda", {"LOCAL_RANK": "5"}) == "cuda:5"
    assert launcher_device("cuda", {}) == "cuda"
    assert launcher_device("cpu", {"LOCAL_RANK": "5"}) == "cpu"
    assert launcher_device("cuda:1", {"LOCAL_RANK": "5"}) == "cuda:1"


@pytest.fixture
def toy(tmp_path):
    params = load_params("params/toy.yaml", {
        "data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "work"), "data.synthetic.n_train": 4,
        "data.synthetic.n_val": 1, "sam.checkpoint": None, "sams.power_images": 4})
    return params, open_dataset(params, "train")


def _gt_masks(item, empty: bool = False) -> MaskSet:
    gt = item["gt"]
    regions = [] if empty else [gt == c for c in np.unique(gt) if c != 255]
    masks = np.stack(regions) if regions else np.zeros((0, *gt.shape), bool)
    return MaskSet.from_runs(MaskRuns.from_bool(masks), [2] * len(masks), [0.9] * len(masks), [1.0] * len(masks))


def _cams(item) -> tuple[np.ndarray, np.ndarray]:
    gt, labels = item["gt"], item["labels"]
    h, w = gt.shape
    return np.stack([(gt == c).astype(np.float32)[: h // 8 * 8, : w // 8 * 8].reshape(h // 8, 8, w // 8, 8)
                     .mean((1, 3)) for c in labels]), labels


def test_incomplete_upstream_caches_are_refused(toy):
    params, ds = toy
    masks = mask_cache(params, "train")
    save_masks(masks, ds.ids[2], _gt_masks(ds[2]))
    with pytest.raises(FmalibError) as err:
        make_seeds(params, "train", lambda i: _cams(ds[ds.ids.index(i)]), "fine")
    text = str(err.value)
    assert "SAM masks (train split) of 3 / 4 images are not cached" in text
    assert all(repr(ds.ids[j]) in text for j in (0, 1, 3)) and repr(ds.ids[2]) not in text
    assert "python -m fmalib masks --params params/toy.yaml --split train" in text
    for j in (0, 1, 3):
        save_masks(masks, ds.ids[j], _gt_masks(ds[j]))
    cams = cam_cache(params, "train", "hand")
    labels, cam = _cams(ds[0])[1], _cams(ds[0])[0]
    cams.save_npz(ds.ids[0], labels=labels, cam=cam.astype(np.float16), cam_caa=cam.astype(np.float16))
    with pytest.raises(FmalibError) as err:
        make_seeds(params, "train", cams, "fine")
    text = str(err.value)
    assert "hand CAMs (train split) of 3 / 4 images are not cached" in text and str(cams.dir) in text
    assert all(repr(ds.ids[j]) in text for j in (1, 2, 3)) and "run_cam_stage(params, 'train', 'hand')" in text


def test_seed_shards_share_meta_and_count_fallbacks(toy):
    """Two shards write the same meta.json as one process would, and the fallback count is their union."""
    params, ds = toy
    for name in ("a", "b"):
        p = load_params(dict(params), {"workdir": str(Path(params.workdir) / name)})
        masks = mask_cache(p, "train")
        for j in range(len(ds)):
            save_masks(masks, ds.ids[j], _gt_masks(ds[j], empty=j in (0, 1)))
    source = {i: _cams(ds[j]) for j, i in enumerate(ds.ids)}.__getitem__
    pa = load_params(dict(params), {"workdir": str(Path(params.workdir) / "a")})
    pb = load_params(dict(params), {"workdir": str(Path(params.workdir) / "b")})
    whole = make_seeds(pa, "train", source, "fine", shard=(0, 1))
    halves = [make_seeds(pb, "train", source, "fine", shard=s) for s in ((1, 2), (0, 2))]
    assert whole.dir.name == halves[0].dir.name == halves[1].dir.name
    assert (whole.dir / "meta.json").read_bytes() == (halves[0].dir / "meta.json").read_bytes()
    assert whole.fallback_images == halves[1].fallback_images == 2
    assert json.loads((halves[0].dir / "fallback-0of2.json").read_text()) == [ds.ids[0]]
    for j in range(len(ds)):
        assert whole.path(ds.ids[j]).read_bytes() == halves[0].path(ds.ids[j]).read_bytes()
