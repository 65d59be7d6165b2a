"""reports/<name>/report.html: the executed notebooks without code, led by the headline table.

Its own module: nbformat, nbconvert and BeautifulSoup load in seconds, and only the report command needs them,
not the notebooks that show the tables (``fmalib.study.report``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
from bs4 import BeautifulSoup
from nbconvert import HTMLExporter

from ..core.cache import atomic_write_text
from ..core.errors import FmalibError
from .report import headline_table, ordering_check, settings_table, styled

log = logging.getLogger(__name__)


def with_alt_text(html: str) -> str:
    """Each figure's alt text names the section it illustrates (the nearest heading above it), instead of
    nbconvert's "No description has been provided"."""
    soup = BeautifulSoup(html, features="html.parser")
    heading = "the study"
    for elem in soup.find_all(["h1", "h2", "h3", "img"]):
        if elem.name == "img":
            elem["alt"] = f"Figure of the section: {heading}"
        else:
            heading = elem.get_text(" ", strip=True).rstrip("¶").strip()
    return str(soup)


def build_report(out_dir: str | os.PathLike) -> Path:
    """Concatenate the executed notebooks (inputs hidden) under the headline table into report.html."""

    out = Path(out_dir)
    executed = sorted(out.glob("[0-9][0-9]_*.ipynb"))
    if not executed:
        raise FmalibError(f"no executed notebooks in {out}; run `make reproduce` first")
    merged = nbformat.v4.new_notebook()
    merged.cells.append(nbformat.v4.new_markdown_cell(
        f"# FMA-WSSS study report: `{out.name}`\n\n## Headline\n\n"
        + styled(headline_table(out), 1, "headline", na_rep="—").to_html()
        + "\n\n## Does the paper's ordering hold here?\n\n"
        + styled(ordering_check(out), 3, "orderings").to_html()
        + "\n\n## The same orderings under the toy's settings and the paper's (notebook 07)\n\n"
        + styled(settings_table(out), 3, "settings").to_html()))
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        merged.cells.append(nbformat.v4.new_markdown_cell("---"))  # each notebook's own title follows
        for cell in nb.cells:
            if {"parameters", "injected-parameters"} & set(cell.get("metadata", {}).get("tags", [])):
                continue
            if cell.cell_type == "code":  # progress bars and logs are for the terminal, not the reader
                cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
            merged.cells.append(cell)
    for i, cell in enumerate(merged.cells):
        cell.id = f"cell-{i}"  # nbformat draws random ids for new cells: fixed ones keep the report's bytes
    body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                           exclude_output_prompt=True).from_notebook_node(merged)
    body = with_alt_text(body)
    target = out / "report.html"
    atomic_write_text(target, body)
    log.info("wrote %s (%d notebooks)", target, len(executed))
    return target
