"""Stage 2 from the command line (clusters): train on a label set, then evaluate on val.

    python -m fmalib.segment --params params/voc.yaml --labels work/voc/fine_seeds --tag seeds --num-gpus 8
    python -m fmalib.segment --params params/voc.yaml --tag gt          # ground truth: the upper bound
    python -m fmalib.segment --params params/voc.yaml --tag seeds --labels DIR --eval-only --crf

Prints one JSON line with the run directory, training summary and val mIoU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ..errors import FmalibError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmalib stage2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params/toy.yaml")
    p.add_argument("--fast", action="store_true", help="apply the params file's fast: overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (YAML value)")
    p.add_argument("--device", default=None)
    p.add_argument("--labels", default=None, help="pseudo-label folder (<id>.png per train image); "
                                                  "omit to train on the ground truth")
    p.add_argument("--tag", default=None, help="run name under workdir/stage2 (default: seeds / gt)")
    p.add_argument("--out", default=None, help="run directory (default: workdir/stage2/<tag>-<hash>)")
    p.add_argument("--split", default=None, help="evaluation split (default: data.val_split)")
    p.add_argument("--num-gpus", type=int, default=None, help="overrides stage2.num_gpus")
    p.add_argument("--no-resume", action="store_true", help="start training over")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--single-scale", action="store_true", help="evaluate without stage2.test's scales and flip")
    p.add_argument("--crf", action="store_true", help="dense CRF post-processing (whatever stage2.test.crf says)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .. import study
    from ..__main__ import parse_overrides
    from .evaluate import evaluate_segmenter
    from .train import run_dir, train_segmenter

    args = build_parser().parse_args(argv)
    try:
        params = study.setup(args.params, fast=args.fast, overrides=parse_overrides(args.set), device=args.device)
        tag = args.tag or ("seeds" if args.labels else "gt")
        out = args.out or run_dir(params, tag, args.labels)
        report = {"run": str(out)}
        if not args.eval_only:
            report["train"] = train_segmenter(params, args.labels, out, resume=not args.no_resume,
                                              num_gpus=args.num_gpus)
        if not args.no_eval:
            single = args.single_scale
            res = evaluate_segmenter(params, out, args.split, crf=True if args.crf else None,
                                     scales=[1.0] if single else None, flip=False if single else None)
            keys = ("split", "n_images", "miou", "d2_miou", "crf_applied", "scales", "flip")
            report["eval"] = {k: res[k] for k in keys}
    except FmalibError as exc:
        print(f"fmalib stage2: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("stage 2 done: %s", out)
    print(json.dumps(report, default=str))
    return 0
