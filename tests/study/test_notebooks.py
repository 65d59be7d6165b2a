"""Every numbered notebook executes, in order, with papermill in fast mode on a tiny slice."""
import pytest

from fmalib.core.params import repo_root
from fmalib.study.reproduce import notebook_paths, run_notebooks
from fmalib.study.results import read_results


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


def test_source_notebooks_are_stored_without_outputs():
    """What git stores (the index: a clean clone's HEAD, or what the next commit takes), not the working copy a
    JupyterLab session may have filled."""
    import json
    import subprocess

    for nb in notebook_paths():
        stored = subprocess.run(["git", "show", f":notebooks/{nb.name}"], capture_output=True, text=True, check=True,
                                cwd=nb.parent)
        cells = json.loads(stored.stdout)["cells"]
        dirty = [i for i, c in enumerate(cells) if c.get("outputs") or c.get("execution_count")]
        assert not dirty, f"{nb.name}: cells {dirty} hold outputs; run `make strip` (executed copies go to reports/)"


def test_output_stripping_is_scoped_to_the_source_notebooks():
    import subprocess

    def attr(path):
        out = subprocess.run(["git", "check-attr", "filter", path], capture_output=True, text=True, check=True,
                             cwd=repo_root())
        return out.stdout.strip().rsplit(": ", 1)[-1]

    assert attr("notebooks/00_data.ipynb") == "nbstripout"
    assert attr("reports/toy/00_data.ipynb") == "unspecified"
