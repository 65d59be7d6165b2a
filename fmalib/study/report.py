"""reports/<name>/report.html: the executed notebooks without code, led by the headline table."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
import pandas as pd
from nbconvert import HTMLExporter

from ..core.cache import atomic_write_text
from ..core.errors import FmalibError
from .compare import orderings
from .results import check_field, lookup, read_results

log = logging.getLogger(__name__)

# (results group, key, row label): what the study's headline table shows, in pipeline order.
HEADLINE = [
    ("04_coarse_seeds", "cam_argmax_miou", "CAM-argmax seeds (cls prompts, GT-tuned bg threshold), train"),
    ("04_coarse_seeds", "coarse_seed_miou", "Coarse seeds (SAMS on cls CAMs), train"),
    ("06_fine_seeds", "fine_seed_miou", "Fine seeds (SAMS on seg CAMs), train"),
    ("08_stage2", "seeds_val_miou", "Stage 2 trained on fine seeds, val"),
    ("08_stage2", "gt_val_miou", "Stage 2 trained on ground truth (upper bound), val"),
]


def headline_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """mIoU (%) per headline row; NaN where that notebook has not recorded it yet."""
    results = read_results(out_dir)
    rows = [{"result": label, "mIoU (%)": 100 * float(lookup(results, g, k, float("nan")))}
            for g, k, label in HEADLINE]
    table = pd.DataFrame(rows)
    seeds, gt = lookup(results, "08_stage2", "seeds_val_miou"), lookup(results, "08_stage2", "gt_val_miou")
    if seeds is not None and gt is not None and gt > 0:
        ratio = pd.DataFrame([{"result": "Stage 2 seeds / ground truth (ratio, %)", "mIoU (%)": 100 * seeds / gt}])
        table = pd.concat([table, ratio], ignore_index=True)
    return table


def build_report(out_dir: str | os.PathLike) -> Path:
    """Concatenate the executed notebooks (inputs hidden) under the headline table into report.html."""

    out = Path(out_dir)
    executed = sorted(out.glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FmalibError(f"no executed notebooks in {out}; run `make reproduce` first")
    table = headline_table(out)
    merged = nbformat.v4.new_notebook()
    merged.cells.append(nbformat.v4.new_markdown_cell(
        f"# FMA-WSSS study report: `{out.name}`\n\n## Headline\n\n"
        + table.to_html(index=False, float_format="%.1f", na_rep="not run")
        + "\n\n## Does the paper's ordering hold here?\n\n"
        + ordering_check(out).to_html(index=False, float_format="%.3f", na_rep="–")
        + "\n\n## The same orderings under the toy's settings and the paper's (notebook 07)\n\n"
        + settings_table(out).to_html(index=False, float_format="%.3f", na_rep="–")))
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        merged.cells.append(nbformat.v4.new_markdown_cell(f"---\n\n# {path.stem}"))
        for cell in nb.cells:
            if {"parameters", "injected-parameters"} & set(cell.get("metadata", {}).get("tags", [])):
                continue
            if cell.cell_type == "code":  # progress bars and logs are for the terminal, not the reader
                cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
            merged.cells.append(cell)
    body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                           exclude_output_prompt=True).from_notebook_node(merged)
    target = out / "report.html"
    atomic_write_text(target, body)
    log.info("wrote %s (%d notebooks)", target, len(executed))
    return target


# (claim, (group, key) that should be larger, (group, key) it is compared with): the paper's ordering.
CLAIMS = [
    ("learned cls prompts classify better than hand prompts (mAP vs the bg prompts, val)",
     ("03_cls_prompts", "cls_map_vs_bg"), ("03_cls_prompts", "hand_map_vs_bg")),
    ("learned cls prompts beat hand prompts (CAM-argmax seeds, val)", ("03_cls_prompts", "cls_seed_miou"),
     ("03_cls_prompts", "hand_seed_miou")),
    ("CAA refinement helps (cls CAM-argmax seeds, val)", ("03_cls_prompts", "cls_caa_seed_miou"),
     ("03_cls_prompts", "cls_seed_miou")),
    ("seg prompts beat cls prompts (CAM-argmax seeds + CAA, val)", ("05_seg_prompts", "seg_caa_seed_miou"),
     ("05_seg_prompts", "cls_caa_seed_miou")),
    ("SAMS beats the CAM argmax (coarse seeds, train)", ("04_coarse_seeds", "coarse_seed_miou"),
     ("04_coarse_seeds", "cam_argmax_miou")),
    ("seg prompts sharpen the seeds (fine > coarse, train)", ("06_fine_seeds", "fine_seed_miou"),
     ("04_coarse_seeds", "coarse_seed_miou")),
    ("ground truth bounds stage 2 (upper bound > seeds, val)", ("08_stage2", "gt_val_miou"),
     ("08_stage2", "seeds_val_miou")),
]

# (setting, results group, key): the ablation table of notebook 07, gathered from the stage notebooks.
ABLATIONS = [
    ("CLIP-ES hand prompts, CAM argmax (val)", "03_cls_prompts", "hand_seed_miou"),
    ("hand prompts + CAA, CAM argmax (val)", "03_cls_prompts", "hand_caa_seed_miou"),
    ("cls prompts, CAM argmax, no CAA (val)", "03_cls_prompts", "cls_seed_miou"),
    ("cls prompts + CAA, CAM argmax (val)", "03_cls_prompts", "cls_caa_seed_miou"),
    ("seg prompts + CAA, CAM argmax (val)", "05_seg_prompts", "seg_caa_seed_miou"),
    ("cls CAMs, CAM argmax (train)", "04_coarse_seeds", "cam_argmax_miou"),
    ("cls CAMs + SAMS = coarse seeds (train)", "04_coarse_seeds", "coarse_seed_miou"),
    ("coarse seeds, bg power tuned on GT (train)", "04_coarse_seeds", "gt_best_miou"),
    ("seg CAMs + SAMS = fine seeds (train)", "06_fine_seeds", "fine_seed_miou"),
    ("fine seeds, bg power tuned on GT (train)", "06_fine_seeds", "gt_best_miou"),
    ("fine seeds, SAM whole masks only (train)", "07_ablations", "levels_whole_miou"),
    ("fine seeds, whole + part (train)", "07_ablations", "levels_whole_part_miou"),
    ("cls prompts, bg prompts as the loss's negatives (ablation), CAM argmax, no CAA (val)", "07_ablations",
     "bg_negatives_cls_seed_miou"),
    ("cls prompts, bg prompts as the loss's negatives (ablation), + CAA (val)", "07_ablations",
     "bg_negatives_cls_caa_seed_miou"),
]


for _g, _k in [(g, k) for g, k, _ in HEADLINE] + [(g, k) for _, g, k in ABLATIONS] \
        + [pair for _, *pairs in CLAIMS for pair in pairs]:
    check_field(_g, _k)  # a misspelt name fails on import, not as a silent "not run"


def ablation_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Seed mIoU (%) per ablation setting, from the results the notebooks recorded; NaN = not run."""
    results = read_results(out_dir)
    return pd.DataFrame([{"setting": name, "mIoU (%)": 100 * float(lookup(results, g, k, float("nan")))}
                         for name, g, k in ABLATIONS])


def settings_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The paper's orderings under the toy's settings and under the paper's (notebook 07's two columns):
    per ordering and column, its two numbers and whether it holds; empty when notebook 07 has not run."""

    columns = lookup(read_results(out_dir), "07_ablations", "settings", {})
    parts = []
    for name, column in columns.items():
        rows = pd.DataFrame(orderings(column)).set_index("ordering")
        rows["holds"] = rows["holds"].map({True: "holds", False: "does NOT hold", None: "not run"})
        parts.append(rows.rename(columns=lambda c: f"{name}: {c}"))
    return pd.concat(parts, axis=1).reset_index() if parts else pd.DataFrame()


def ordering_check(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Does each ordering the paper claims hold in this run? 'not run' where a number is missing."""
    results = read_results(out_dir)
    rows = []
    for claim, (g1, k1), (g2, k2) in CLAIMS:
        a, b = lookup(results, g1, k1), lookup(results, g2, k2)
        verdict = "not run" if a is None or b is None else ("holds" if a > b else "does NOT hold")
        rows.append({"claim": claim, "larger": a, "smaller": b, "verdict": verdict})
    return pd.DataFrame(rows)
