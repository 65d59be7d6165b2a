"""reports/<name>/report.html: the executed notebooks without code, led by the headline table."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from .cache import atomic_write_text
from .errors import FmalibError
from .results import read_results

log = logging.getLogger(__name__)

# (results group, key, row label): what the study's headline table shows, in pipeline order.
HEADLINE = [
    ("04_coarse_seeds", "cam_seed_miou", "CAM-argmax seeds (cls prompts + CAA), train"),
    ("04_coarse_seeds", "coarse_seed_miou", "Coarse seeds (SAMS on cls CAMs), train"),
    ("06_fine_seeds", "fine_seed_miou", "Fine seeds (SAMS on seg CAMs), train"),
    ("08_stage2", "seeds_val_miou", "Stage 2 trained on fine seeds, val"),
    ("08_stage2", "gt_val_miou", "Stage 2 trained on ground truth (upper bound), val"),
]


def headline_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """mIoU (%) per headline row; NaN where that notebook has not recorded it yet."""
    results = read_results(out_dir)
    rows = [{"result": label, "mIoU (%)": 100 * float(results.get(g, {}).get(k, float("nan")))}
            for g, k, label in HEADLINE]
    table = pd.DataFrame(rows)
    s2 = results.get("08_stage2", {})
    if "seeds_val_miou" in s2 and "gt_val_miou" in s2 and s2["gt_val_miou"] > 0:
        ratio = pd.DataFrame([{"result": "Stage 2 seeds / ground truth (ratio, %)",
                               "mIoU (%)": 100 * s2["seeds_val_miou"] / s2["gt_val_miou"]}])
        table = pd.concat([table, ratio], ignore_index=True)
    return table


def build_report(out_dir: str | os.PathLike) -> Path:
    """Concatenate the executed notebooks (inputs hidden) under the headline table into report.html."""
    import nbformat
    from nbconvert import HTMLExporter

    out = Path(out_dir)
    executed = sorted(out.glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FmalibError(f"no executed notebooks in {out}; run `make reproduce` first")
    table = headline_table(out)
    merged = nbformat.v4.new_notebook()
    merged.cells.append(nbformat.v4.new_markdown_cell(
        f"# FMA-WSSS study report: `{out.name}`\n\n## Headline\n\n" + table.to_html(index=False, float_format="%.1f", na_rep="not run")))
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        merged.cells.append(nbformat.v4.new_markdown_cell(f"---\n\n# {path.stem}"))
        merged.cells.extend(c for c in nb.cells if "parameters" not in c.get("metadata", {}).get("tags", [])
                            and "injected-parameters" not in c.get("metadata", {}).get("tags", []))
    body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                           exclude_output_prompt=True).from_notebook_node(merged)
    target = out / "report.html"
    atomic_write_text(target, body)
    log.info("wrote %s (%d notebooks)", target, len(executed))
    return target
