"""Run the numbered notebooks headless with papermill, reusing only what this checkout computed itself.

A notebook's key hashes: the params it runs with, its own source, fmalib's code (every module's syntax tree:
``fmalib.core.code_key.package_digest``), and the key of the notebook before it (its upstream outputs). The
stamps that say "this executed copy came from this key" live in the params' workdir (``<workdir>/reproduce``),
never in ``reports/``: the committed reports are the reference a run is compared with
(``fmalib.study.verdict``), not a cache — a fresh clone recomputes every notebook. Executed copies land in
``reports/<params name>/`` by rename, so a failure leaves earlier results intact and names the notebook and
cell that failed. They hold no timestamps, random cell ids or stderr (progress bars and logs go to the run's
log): rerunning with equal results rewrites equal bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import papermill

from ..core.cache import atomic_write_text, stable_hash
from ..core.code_key import package_digest
from ..core.errors import FmalibError
from ..core.params import default_report_dir, fast_overlay, load_params, repo_relative, repo_root

log = logging.getLogger(__name__)


def notebook_paths(notebooks_dir: str | os.PathLike | None = None) -> list[Path]:
    """notebooks/NN_*.ipynb in numeric order."""
    root = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    return sorted(p for p in root.glob("[0-9][0-9]_*.ipynb"))


def _notebook_source(path: Path) -> list:
    """Cell sources only: executing or stripping outputs must not change the key."""
    nb = json.loads(path.read_text())
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


def clean_executed(path: Path) -> str:
    """Make an executed copy deterministic and quiet, in place: repo-relative paths (log lines and reprs print
    absolute cache paths), no papermill or kernel timestamps, a fixed id for the injected parameters cell, no
    stderr streams. Returns the stderr text removed (for the run's log)."""
    root = str(repo_root().resolve())
    text = path.read_text().replace(root + "/", "").replace(root, ".")
    nb = json.loads(re.sub(r"/tmp/ipykernel_\d+/\d+\.py", "<notebook cell>", text))  # warnings' cell files
    for meta in [nb["metadata"]] + [c["metadata"] for c in nb["cells"]]:
        meta.pop("execution", None)
        for k in ("duration", "start_time", "end_time"):
            meta.get("papermill", {}).pop(k, None)
    removed = []
    for cell in nb["cells"]:
        if "injected-parameters" in cell["metadata"].get("tags", []):
            cell["id"] = "injected-parameters"
        if cell["cell_type"] != "code":
            continue
        removed += ["".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream" and o["name"] == "stderr"]
        cell["outputs"] = [o for o in cell["outputs"] if not (o["output_type"] == "stream" and o["name"] == "stderr")]
    atomic_write_text(path, json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return "".join(removed)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamps_dir(params_file: Path, out: Path, parameters: Mapping[str, Any] | None = None) -> Path:
    """Where this checkout records which executed copies it computed: ``<workdir>/reproduce/<out folder>``,
    the workdir of the params the notebooks run with (fast overlay and overrides applied)."""
    parameters = parameters or {}
    overlays = fast_overlay(load_params(params_file)) if parameters.get("fast") else []
    params = load_params(params_file, dict(parameters.get("overrides") or {}), overlays=overlays)
    return Path(params.resolve_path("workdir")) / "reproduce" / out.name


def _reference_seconds(out: Path) -> dict[str, float]:
    """Per notebook, the seconds of the run that made the reports in ``out`` (their reproduction.json)."""
    try:
        return dict(json.loads((out / "reproduction.json").read_text()).get("notebook_seconds", {}))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[None]:
    """Send everything written to stderr — this process's logging, warnings and progress bars, and the
    notebook kernels' own (they inherit the descriptor) — to ``log_path`` for the duration."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "w") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_notebooks(params_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  parameters: Mapping[str, Any] | None = None, notebooks: list[Path] | None = None,
                  force: bool = False, on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Execute the notebooks in order; returns one record per notebook (notebook, status ran | reused,
    seconds: this run's or, when reused, the run's that computed it; eta_s: the seconds the remaining
    notebooks took last time). ``on_done(record)`` is called as each one finishes."""

    params_path = Path(params_path)
    params_file = params_path if params_path.is_file() else repo_root() / params_path
    if not params_file.is_file():
        raise FmalibError(f"params file {params_path} does not exist")
    out = Path(out_dir) if out_dir else default_report_dir(load_params(params_file))
    out.mkdir(parents=True, exist_ok=True)
    stamps = stamps_dir(params_file, out, parameters)
    # papermill runs in the repo root: paths inside it are passed relative, so no output names this machine
    nb_params = {"params_path": repo_relative(params_file), "out_dir": repo_relative(out), **(parameters or {})}
    upstream = stable_hash({"params": params_file.read_text(), "nb_params": nb_params, "code": package_digest()})
    paths = notebooks if notebooks is not None else notebook_paths()
    last = _reference_seconds(out)
    plan = []  # (notebook, key, reused): every key is known before anything runs, so the ETA skips reused ones
    for nb in paths:
        key = stable_hash({"upstream": upstream, "source": _notebook_source(nb)})
        upstream = key
        stamp, target = stamps / f"{nb.stem}.json", out / nb.name
        mine = json.loads(stamp.read_text()) if stamp.is_file() else {}
        if mine:  # this checkout's own last timing of a notebook beats the reference's
            last[nb.name] = mine["seconds"]
        reuse = not force and mine.get("key") == key and target.is_file() and mine.get("sha256") == _sha256(target)
        plan.append((nb, key, mine if reuse else None))
    records = []
    for i, (nb, key, mine) in enumerate(plan):
        target, stamp = out / nb.name, stamps / f"{nb.stem}.json"
        if mine is not None:
            log.info("%s unchanged since this checkout ran it: keeping %s", nb.name, target)
            rec = {"notebook": nb.name, "status": "reused", "seconds": float(mine["seconds"])}
        else:
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
            stderr = clean_executed(partial)
            if stderr:
                print(f"--- {nb.name}: its cells' stderr ---\n{stderr}", file=sys.stderr, flush=True)
            os.replace(partial, target)
            seconds = round(time.perf_counter() - t0, 1)
            atomic_write_text(stamp, json.dumps({"key": key, "seconds": seconds, "sha256": _sha256(target)}))
            rec = {"notebook": nb.name, "status": "ran", "seconds": seconds}
        rec["eta_s"] = round(sum(last.get(p.name, 0.0) for p, _, reused in plan[i + 1:] if reused is None), 1)
        records.append(rec)
        if on_done:
            on_done(rec)
    return records
