"""Did this run reproduce the committed study? Every headline number of ``results/`` against the reference.

The reference is the committed ``reports/<name>/results/`` (read from git's HEAD, so a run that has just
overwritten the files still compares with what the repository states); outside a git checkout, or for a
params set without committed results, there is nothing to compare and the verdict says so.

Tolerances, per kind of number (``TOLERANCES``): seed and CAM-argmax mIoU ±0.5 points and mAP ±0.01 cover
float-order differences between machines and thread counts (seeded runs on one machine give equal bytes);
stage 2's val mIoU ±3.5 points, because training a segmenter from scratch on the toy is not bit-stable across
machines — with identical pseudo-labels it moved by up to 3.1 points (78.6 → 80.5 on ground truth, 82.2 → 85.3
with CRF). Each ordering of the paper must come out the same way as in the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ..core.cache import atomic_write_text, strict_json
from ..core.params import repo_relative, repo_root
from .report import ABLATIONS, CLAIMS, HEADLINE, ordering_verdicts
from .results import lookup, read_results

# kind -> (tolerance on the recorded value, how the report shows it: scale, unit)
TOLERANCES = {"mIoU": (0.005, 100.0, " points"), "stage-2 mIoU": (0.035, 100.0, " points"), "mAP": (0.01, 1.0, "")}
MAPS = [("01_foundation_models", "clip_zero_shot_map"), ("03_cls_prompts", "hand_map"), ("03_cls_prompts", "cls_map"),
        ("03_cls_prompts", "hand_map_vs_bg"), ("03_cls_prompts", "cls_map_vs_bg")]


def compared_numbers() -> list[tuple[str, str, str]]:
    """(notebook, field, kind) of every number the verdict compares, in report order, each once."""
    pairs = [(g, k) for g, k, _ in HEADLINE] + [pair for _, *pairs in CLAIMS for pair in pairs] \
        + [(g, k) for *_, g, k in ABLATIONS] + MAPS
    out, seen = [], set()
    for g, k in pairs:
        if (g, k) in seen:
            continue
        seen.add((g, k))
        kind = "mAP" if "_map" in k else ("stage-2 mIoU" if g == "08_stage2" else "mIoU")
        out.append((g, k, kind))
    return out


def committed_results(out_dir: str | os.PathLike) -> dict[str, dict] | None:
    """{notebook: {field: value}} of ``out_dir/results`` as committed at git's HEAD; None when there is none."""
    rel = repo_relative(Path(out_dir) / "results")
    if os.path.isabs(rel):
        return None
    try:
        names = subprocess.run(["git", "ls-tree", "--name-only", "HEAD", rel + "/"], cwd=repo_root(),
                               capture_output=True, text=True, check=True).stdout.split()
        files = {Path(n).stem: subprocess.run(["git", "show", f"HEAD:{n}"], cwd=repo_root(), capture_output=True,
                                              text=True, check=True).stdout
                 for n in names if n.endswith(".json")}
    except (OSError, subprocess.CalledProcessError):
        return None
    return {nb: json.loads(text) for nb, text in files.items()} or None


def verdict(now: dict[str, dict], reference: dict[str, dict] | None) -> dict[str, Any]:
    """Per compared number: reference, now, |Δ|, tolerance, verdict (reproduced | differs | missing now |
    not in the reference); per ordering: both verdicts; and the counts."""
    rows = []
    for nb, field, kind in compared_numbers():
        tol, scale, unit = TOLERANCES[kind]
        ref = lookup(reference, nb, field) if reference else None
        cur = lookup(now, nb, field)
        if ref is None:
            status = "not in the reference"
        elif cur is None:
            status = "missing now"
        else:
            status = "reproduced" if abs(cur - ref) <= tol + 1e-12 else "differs"
        rows.append({"number": f"{nb}.{field}", "kind": kind, "reference": None if ref is None else ref * scale,
                     "now": None if cur is None else cur * scale,
                     "abs_diff": None if ref is None or cur is None else abs(cur - ref) * scale,
                     "tolerance": tol * scale, "unit": unit.strip(), "verdict": status})
    for claim, ref_holds, cur_holds in zip([c for c, *_ in CLAIMS], ordering_verdicts(reference or {}),
                                           ordering_verdicts(now)):
        status = "not in the reference" if ref_holds == "not run" else \
            "missing now" if cur_holds == "not run" else ("reproduced" if ref_holds == cur_holds else "differs")
        rows.append({"number": f"ordering: {claim}", "kind": "ordering", "reference": ref_holds, "now": cur_holds,
                     "abs_diff": None, "tolerance": None, "unit": "", "verdict": status})
    compared = [r for r in rows if r["verdict"] in ("reproduced", "differs", "missing now")]
    return {"rows": rows, "compared": len(compared),
            "reproduced": sum(r["verdict"] == "reproduced" for r in compared),
            "differs": [r for r in compared if r["verdict"] != "reproduced"],
            "tolerances": {k: {"tolerance": t * s, "unit": u.strip()} for k, (t, s, u) in TOLERANCES.items()}}


def _show(value: Any) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def summary_line(result: dict) -> str:
    """One line: how many numbers reproduced, and each one that did not."""
    if not result["compared"]:
        return "no committed reference to compare with (reports/<name>/results/ is not in git's HEAD)"
    line = f"reproduced {result['reproduced']} of {result['compared']} numbers within tolerance"
    diffs = result["differs"]
    if diffs:
        line += f"; {len(diffs)} {'differs' if len(diffs) == 1 else 'differ'}: " + "; ".join(
            f"{r['number']} {_show(r['reference'])} → {_show(r['now'])}"
            + (f" (|Δ| {r['abs_diff']:.2f} > {r['tolerance']:g})" if r["abs_diff"] is not None else "")
            for r in diffs)
    return line


def write_verdict(out_dir: str | os.PathLike, reference: dict[str, dict] | None = None,
                  notebook_seconds: dict[str, float] | None = None) -> tuple[dict, str]:
    """Compare ``out_dir``'s results with ``reference`` (default: the committed ones); writes
    reproduction.json (with ``notebook_seconds``, the next run's ETA) and reproduction.md there. Returns
    (result, summary line)."""
    out = Path(out_dir)
    ref = committed_results(out) if reference is None else reference
    result = verdict(read_results(out), ref)
    line = summary_line(result)
    atomic_write_text(out / "reproduction.json", strict_json({"summary": line, **result,
                                                                   "notebook_seconds": notebook_seconds or {}}, indent=1))
    lines = ["# Reproduction verdict", "", line, "",
             "Reference: the committed `results/` of this folder. Tolerances: "
             + "; ".join(f"{k} ±{v['tolerance']:g}{(' ' + v['unit']) if v['unit'] else ''}"
                         for k, v in result["tolerances"].items())
             + "; orderings must come out the same way. Why these: `fmalib/study/verdict.py`.", "",
             "| number | reference | now | abs. difference | tolerance | verdict |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['number']} | {_show(r['reference'])} | {_show(r['now'])} | {_show(r['abs_diff'])} | "
                     f"{'' if r['tolerance'] is None else '±%g' % r['tolerance']} | {r['verdict']} |")
    atomic_write_text(out / "reproduction.md", "\n".join(lines) + "\n")
    return result, line
