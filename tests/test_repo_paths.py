"""Every repository path named in fmalib's source (comments and docstrings included), bench/, docs/ and the README
exists: a moved or renamed file leaves no pointer behind."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a path that starts at a top-level folder of this repository, not inside another path or a URL
PATH = re.compile(r"(?<![\w./-])((?:fmalib|tests|bench|params|notebooks|docs|tools|assets|reports)/[\w./*<>{}-]*[\w*>}])")
NOT_HERE = {  # named on purpose, absent from a checkout
    "tools/convert-torchvision-to-d2.py": "Detectron2's own script, which fmalib's converter mirrors",
    "reports/bench/gpu.json": "written by bench/gpu.py on a GPU machine",
    "reports/bench/gpu-dry-run.json": "written by bench/gpu.py --dry-run (tests)",
    "reports/bench/prompts-fast.json": "written by bench/prompts.py --fast",
    "reports/voc-tiny": "the folder the README's smoke-run command writes",
}


def named_paths() -> dict[str, list[str]]:
    sources = [*REPO.glob("fmalib/**/*.py"), *REPO.glob("bench/*"), *REPO.glob("docs/*.md"), REPO / "README.md"]
    out: dict[str, list[str]] = {}
    for src in sources:
        for n, line in enumerate(src.read_text().splitlines(), 1):
            for path in PATH.findall(line):
                out.setdefault(path.rstrip("."), []).append(f"{src.relative_to(REPO)}:{n}")
    return out


def test_every_named_repo_path_exists():
    named = named_paths()
    assert len(named) > 50  # the scan finds the references it is meant to check
    missing = {p: where for p, where in named.items()
               if p not in NOT_HERE and not (REPO / p).exists() and not any(c in p for c in "*<>{}")}
    assert not missing, "\n".join(f"{p} (named at {', '.join(w[:3])})" for p, w in sorted(missing.items()))
