"""The toy study from photos and tags only -> reports/bench/tags_study.json

The toy's train split is written out as JPEGs with a ``train.csv`` of tags (no masks), its val split as JPEGs
with tags and masks (``fmalib.data.layouts.export_tags``); then the whole study runs on it (``python -m fmalib
reproduce``, cold, its own workdir): the seeds come from the tags alone, the train numbers are the GT-free
diagnostics, the val numbers are mIoU as in the toy study. Its numbers are printed beside the committed toy
study's (reports/toy/results), which read the same images losslessly (PNG) with their masks.

    python bench/tags_study.py [--params params/toy.yaml] [--root data/toy-tags] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

import yaml

from fmalib.core.params import load_params, repo_root
from fmalib.data.layouts import export_tags
from fmalib.study.results import read_results, write_bench

NUMBERS = [("03_cls_prompts", "hand_map"), ("03_cls_prompts", "cls_map"), ("03_cls_prompts", "cls_seed_miou"),
           ("03_cls_prompts", "cls_caa_seed_miou"), ("04_coarse_seeds", "bg_power"),
           ("04_coarse_seeds", "coarse_seed_miou"), ("04_coarse_seeds", "seed_fg_pixel_share"),
           ("04_coarse_seeds", "seed_empty_image_share"), ("05_seg_prompts", "seg_caa_seed_miou"),
           ("06_fine_seeds", "bg_power"), ("06_fine_seeds", "fine_seed_miou"),
           ("06_fine_seeds", "seed_fg_pixel_share"), ("06_fine_seeds", "seed_empty_image_share"),
           ("08_stage2", "seeds_val_miou"), ("08_stage2", "gt_val_miou")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--root", default="data/toy-tags", help="where the photos + tags folder is written")
    ap.add_argument("--keep", action="store_true", help="keep the workdir and the executed notebooks")
    args = ap.parse_args()
    root = repo_root()
    source = load_params(args.params)
    data_root = root / args.root
    shutil.rmtree(data_root, ignore_errors=True)
    t0 = time.perf_counter()
    splits = export_tags(source, data_root, masks_for=(source["data"]["val_split"],))
    export_s = time.perf_counter() - t0
    name = f"{source['name']}-tags"
    work, out = root / "work" / name, root / "work" / f"{name}-reports"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    params_file = root / "work" / f"{name}.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump({
        "_BASE_": str((root / args.params).resolve()), "name": name, "workdir": str(work), "fast": None,
        "data": {"kind": "tags", "root": str(data_root), "tags": splits}}, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fmalib", "reproduce", "--params", str(params_file), "--out",
                           str(out)], cwd=root, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    if proc.returncode:
        raise SystemExit(f"the study on {data_root} failed (rc {proc.returncode})")
    tags, toy = read_results(out), read_results(root / "reports" / source["name"])
    numbers = {f"{nb}.{key}": {"tags": tags.get(nb, {}).get(key), "toy (masks)": toy.get(nb, {}).get(key)}
               for nb, key in NUMBERS}
    write_bench("tags_study", {"params": args.params, "export_s": round(export_s, 1), "study_s": round(seconds, 1),
                               "splits": splits, "console": [line for line in proc.stdout.splitlines()
                                                             if line.startswith("[")],
                               "numbers": numbers})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        params_file.unlink()


if __name__ == "__main__":
    main()
