"""Every numbered notebook executes, in order, with papermill in fast mode on a tiny slice."""
import pytest

from fmalib.reproduce import notebook_paths, run_notebooks
from fmalib.results import read_results


def test_every_notebook_runs_fast(tmp_path):
    notebooks = notebook_paths()
    if not notebooks:
        pytest.fail("no notebooks/NN_*.ipynb found")
    overrides = {"workdir": str(tmp_path / "work"), "data.root": str(tmp_path / "data")}
    out = tmp_path / "reports"
    records = run_notebooks("params/toy.yaml", out, notebooks=notebooks,
                            parameters={"fast": True, "overrides": overrides})
    assert [r["status"] for r in records] == ["ran"] * len(notebooks)
    assert all((out / nb.name).is_file() for nb in notebooks)
    assert read_results(out), "no notebook recorded any result"
