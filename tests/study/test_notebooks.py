"""The numbered notebooks as git stores them (their fast run end to end: test_reproduce_real_params.py)."""
from fmalib.core.params import repo_root
from fmalib.study.reproduce import notebook_paths


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
