"""The study command end to end, every notebook, in fast mode: on the toy (params/toy.yaml) and on the real
params — `python -m fmalib reproduce --params params/coco.yaml` on a tiny COCO-layout folder, and
`params/voc.yaml` on a tiny folder of photos with tags (fmalib.data.layouts), its train split without masks and
its val split with VOC-id masks — with the params' own fast: block swapping in the tiny CLIP and SAM and few
iterations, so a change that breaks the paper's params, or the study without train masks, fails here. (The VOC
layout itself reaches the seeds in tests/stages/test_tags_seeds.py, byte for byte equal to the tags.)

The three studies run at once as `python -m fmalib reproduce` processes, one thread each: each leaves a core
idle much of the time (kernel start-up and imports, I/O), so together they take little more than one alone.
"""
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmalib.core.params import repo_root
from fmalib.data.layouts import TAGS_SPLITS, write_coco_layout, write_tags_layout
from fmalib.study.reproduce import notebook_paths
from fmalib.study.results import read_results

# params file -> (folder writer, the keys that read it)
WRITERS = {"voc": (functools.partial(write_tags_layout, stand_ins=True),
                   {"data.kind": "tags", "data.tags": TAGS_SPLITS, "data.train_split": "train"}),
           "coco": (write_coco_layout, {})}
KINDS = ("toy", *WRITERS)  # the toy generates its own data
DATA_KIND = {"voc": "tags", "coco": "coco"}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real_params")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running = {}
    for kind in KINDS:
        root = WRITERS[kind][0](tmp / kind / "data", n_train=4, n_val=2) if kind in WRITERS else tmp / kind / "data"
        out = tmp / kind / "reports"
        cmd = [sys.executable, "-m", "fmalib", "reproduce", "--params", f"params/{kind}.yaml", "--fast",
               "--set", f"data.root={root}", "--set", f"workdir={tmp / kind / 'work'}", "--out", str(out)]
        for key, value in WRITERS.get(kind, (None, {}))[1].items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        log = tmp / kind / "log.txt"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            running[kind] = (subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=fh, stderr=subprocess.STDOUT),
                             out, log, time.perf_counter())
    done = {}
    for kind, (proc, out, log, t0) in running.items():
        rc = proc.wait(timeout=1200)
        done[kind] = {"rc": rc, "out": out, "log": log.read_text(), "seconds": time.perf_counter() - t0}
    return done


def test_every_notebook_runs_fast_on_the_toy(studies):
    run = studies["toy"]
    assert run["rc"] == 0, f"python -m fmalib reproduce --params params/toy.yaml --fast failed:\n{run['log'][-4000:]}"
    names = [nb.name for nb in notebook_paths()]
    assert names, "no notebooks/NN_*.ipynb found"
    assert re.findall(r"^\[\s*\d+/\d+\] (\S+)\s+ran\b", run["log"], re.M) == names
    assert all((run["out"] / n).is_file() for n in names)
    results = read_results(run["out"])
    assert set(results) == {Path(n).stem for n in names} - {"09_report"}, "a notebook recorded no result"
    assert results["01_foundation_models"]["clip_zero_shot_map"] > 0  # the generator-based checks ran


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_reproduce_runs_the_real_params_end_to_end(studies, kind):
    run = studies[kind]
    assert run["rc"] == 0, f"python -m fmalib reproduce --params params/{kind}.yaml failed:\n{run['log'][-4000:]}"
    out = run["out"]
    names = [nb.name for nb in notebook_paths()]
    assert all((out / n).is_file() for n in names) and (out / "report.html").is_file()
    # the console: one line per notebook, then the verdict (no reference is committed for these layouts)
    assert re.findall(r"^\[\s*\d+/\d+\] (\S+)\s+ran\b", run["log"], re.M) == names
    assert run["log"].rstrip().splitlines()[-1].startswith("no committed reference to compare with")
    assert "Kernel is running over TCP" not in run["log"] and "Kernel is running over TCP" in \
        (out / "reproduce.log").read_text()  # the kernels' own warnings go to the log, not the console
    results = read_results(out)
    foundation = results["01_foundation_models"]
    assert foundation["clip_model"] == "fmalib-tiny-clip" and foundation["zero_shot_images"] == 2
    assert "clip_zero_shot_map" not in foundation  # the generator-based checks are for generated data only
    assert results["00_data"]["kind"] == DATA_KIND[kind]
    assert results["00_data"]["classes"] == {"voc": 20, "coco": 80}[kind]
    assert results["06_fine_seeds"]["n_labels"] == 4
    assert 0.0 <= results["08_stage2"]["seeds_val_miou"] <= 1.0
    nb01 = json.loads((out / "01_foundation_models.ipynb").read_text())
    text = json.dumps(nb01["cells"])
    assert "generator-based quality checks skipped" in text and "initialized randomly" not in text


def test_tags_without_train_masks_report_gt_free_diagnostics(studies):
    """Photos + tags.csv for train (no masks), val with masks: every notebook runs; train numbers are GT-free
    (no seed mIoU exists), val ones are mIoU as usual."""
    results = read_results(studies["voc"]["out"])
    for nb in ("04_coarse_seeds", "06_fine_seeds"):
        assert not {k for k in results[nb] if k.endswith("miou")}, f"{nb} recorded an mIoU without train masks"
        assert 0.0 < results[nb]["seed_fg_pixel_share"] < 1.0 and 0.0 <= results[nb]["seed_empty_image_share"] <= 1.0
    assert "seg_seeds_miou" not in results["05_seg_prompts"] and "region_recall_iou50" not in results["02_sam_masks"]
    assert 0.0 <= results["03_cls_prompts"]["cls_seed_miou"] <= 1.0  # CAM argmax on val, tuned on val's masks
    assert 0.0 <= results["08_stage2"]["seeds_val_miou"] <= 1.0 and "gt_val_miou" not in results["08_stage2"]
    assert "levels_whole_miou" not in results["07_ablations"]
