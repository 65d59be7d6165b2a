"""Every repository path named in fmalib's source (comments and docstrings included), bench/, tests/, params/,
the notebooks, docs/ and the README exists: a moved or renamed file leaves no pointer behind; and nothing points
outside the repository (a clone from a code host has only what is committed)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a path that starts at a top-level folder of this repository, not inside another path or a URL
PATH = re.compile(r"(?<![\w./-])((?:fmalib|tests|bench|params|notebooks|docs|tools|assets|reports)/[\w./*<>{}-]*[\w*>}])")
NOT_HERE = {  # named on purpose, absent from a checkout
    "tools/convert-torchvision-to-d2.py": "Detectron2's own script, which fmalib's converter mirrors",
    "reports/bench/gpu-dry-run.json": "written by bench/gpu.py --dry-run (tests)",
    "reports/bench/prompts-fast.json": "written by bench/prompts.py --fast",
    "reports/voc-tiny": "the folder the README's smoke-run command writes",
    "assets/nope.pt": "a missing checkpoint a test names on purpose",
    "assets/nope.pth": "a missing checkpoint a test names on purpose",
}


def named_paths() -> dict[str, list[str]]:
    sources = [*REPO.glob("fmalib/**/*.py"), *REPO.glob("bench/*"), *REPO.glob("tests/**/*.py"),
               *REPO.glob("params/**/*.yaml"), *REPO.glob("notebooks/*.ipynb"), *REPO.glob("docs/*.md"),
               REPO / "README.md", REPO / "Makefile"]
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


def test_nothing_points_outside_the_repository():
    sources = [*REPO.glob("fmalib/**/*.py"), *REPO.glob("bench/*"), *REPO.glob("params/**/*.yaml"),
               *REPO.glob("notebooks/*.ipynb"), *REPO.glob("docs/*.md"), REPO / "README.md"]
    outside = re.compile(r"\.\./shared|METHOD\.md|\bMETHOD §|DESIGN\.md")
    hits = [f"{src.relative_to(REPO)}:{n}" for src in sources
            for n, line in enumerate(src.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, hits
