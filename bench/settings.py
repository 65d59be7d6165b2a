"""Which settings the toy can take from the paper: the method end to end under several override sets.

Each set is one ``fmalib.study.compare.settings_column`` (prompt training, CAMs, SAMS coarse and fine seeds; stage 2
with ``--stage2``), on the params' own data and models, stages cached by what changes their result. The
default sets are the toy's chosen settings, the paper's (``paper_settings``), and each of the paper's
settings alone on top of the toy's, so every departure's cost or gain is measured separately.
    python bench/settings.py [--params params/toy.yaml] [--fast] [--stage2] [--only NAME ...] [--extra KEY=YAML ...]
Writes reports/bench/settings.json (settings-fast.json with --fast): per set its overrides and numbers.
"""
from __future__ import annotations

import argparse
import time

import torch

import fmalib.study
from fmalib.core.params import load_params
from fmalib.study.cli import parse_overrides
from fmalib.study.compare import paper_params, settings_column
from fmalib.study.orderings import orderings
from fmalib.study.results import write_bench


def override_sets(params, extra: dict | None = None) -> dict[str, dict]:
    """{name: overrides}: the toy's own, the paper's (when they differ), each paper setting alone, and each
    ``extra`` setting alone (e.g. a departure the toy no longer takes, to show what it would give)."""
    paper = dict(params["paper_settings"])
    sets = {"toy": {}, **({"paper": paper} if paper else {})}
    for key, value in {**paper, **(extra or {})}.items():
        sets[f"toy + {key}={value}"] = {key: value}
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/toy.yaml")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--stage2", action="store_true", help="also train and evaluate stage 2 per set")
    ap.add_argument("--only", nargs="*", default=None, help="run only these set names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", action="append", default=[], metavar="KEY=YAML",
                    help="also run the toy with this one setting changed, e.g. prompts.seg.lr=1.0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = fmalib.study.setup(args.params, fast=args.fast)
    res: dict = {"params": args.params, "fast": args.fast, "threads": args.threads, "sets": {}}
    for name, overrides in override_sets(base, parse_overrides(args.extra, "--extra")).items():
        if args.only and name not in args.only:
            continue
        params = paper_params(base) if name == "paper" else load_params(base.to_dict(), overrides)
        t0 = time.perf_counter()
        column = settings_column(params, stage2=args.stage2)
        column.pop("fine_label_dir", None)  # a machine path
        res["sets"][name] = {"overrides": overrides, "seconds": time.perf_counter() - t0, **column,
                             "orderings": orderings(column)}
        print(f"{name:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in column.items()
                                           if isinstance(v, float) and ("miou" in k or "map" in k)), flush=True)
    write_bench("settings-fast" if args.fast else "settings", res)


if __name__ == "__main__":
    main()
