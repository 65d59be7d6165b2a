"""Run the numbered notebooks headless with papermill, skipping those whose inputs are unchanged.

A notebook's key hashes: the params it runs with, its own source, fmalib's code (every module's syntax tree:
``fmalib.core.code_key.package_digest``), and the key of the notebook before it (its upstream outputs). Executed copies land in
``reports/<params name>/`` by rename, so a failure leaves earlier results intact and names the notebook
and cell that failed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import papermill

from ..core.cache import atomic_write_text, stable_hash
from ..core.code_key import package_digest
from ..core.errors import FmalibError
from ..core.params import default_report_dir, load_params, repo_relative, repo_root

log = logging.getLogger(__name__)


def notebook_paths(notebooks_dir: str | os.PathLike | None = None) -> list[Path]:
    """notebooks/NN_*.ipynb in numeric order."""
    root = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    return sorted(p for p in root.glob("[0-9][0-9]_*.ipynb"))


def _notebook_source(path: Path) -> list:
    """Cell sources only: executing or stripping outputs must not change the key."""
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def _drop_repo_prefix(path: Path) -> None:
    """Make the executed copy's paths repo-relative (log lines and reprs print absolute cache paths)."""
    root = str(repo_root().resolve())
    text = path.read_text().replace(root + "/", "").replace(root, ".")
    atomic_write_text(path, re.sub(r"/tmp/ipykernel_\d+/\d+\.py", "<notebook cell>", text))  # warnings' cell files


def run_notebooks(params_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  parameters: Mapping[str, Any] | None = None, notebooks: list[Path] | None = None,
                  force: bool = False) -> list[dict]:
    """Execute the notebooks in order; returns one record per notebook (name, status, seconds)."""

    params_path = Path(params_path)
    params_file = params_path if params_path.is_file() else repo_root() / params_path
    if not params_file.is_file():
        raise FmalibError(f"params file {params_path} does not exist")
    out = Path(out_dir) if out_dir else default_report_dir(load_params(params_file))
    out.mkdir(parents=True, exist_ok=True)
    # papermill runs in the repo root: paths inside it are passed relative, so no output names this machine
    nb_params = {"params_path": repo_relative(params_file), "out_dir": repo_relative(out), **(parameters or {})}
    upstream = stable_hash({"params": params_file.read_text(), "nb_params": nb_params, "code": package_digest()})
    records = []
    for nb in notebooks if notebooks is not None else notebook_paths():
        key = stable_hash({"upstream": upstream, "source": _notebook_source(nb)})
        target, stamp = out / nb.name, out / ".stamps" / f"{nb.stem}.key"
        upstream = key
        if not force and target.is_file() and stamp.is_file() and stamp.read_text() == key:
            log.info("%s unchanged: keeping %s", nb.name, target)
            records.append({"notebook": nb.name, "status": "cached", "seconds": 0.0})
            continue
        partial = out / f".{nb.stem}.partial.ipynb"
        t0 = time.perf_counter()
        log.info("running %s -> %s", nb.name, target)
        try:
            papermill.execute_notebook(str(nb), str(partial), parameters=nb_params, cwd=str(repo_root()),
                                       progress_bar=False, log_output=False, kernel_name="python3")
        except papermill.PapermillExecutionError as exc:
            raise FmalibError(
                f"notebook {nb.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                f"{exc.ename}: {exc.evalue}. Partial output: {partial}; earlier results in {out} are intact."
            ) from None
        _drop_repo_prefix(partial)
        os.replace(partial, target)
        atomic_write_text(stamp, key)
        records.append({"notebook": nb.name, "status": "ran", "seconds": round(time.perf_counter() - t0, 2)})
    return records
