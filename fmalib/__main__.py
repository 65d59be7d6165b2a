"""Command line: `python -m fmalib <stage> --params params/toy.yaml` (the same functions notebooks call)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import FmalibError

# stage -> (module, function taking the parsed args); modules are imported only when their stage runs.
STAGES = {
    "reproduce": ("fmalib.cli_study", "reproduce"),
    "report": ("fmalib.cli_study", "report"),
    "data": ("fmalib.cli_study", "data"),
    "foundation": ("fmalib.cli_study", "foundation"),
    "masks": ("fmalib.cli_study", "masks"),
    "prompts": ("fmalib.cli_study", "prompts"),
    "seeds": ("fmalib.cli_study", "seeds"),
}
# Stage 2 has its own options (`python -m fmalib stage2 --help`); its argv is passed through as is.


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 0/8") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmalib", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES) + ["stage2"])
    parser.add_argument("--params", default="params/toy.yaml", help="params YAML")
    parser.add_argument("--fast", action="store_true", help="apply the params file's fast: overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, value parsed as YAML (repeatable)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="i/n: this process's share of images")
    parser.add_argument("--split", default=None, help="dataset split (default: the stage's own)")
    parser.add_argument("--force", action="store_true", help="rerun even if cached")
    parser.add_argument("--out", default=None, help="reproduce / report: executed notebooks' folder "
                                                    "(default: reports/<params file stem>)")
    return parser


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise FmalibError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["stage2"]:
        from .segment.cli import main as stage2_main

        return stage2_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    module, func = STAGES[args.stage]
    try:
        args.overrides = parse_overrides(args.set)
        getattr(importlib.import_module(module), func)(args)
    except FmalibError as exc:
        print(f"fmalib {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
