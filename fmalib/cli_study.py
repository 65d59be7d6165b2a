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
    if getattr(args, "out", None):
        return Path(args.out)
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


def _params(args):
    return study.setup(args.params, fast=args.fast, overrides=args.overrides, device=args.device)


def foundation(args) -> None:
    """Pretrain the tiny CLIP and SAM into assets/ and refresh assets/SHA256SUMS."""
    from .pretrain.clip import pretrain_clip
    from .pretrain.sam import pretrain_sam

    params = _params(args)
    pretrain_clip(params)
    pretrain_sam(params)
    print(write_asset_manifest(repo_root() / "assets"))


def write_asset_manifest(assets_dir: Path) -> Path:
    """assets/SHA256SUMS in `sha256sum -c` format, so users can check the shipped weights."""
    import hashlib

    from .cache import atomic_write_text

    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(assets_dir.glob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    return atomic_write_text(assets_dir / "SHA256SUMS", "\n".join(lines) + "\n")


def masks(args) -> None:
    from .masks import run_mask_stage

    params = _params(args)
    run_mask_stage(params, args.split or params.data.train_split, shard=args.shard, force=args.force)


def prompts(args) -> None:
    """Train cls prompts, then seg prompts on the coarse seeds (single process; the seeds stage runs between)."""
    from .train import train_prompts

    params = _params(args)
    train_prompts(params, "cls")
    train_prompts(params, "seg", seeds_dir=seeds_stage(params, "coarse").dir)


def seeds_stage(params, stage: str):
    from .seeds import pipeline_seeds

    return pipeline_seeds(params, stage)


def seeds(args) -> None:
    """Coarse and fine SAMS seeds of the train split (masks, CAMs and seeds cached and resumed)."""
    params = _params(args)
    for stage in ("coarse", "fine"):
        print(f"{stage} seeds: {seeds_stage(params, stage).dir}")
