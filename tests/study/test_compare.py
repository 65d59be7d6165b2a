"""The two-column study: paper_settings applied as overrides; orderings and the report's table per column."""
import pytest

from fmalib.core.params import load_params
from fmalib.study.compare import paper_params
from fmalib.study.orderings import ORDERINGS, orderings
from fmalib.study.report import settings_table
from fmalib.study.results import record


def test_paper_params_apply_only_the_listed_departures():
    departures = {"cam.target_layer": "block_input", "prompts.seg.lr": 0.5}  # params that depart, and say where
    toy = load_params("params/toy.yaml", {"workdir": "/tmp/elsewhere", "cam.target_layer": "ln1_out",
                                          "paper_settings": departures})
    paper = paper_params(toy)
    assert dict(toy.paper_settings) == departures
    for key, value in toy.paper_settings.items():
        assert paper.get_dotted(key) == value
    changed = {k for k in toy.paper_settings if toy.get_dotted(k) != paper.get_dotted(k)}
    assert changed  # at least one departure is a real difference
    assert paper.workdir == "/tmp/elsewhere" and paper.path == toy.path  # earlier overrides are kept
    assert paper.prompts.seg.init_std == toy.prompts.seg.init_std
    for name in ("voc", "coco"):  # the real params are the paper's: nothing to apply
        assert dict(load_params(f"params/{name}.yaml").paper_settings) == {}


def test_orderings_read_the_params_caa_choice_and_flag_missing():
    column = {"use_caa": {"hand": False, "cls": False, "seg": False}, "map_cls": 0.7, "map_hand": 0.9, "argmax_val_cls_no_caa": 0.5,
              "argmax_val_hand_no_caa": 0.4, "argmax_val_cls_caa": 0.3, "argmax_val_seg_no_caa": 0.6,
              "coarse_miou": 0.5, "cls_argmax_train_miou": 0.45, "fine_miou": 0.6, "seg_argmax_train_miou": 0.5}
    rows = {r["ordering"]: r for r in orderings(column)}
    assert len(rows) == len(ORDERINGS)
    assert rows["learned cls prompts > hand prompts (val mAP)"]["holds"] is False
    seeds = rows["learned cls prompts > hand prompts (val CAM-argmax seeds, params' CAA)"]
    assert (seeds["first"], seeds["second"], seeds["holds"]) == (0.5, 0.4, True)  # no-CAA numbers: params' choice
    assert rows["CAA > no CAA (cls CAMs, val CAM-argmax seeds)"]["holds"] is False
    assert rows["stage 2: ground truth > fine seeds (val)"]["holds"] is None  # stage 2 not run
    with_caa = {r["ordering"]: r for r in orderings({**column, "use_caa": {"hand": True, "cls": True, "seg": True},
                                                     "argmax_val_hand_caa": 0.2})}
    assert with_caa["learned cls prompts > hand prompts (val CAM-argmax seeds, params' CAA)"]["first"] == 0.3
    # each prompt kind's own cam.use_caa: cls CAMs refined, hand CAMs not
    mixed = {r["ordering"]: r for r in orderings({**column, "use_caa": {"hand": False, "cls": True, "seg": False}})}
    row = mixed["learned cls prompts > hand prompts (val CAM-argmax seeds, params' CAA)"]
    assert (row["first"], row["second"]) == (0.3, 0.4)
    row = mixed["seg prompts > cls prompts (val CAM-argmax seeds, params' CAA)"]
    assert (row["first"], row["second"]) == (0.6, 0.3)


def test_settings_table_has_both_columns(tmp_path):
    assert settings_table(tmp_path).empty  # notebook 07 not run
    toy = {"use_caa": {"hand": False, "cls": False, "seg": False}, "coarse_miou": 0.5, "cls_argmax_train_miou": 0.4}
    paper = {"use_caa": {"hand": True, "cls": True, "seg": True}, "coarse_miou": 0.3, "cls_argmax_train_miou": 0.35}
    record(tmp_path, "07_ablations", settings={"toy settings": toy, "paper settings": paper})
    table = settings_table(tmp_path).set_index("ordering")
    row = table.loc["SAMS > CAM argmax (coarse, train)"]
    assert row["toy settings: holds"] == "holds" and row["paper settings: holds"] == "does NOT hold"
    assert row["paper settings: first"] == pytest.approx(0.3)
    assert table.loc["fine seeds > coarse seeds (train)", "toy settings: holds"] == "not run"


def test_variants_apply_their_overrides_and_an_unknown_one_is_named():
    from fmalib.core.errors import FmalibError
    from fmalib.core.params import with_variant

    toy = load_params("params/toy.yaml", {"workdir": "/tmp/elsewhere"})
    assert "first_tiny_clip" in toy.variants
    first = with_variant(toy, "first_tiny_clip")
    assert (first.clip.model, first.cam.target_layer, first.prompts.seg.lr) == ("fmalib-tiny-clip", "block_input", 1.0)
    assert first.clip.model != toy.clip.model and first.workdir == "/tmp/elsewhere" and first.path == toy.path
    with pytest.raises(FmalibError, match=r"toy.yaml: no variant 'nope' under variants \(defined: first_tiny_clip"):
        with_variant(toy, "nope")
