"""make reproduce's engine: skip unchanged notebooks, name the failing notebook and cell, keep earlier results."""
import json

import nbformat
import numpy as np
import pytest

from fmalib.core.errors import FmalibError
from fmalib.core.params import repo_root
from fmalib.study.report import headline_table
from fmalib.study.report_html import build_report
from fmalib.study.reproduce import notebook_paths, run_notebooks, stamps_dir


def _write_nb(path, *sources):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('params_path = ""\nout_dir = ""\nfast = False\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture()
def study(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _write_nb(nbs / "00_a.ipynb", "from fmalib.study.results import record\n"
              "record(out_dir, '04_coarse_seeds', coarse_seed_miou=0.5)\nprint('made A')\n"
              "import sys; print('a progress log', file=sys.stderr)")
    _write_nb(nbs / "01_b.ipynb", "x = 1", "assert fast is False, 'fast mode reached the notebook'")
    params = tmp_path / "p.yaml"
    params.write_text(f"_BASE_: {repo_root() / 'params' / 'toy.yaml'}\nname: p\nfast: null\nworkdir: {tmp_path / 'work'}\n")
    return nbs, params, tmp_path / "out"


def test_runs_then_skips_then_names_failing_cell(study):
    nbs, params, out = study
    paths = sorted(nbs.glob("*.ipynb"))
    recs = run_notebooks(params, out, notebooks=paths)
    assert [r["status"] for r in recs] == ["ran", "ran"]
    first = {p.name: p.read_bytes() for p in out.glob("*.ipynb")}
    recs = run_notebooks(params, out, notebooks=paths)
    assert [r["status"] for r in recs] == ["reused", "reused"]
    assert [r["seconds"] for r in recs] == [r["seconds"] for r in run_notebooks(params, out, notebooks=paths)]
    # rerunning with equal results rewrites equal bytes (no timestamps, no random cell ids)
    assert [r["status"] for r in run_notebooks(params, out, notebooks=paths, force=True)] == ["ran", "ran"]
    assert {p.name: p.read_bytes() for p in out.glob("*.ipynb")} == first
    good_b = (out / "01_b.ipynb").read_bytes()
    with pytest.raises(FmalibError, match=r"01_b\.ipynb failed in cell 3.*AssertionError"):
        run_notebooks(params, out, parameters={"fast": True}, notebooks=paths)
    assert (out / "01_b.ipynb").read_bytes() == good_b  # the earlier good copy of the failed one is intact
    assert "made A" in (out / "00_a.ipynb").read_text()


def test_committed_reports_are_a_reference_not_a_cache(study, tmp_path):
    """Executed copies this checkout did not compute (a fresh clone's committed reports, or copies edited
    since) are recomputed; the ETA counts only the notebooks that will run."""
    nbs, params, out = study
    paths = sorted(nbs.glob("*.ipynb"))
    run_notebooks(params, out, notebooks=paths)
    clone_out = tmp_path / "clone_out"  # the same reports, as a fresh clone has them: no stamps of its own
    clone_out.mkdir()
    for p in out.glob("*.ipynb"):
        (clone_out / p.name).write_bytes(p.read_bytes())
    recs = run_notebooks(params, clone_out, notebooks=paths)
    assert [r["status"] for r in recs] == ["ran", "ran"]
    (clone_out / "01_b.ipynb").write_text((clone_out / "01_b.ipynb").read_text().replace("x = 1", "x = 2"))
    last_b = json.loads((stamps_dir(params, clone_out) / "01_b.json").read_text())["seconds"]
    recs = run_notebooks(params, clone_out, notebooks=paths)
    assert [r["status"] for r in recs] == ["reused", "ran"]
    assert "x = 1" in (clone_out / "01_b.ipynb").read_text()
    assert recs[0]["eta_s"] == last_b > 0 and recs[1]["eta_s"] == 0


def test_report_has_headline_and_outputs_without_code(study):
    nbs, params, out = study
    run_notebooks(params, out, notebooks=sorted(nbs.glob("*.ipynb")))
    table = headline_table(out)
    row = table[table["result"].str.startswith("Coarse seeds")]
    assert row["value"].iloc[0] == pytest.approx(50.0) and row["unit"].iloc[0] == "mIoU (%)"
    html = build_report(out).read_text()
    assert build_report(out).read_text() == html  # no random ids: an equal rebuild is equal bytes
    assert "No description has been provided" not in html and 'alt="Figure of the section' not in html  # no images
    assert html.count(">01_b<") == 0 and "not run" in html  # no file-name headings; missing numbers say so
    assert "made A" in html and "Headline" in html
    assert "record(out_dir" not in html  # code cells are hidden
    executed = nbformat.read(out / "00_a.ipynb", as_version=4)  # stderr goes to the run's log, not the copy
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
    assert "a progress log" not in html


def test_ordering_and_ablation_tables_read_recorded_results(tmp_path):
    from fmalib.study.report import ablation_table, ordering_check
    from fmalib.study.results import record

    record(tmp_path, "04_coarse_seeds", coarse_seed_miou=0.6, cam_argmax_miou=0.4)
    record(tmp_path, "06_fine_seeds", fine_seed_miou=0.55)
    verdicts = ordering_check(tmp_path).set_index("claim")["verdict"]
    assert verdicts["SAMS beats the CAM argmax (coarse seeds, train)"] == "holds"
    assert verdicts["seg prompts sharpen the seeds (fine > coarse, train)"] == "does NOT hold"
    assert verdicts["ground truth bounds stage 2 (upper bound > seeds, val)"] == "not run"
    table = ablation_table(tmp_path).set_index(["CAMs", "seeds"])["mIoU (%)"]
    assert table["cls CAMs (coarse)", "SAMS, p without GT"] == pytest.approx(60.0)
    assert table["cls CAMs (coarse)", "CAM argmax"] == pytest.approx(40.0)
    assert table.isna().sum() == len(table) - 3


def test_report_figures_get_their_section_as_alt_text():
    from fmalib.study.report_html import with_alt_text

    html = with_alt_text('<h1>04 · Coarse seeds</h1><img src="a.png"><h2>Per class</h2><p><img src="b.png"></p>')
    assert 'alt="Figure of the section: 04 · Coarse seeds"' in html and 'alt="Figure of the section: Per class"' in html


def test_results_schema_names_notebook_and_field(tmp_path):
    from fmalib.study.results import SCHEMA, read_results, record, result

    record(tmp_path, "04_coarse_seeds", coarse_seed_miou=np.float32(0.5), fallback_images=2)
    assert result(tmp_path, "04_coarse_seeds", "coarse_seed_miou") == 0.5
    with pytest.raises(FmalibError, match="notebook 04_coarse_seeds has no field 'coarse_seeds_miou'"):
        record(tmp_path, "04_coarse_seeds", coarse_seeds_miou=0.5)  # misspelt
    with pytest.raises(FmalibError, match="no notebook '04_coarse'"):
        record(tmp_path, "04_coarse", coarse_seed_miou=0.5)
    with pytest.raises(FmalibError, match=r"04_coarse_seeds.fallback_images = 2.5 is float; expected int"):
        record(tmp_path, "04_coarse_seeds", fallback_images=2.5)
    with pytest.raises(FmalibError, match="has no 'gt_best_miou': run notebook 04_coarse_seeds first"):
        result(tmp_path, "04_coarse_seeds", "gt_best_miou")
    with pytest.raises(FmalibError, match="notebook 06_fine_seeds has no field 'label_dirs'"):
        result(tmp_path, "06_fine_seeds", "label_dirs")
    (tmp_path / "results" / "05_seg_prompts.json").write_text('{"seg_seed_mIoU": 0.3}')  # written by hand, wrong
    with pytest.raises(FmalibError, match="notebook 05_seg_prompts has no field 'seg_seed_mIoU'"):
        read_results(tmp_path)
    assert set(SCHEMA) == {p.stem for p in notebook_paths()} - {"09_report"}


def test_headline_says_which_mious_cannot_exist_without_masks(tmp_path):
    from fmalib.study.results import record

    record(tmp_path, "00_data", train_has_masks=False, val_has_masks=True)
    record(tmp_path, "04_coarse_seeds", seed_fg_pixel_share=0.25, seed_empty_image_share=0.1)
    record(tmp_path, "08_stage2", seeds_val_miou=0.5, gt_val_miou=None)  # None: not recorded
    table = headline_table(tmp_path).set_index("result")
    units = table["unit"].to_dict()
    assert units["Coarse seeds (SAMS on cls CAMs), train"] == "no mIoU: the train split has no masks"
    assert units["Stage 2 trained on ground truth (upper bound), val"] == "no mIoU: the train split has no masks"
    assert units["Stage 2 trained on fine seeds, val"] == "mIoU (%)"
    assert table.loc["Stage 2 trained on fine seeds, val", "value"] == 50.0
    assert table.loc["Coarse seeds: pixels painted foreground, train (no masks)", "value"] == 25.0
    assert "Fine seeds: pixels painted foreground, train (no masks)" not in table.index  # not recorded
    assert np.isnan(table.loc["Coarse seeds (SAMS on cls CAMs), train", "value"])
