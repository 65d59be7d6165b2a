"""The reproduction verdict: every compared number against a reference, one line naming what differs."""
import json

import pytest

from fmalib.study.results import record
from fmalib.study.verdict import TOLERANCES, compared_numbers, write_verdict


def _fill(out, shift=None):
    """Record every compared number (0.40 + 0.01·i, mAPs as given); ``shift`` = {(nb, field): delta}."""
    for i, (nb, field, _kind) in enumerate(compared_numbers()):
        record(out, nb, **{field: 0.40 + 0.01 * i + (shift or {}).get((nb, field), 0.0)})


def _reference(out):
    return {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}


def test_equal_results_reproduce_every_number(tmp_path):
    _fill(tmp_path / "ref")
    _fill(tmp_path / "now")
    result, line = write_verdict(tmp_path / "now", _reference(tmp_path / "ref"))
    n = len(compared_numbers())
    assert result["compared"] == result["reproduced"] >= n  # numbers and the orderings
    assert line.startswith(f"reproduced {result['compared']} of {result['compared']} numbers")
    assert "differ" not in line
    assert (tmp_path / "now" / "reproduction.md").read_text().count("| reproduced |") == result["compared"]


def test_one_number_beyond_tolerance_is_named(tmp_path):
    _fill(tmp_path / "ref")
    tol = TOLERANCES["mIoU"][0]
    # beyond the tolerance; and one just inside it, which must still count as reproduced
    _fill(tmp_path / "now", {("06_fine_seeds", "fine_seed_miou"): 3 * tol,
                             ("04_coarse_seeds", "coarse_seed_miou"): 0.9 * tol})
    result, line = write_verdict(tmp_path / "now", _reference(tmp_path / "ref"))
    assert result["reproduced"] == result["compared"] - 1
    assert [r["number"] for r in result["differs"]] == ["06_fine_seeds.fine_seed_miou"]
    assert "1 differs: 06_fine_seeds.fine_seed_miou" in line and "|Δ| 1.50 > 0.5" in line
    data = json.loads((tmp_path / "now" / "reproduction.json").read_text())
    assert data["summary"] == line


def test_stage2_tolerance_is_wider_and_a_flipped_ordering_differs(tmp_path):
    _fill(tmp_path / "ref")
    ref = _reference(tmp_path / "ref")
    # stage 2's seeds number moves 2 points (inside its tolerance) but above GT: the ordering flips
    gt = ref["08_stage2"]["gt_val_miou"]
    _fill(tmp_path / "now", {("08_stage2", "seeds_val_miou"): gt - ref["08_stage2"]["seeds_val_miou"] + 0.01})
    result, line = write_verdict(tmp_path / "now", ref)
    assert [r["number"] for r in result["differs"]] == \
        ["ordering: ground truth bounds stage 2 (upper bound > seeds, val)"]
    assert "holds → does NOT hold" in line


def test_missing_numbers_and_no_reference(tmp_path):
    _fill(tmp_path / "ref")
    record(tmp_path / "now", "04_coarse_seeds", coarse_seed_miou=0.5)
    result, _ = write_verdict(tmp_path / "now", _reference(tmp_path / "ref"))
    assert any(r["number"] == "08_stage2.gt_val_miou" and r["verdict"] == "missing now" for r in result["differs"])
    result, line = write_verdict(tmp_path / "now", {})
    assert result["compared"] == 0 and line.startswith("no committed reference")


@pytest.mark.parametrize("field", ["hand_map", "cls_map_vs_bg"])
def test_map_numbers_use_the_map_tolerance(tmp_path, field):
    _fill(tmp_path / "ref")
    _fill(tmp_path / "now", {("03_cls_prompts", field): 0.008})  # inside ±0.01 (an mIoU would be outside ±0.005)
    result, _ = write_verdict(tmp_path / "now", _reference(tmp_path / "ref"))
    assert not [r for r in result["differs"] if field in r["number"]]
