"""CLI stages that drive the whole study (data, reproduce, report)."""
from __future__ import annotations

from pathlib import Path

from . import study
from .params import repo_root


def data(args) -> None:
    from .data import open_dataset

    params = study.setup(args.params, fast=args.fast, overrides=args.overrides, device=args.device)
    for split in (params.data.train_split, params.data.val_split):
        print(f"{split}: {len(open_dataset(params, split))} images")


def _out_dir(args) -> Path:
    return repo_root() / "reports" / Path(args.params).stem


def reproduce(args) -> None:
    from .report import build_report
    from .reproduce import run_notebooks

    out = _out_dir(args)
    parameters = {"fast": bool(args.fast), "overrides": args.overrides}
    if args.device:
        parameters["device"] = args.device
    for rec in run_notebooks(args.params, out, parameters=parameters, force=args.force):
        print(f"{rec['notebook']:32s} {rec['status']:7s} {rec['seconds']:8.1f} s")
    print(f"report: {build_report(out)}")


def report(args) -> None:
    from .report import build_report

    print(build_report(_out_dir(args)))
