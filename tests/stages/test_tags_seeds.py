"""A practitioner's data — JPEGs and a tags.csv, no masks — gives the same seeds, byte for byte, as the same
images read with masks (the labels then come from the masks): every stage up to the seeds is GT-free."""
import pytest

from fmalib.core.params import fast_overlay, load_params
from fmalib.data import open_dataset
from fmalib.data.layouts import TAGS_SPLITS, write_tags_layout, write_voc_layout
from fmalib.data.synthetic import CLASS_NAMES
from fmalib.stages.pipeline import seeds
from fmalib.stages.prompts import train_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(tmp_path, kind, root):
    extra = {"data.tags": TAGS_SPLITS} if kind == "tags" else {}
    toy = load_params("params/toy.yaml")
    return load_params("params/toy.yaml", {"data.kind": kind, "data.root": str(root), "data.val_split": "val",
                                           "classes.names": list(CLASS_NAMES), "workdir": str(tmp_path / kind),
                                           "sams.power_images": 4, **extra}, overlays=fast_overlay(toy))


def test_tags_without_masks_give_the_mask_derived_runs_seeds_byte_for_byte(tmp_path):
    write_tags_layout(tmp_path / "tags_data", n_train=4, n_val=2)
    write_voc_layout(tmp_path / "voc_data", n_train=4, n_val=2, stand_ins=False)
    tags, voc = _params(tmp_path, "tags", tmp_path / "tags_data"), _params(tmp_path, "voc", tmp_path / "voc_data")
    assert not open_dataset(tags, "train").has_masks
    runs = {}
    for name, p in (("tags", tags), ("voc", voc)):
        train_prompts(p, "cls")
        train_prompts(p, "seg", seeds_dir=seeds(p, "coarse").seeds.dir)
        runs[name] = seeds(p, "fine")  # the seg prompts trained on the coarse seeds, SAMS on their CAMs
    assert runs["tags"].seeds.dir != runs["voc"].seeds.dir  # two computations, not one cache
    ids = open_dataset(voc, "train").ids
    for level in ("coarse", "fine"):
        a_run, b_run = (runs["tags"].coarse, runs["voc"].coarse) if level == "coarse" else (runs["tags"], runs["voc"])
        for image_id in ids:
            a = (a_run.seeds.dir / f"{image_id}.png").read_bytes()
            b = (b_run.seeds.dir / f"{image_id}.png").read_bytes()
            assert a == b, f"{level} seed {image_id}.png differs between the tags and the mask-derived run"
        assert a_run.seeds.bg_power == b_run.seeds.bg_power
