"""Command line: ``python -m fmalib <stage> --params params/toy.yaml`` — the same functions the notebooks call.

Each subcommand has its own options (``python -m fmalib masks --help``); every option it lists is honoured.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import yaml

from ..core.errors import FmalibError

# Each subcommand imports its own stack (torch, detectron2, papermill) when it runs: `--help` stays instant.


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    from ..stages.shards import check_shard

    try:
        return check_shard(tuple(int(x) for x in text.split("/")))
    except (ValueError, FmalibError):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/8") from None


def parse_overrides(items: list[str], flag: str = "--set") -> dict:
    """``--set key=value`` items (or another ``flag``'s) -> {dotted key: YAML-parsed value}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise FmalibError(f"{flag} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _params(args):
    from . import setup

    return setup(args.params, fast=args.fast, overrides=args.overrides, device=args.device)


def _out_dir(args) -> Path:
    from ..core.params import default_report_dir, load_params

    return Path(args.out) if args.out else default_report_dir(load_params(args.params))


# --- the subcommands ------------------------------------------------------------------------------------------
def data(args) -> None:
    """Open (and, for the synthetic benchmark, generate) both splits, check every image and label file, print
    their sizes and notes; every bad file of both splits is listed in one error."""
    from ..data import open_dataset
    from ..data.check import check_split, problems_error

    params = _params(args)
    problems = []
    for split in (params.data.train_split, params.data.val_split):
        ds = open_dataset(params, split, strict=False)
        found = check_split(ds, progress=True)
        errors, notes = sum(p.error for p in found), [p for p in found if not p.error]
        print(f"{split}: {len(ds)} images, " + (f"{errors} problem(s)" if errors else "all files usable")
              + (f", {len(notes)} note(s)" if notes else ""))
        for note in notes[:10]:
            print(f"  note: {note}")
        if len(notes) > 10:
            print(f"  ... and {len(notes) - 10} more notes")
        problems += found
    error = problems_error(problems, f"data of {params.path or 'params'} (splits {params.data.train_split}, "
                                     f"{params.data.val_split})")
    if error is not None:
        raise error


def reproduce(args) -> None:
    """Run the study: every notebook this checkout has not run itself, the report, and a verdict against the
    committed results.

    Notebooks are keyed by params, code and notebook source; the console shows one line per notebook (ran or
    reused, seconds, time left) and the verdict; the full log goes to reports/<name>/reproduce.log."""
    from ..core.params import repo_relative
    from .report_html import build_report
    from .reproduce import notebook_paths, output_to_log, run_notebooks
    from .verdict import write_verdict

    out = _out_dir(args)
    parameters = {"fast": bool(args.fast), "overrides": args.overrides}
    if args.device:
        parameters["device"] = args.device
    log_path = out / "reproduce.log"
    n = len(notebook_paths())
    print(f"fmalib reproduce: {n} notebooks -> {repo_relative(out)} (full log: {repo_relative(log_path)})",
          flush=True)
    done = []

    def show(rec: dict) -> None:
        done.append(rec)
        how = "ran" if rec["status"] == "ran" else "reused (this checkout's earlier run)"
        left = f"   about {rec['eta_s'] / 60:.0f} min left" if rec["eta_s"] >= 60 else ""
        print(f"[{len(done):2d}/{n}] {rec['notebook']:28s} {how:38s} {rec['seconds']:7.1f} s{left}", flush=True)

    with output_to_log(log_path):
        records = run_notebooks(args.params, out, parameters=parameters, force=args.force, on_done=show)
        report_path = build_report(out)
        _, line = write_verdict(out, notebook_seconds={r["notebook"]: r["seconds"] for r in records})
    print(f"report: {repo_relative(report_path)}; verdict: {repo_relative(out / 'reproduction.md')}")
    print(line)


def report(args) -> None:
    """Rebuild the HTML report from the executed notebooks' recorded results."""
    from .report_html import build_report

    print(build_report(_out_dir(args)))


def foundation(args) -> None:
    """Pretrain the tiny CLIP and SAM into assets/ and refresh assets/SHA256SUMS."""
    from ..core.params import repo_root
    from ..pretrain.clip import pretrain_clip
    from ..pretrain.sam import pretrain_sam

    params = _params(args)
    pretrain_clip(params)
    pretrain_sam(params)
    print(write_asset_manifest(repo_root() / "assets"))


def write_asset_manifest(assets_dir: Path) -> Path:
    """assets/SHA256SUMS in `sha256sum -c` format, so users can check the shipped weights."""
    from ..core.cache import atomic_write_text

    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
             for p in sorted(assets_dir.glob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    return atomic_write_text(assets_dir / "SHA256SUMS", "\n".join(lines) + "\n")


def masks(args) -> None:
    """Multi-level SAM masks of a split (default: the train split), this process's shard (--shard, else
    torchrun's RANK / WORLD_SIZE or the SLURM array task, else every image)."""
    from ..stages.masks import run_mask_stage
    from ..stages.shards import resolve_shard

    params = _params(args)
    shard = resolve_shard(args.shard)
    cache = run_mask_stage(params, args.split or params.data.train_split, shard=shard, force=args.force)
    print(f"masks: shard {shard[0]}/{shard[1]} done; {len(cache.done_ids())} images cached in {cache.dir}")


def _one_process(command: str) -> None:
    """``prompts`` and ``seeds`` chain stages that each need the previous one complete: they run in one
    process, so several launcher processes would only repeat the work."""
    from ..stages.shards import launcher_shard

    shard = launcher_shard()
    if shard is not None and shard[1] > 1:
        raise FmalibError(f"`{command}` runs in one process (each of its stages needs the previous one complete), "
                          f"but the launcher started {shard[1]} (torchrun WORLD_SIZE / SLURM array task count); "
                          f"shard the mask stage with `python -m fmalib masks` under the launcher, then run "
                          f"`python -m fmalib {command}` once")


def prompts(args) -> None:
    """Train cls prompts, then seg prompts on the coarse seeds (single process; the seeds stage runs between)."""
    from ..stages import pipeline
    from ..stages.prompts import train_prompts

    _one_process("prompts")
    params = _params(args)
    train_prompts(params, "cls", force=args.force)
    train_prompts(params, "seg", seeds_dir=pipeline.seeds(params, "coarse").seeds.dir, force=args.force)


def seeds(args) -> None:
    """Coarse and fine SAMS seeds of the train split (masks, CAMs and seeds cached and resumed; one process)."""
    from ..stages import pipeline

    _one_process("seeds")
    params = _params(args)
    for kind in ("coarse", "fine"):
        print(f"{kind} seeds: {pipeline.seeds(params, kind, force=args.force).seeds.dir}")


def sams(args) -> None:
    """Refine another method's CAMs (CLIP-ES .npy dicts or .npz files, one per image) with SAMS: palette-PNG
    pseudo-labels and summary.json in --out (masks computed or reused; one process)."""
    from ..stages.cam_files import refine_cam_files

    _one_process("sams")
    params = _params(args)
    summary = refine_cam_files(params, args.cams, args.cam_format, args.out, split=args.split,
                               bg_power=args.bg_power, key=args.cam_key)
    print(json.dumps(summary, default=str))


def stage2(args) -> None:
    """Train a Detectron2 segmenter on a label set (default: the ground truth), then evaluate it on val."""
    from ..segment.evaluate import evaluate_segmenter
    from ..segment.train import run_dir, train_segmenter

    params = _params(args)
    tag = args.tag or ("seeds" if args.labels else "gt")
    out = args.out or run_dir(params, tag, args.labels)
    result = {"run": str(out)}
    if not args.eval_only:
        result["train"] = train_segmenter(params, args.labels, out, resume=not args.no_resume,
                                          num_gpus=args.num_gpus)
    if not args.no_eval:
        single = args.single_scale
        res = evaluate_segmenter(params, out, args.split, crf=True if args.crf else None,
                                 scales=[1.0] if single else None, flip=False if single else None)
        keys = ("split", "n_images", "miou", "d2_miou", "crf_applied", "scales", "flip")
        result["eval"] = {k: res[k] for k in keys}
    logging.getLogger(__name__).info("stage 2 done: %s", out)
    print(json.dumps(result, default=str))


def predict(args) -> None:
    """Segment new images with a trained stage-2 run: one VOC-palette PNG per image at its own size, optional
    overlay JPEGs, predictions.json (class pixel shares per image); a rerun skips images already done."""
    from ..segment.predict import predict_images

    params = _params(args)
    record = predict_images(params, args.run, args.images, args.out, overlay=args.overlay, scales=args.scales,
                            flip=args.flip, crf=args.crf, device=args.device, force=args.force)
    print(f"{len(record['images'])} label maps in {args.out} (scales {record['test']['scales']}, flip "
          f"{record['test']['flip']}, CRF {record['test']['crf']})")


# --- the parser -----------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params/toy.yaml", help="params YAML (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="apply the params file's fast: overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, value parsed as YAML (repeatable)")
    p.add_argument("--device", default=None, help="overrides params device (cpu, cuda, cuda:N)")


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="executed notebooks' folder (default: reports/<params name>)")


def _stage2_options(p: argparse.ArgumentParser) -> None:
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


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a stage-2 run directory (config.yaml + model_final.pth), e.g. "
                                                "workdir/stage2/seeds-<hash>")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="folder for <stem>.png, overlay/<stem>.jpg, predictions.json")
    p.add_argument("--overlay", action="store_true", help="also write overlay JPEGs (image + predicted classes)")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="test scales (default: stage2.test.scales)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="average with the mirrored image (default: stage2.test.flip)")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None,
                   help="dense CRF on the probabilities (default: stage2.test.crf; needs pydensecrf2)")
    p.add_argument("--force", action="store_true", help="redo images already predicted in --out")


def _masks_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default=None, help="dataset split (default: data.train_split)")
    p.add_argument("--shard", type=parse_shard, default=None,
                   help="i/n: this process's share of images (default: from torchrun's RANK / WORLD_SIZE or the "
                        "SLURM array task, else 0/1)")
    p.add_argument("--force", action="store_true", help="recompute images already cached")


def parse_bg_power(text: str) -> float | str:
    """'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--bg-power {text!r}: expected auto or a number > 0, e.g. 0.6")
    return value


def _sams_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cams", required=True, help="folder of CAM files, one <image id>.npy / .npz per image")
    p.add_argument("--cam-format", required=True, choices=("clip-es", "npz"),
                   help="clip-es: CLIP-ES's np.save'd dicts (keys 0-based, attn_highres); npz: labels (K,) "
                        "1-based class ids + cams (K, h, w) (fmalib/stages/cam_files.py)")
    p.add_argument("--cam-key", default="attn_highres", choices=("attn_highres", "highres"),
                   help="clip-es: which maps of the dict (default: %(default)s)")
    p.add_argument("--split", default=None, help="dataset split (default: data.train_split)")
    p.add_argument("--bg-power", type=parse_bg_power, default="auto",
                   help="SAMS background power p: auto (chosen without ground truth) or a number (default: auto)")
    p.add_argument("--out", required=True, help="folder for the <image id>.png pseudo-labels and summary.json")


def _force_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="recompute what this command computes even where it is cached (SAM masks: `masks --force`)")


def _reproduce_options(p: argparse.ArgumentParser) -> None:
    _out(p)
    p.add_argument("--force", action="store_true", help="rerun notebooks this checkout has already run")


# name -> (function, extra options)
COMMANDS = {
    "data": (data, None), "foundation": (foundation, None), "masks": (masks, _masks_options),
    "prompts": (prompts, _force_options), "seeds": (seeds, _force_options), "sams": (sams, _sams_options),
    "stage2": (stage2, _stage2_options), "predict": (predict, _predict_options),
    "reproduce": (reproduce, _reproduce_options), "report": (report, _out),
}


def summary(doc: str) -> str:
    """A docstring's first paragraph as one line (argparse re-wraps it)."""
    return " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmalib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (func, options) in COMMANDS.items():
        p = sub.add_parser(name, help=summary(func.__doc__), description=func.__doc__)
        _common(p)
        if options:
            options(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        args.overrides = parse_overrides(args.set)
        args.func(args)
    except FmalibError as exc:
        print(f"fmalib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ..core.cache import StageCache

        cache = StageCache.last
        files = [p for p in cache.dir.iterdir() if not p.name.startswith(".") and p.name != "key.json"] \
            if cache is not None and cache.dir.is_dir() else []
        kept = f"; {len(files)} finished file(s) kept in {cache.dir}" if cache is not None else ""
        print(f"fmalib {args.command}: interrupted{kept}; every finished item is kept — rerun the same command "
              f"to resume", file=sys.stderr)
        return 130
    return 0
