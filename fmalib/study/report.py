"""The study's tables and the ablation figure, from the results the notebooks recorded: the headline, the
paper's orderings, the settings columns, the ablations (report.html itself: ``fmalib.study.report_html``)."""
from __future__ import annotations

import logging
import os

import matplotlib.pyplot as plt
import pandas as pd

from .orderings import orderings
from .results import check_field, lookup, read_results
from .viz import grouped_hbars

log = logging.getLogger(__name__)

# (results group, key, row label): what the study's headline table shows, in pipeline order.
HEADLINE = [
    ("04_coarse_seeds", "cam_argmax_miou", "CAM-argmax seeds (cls prompts, GT-tuned bg threshold), train"),
    ("04_coarse_seeds", "coarse_seed_miou", "Coarse seeds (SAMS on cls CAMs), train"),
    ("06_fine_seeds", "fine_seed_miou", "Fine seeds (SAMS on seg CAMs), train"),
    ("08_stage2", "seeds_val_miou", "Stage 2 trained on fine seeds, val"),
    ("08_stage2", "gt_val_miou", "Stage 2 trained on ground truth (upper bound), val"),
]


# (results group, key, row label): what a study without train masks shows in place of the seeds' mIoU.
GT_FREE = [
    ("04_coarse_seeds", "seed_fg_pixel_share", "Coarse seeds: pixels painted foreground, train (no masks)"),
    ("04_coarse_seeds", "seed_empty_image_share", "Coarse seeds: tagged images left all background, train"),
    ("06_fine_seeds", "seed_fg_pixel_share", "Fine seeds: pixels painted foreground, train (no masks)"),
    ("06_fine_seeds", "seed_empty_image_share", "Fine seeds: tagged images left all background, train"),
]


def headline_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Per headline row its value and unit (mIoU in %, and stage 2's seeds / ground truth in % of the latter);
    NaN where that notebook has not recorded it yet (the unit says so). A split without masks (tags only) has no
    mIoU: its rows say so, and the seeds' GT-free diagnostics follow."""
    results = read_results(out_dir)
    masks = {"train": lookup(results, "00_data", "train_has_masks", True),
             "val": lookup(results, "00_data", "val_has_masks", True)}
    rows = []
    for g, k, label in HEADLINE:
        value = lookup(results, g, k)
        # the masks a row needs: its split's (named last in its label); the upper bound's also train's
        needs = ["train", "val"] if k == "gt_val_miou" else [label.rsplit(", ", 1)[-1]]
        missing = [s for s in needs if not masks.get(s, True)]
        unit = "mIoU (%)" if value is not None else (f"no mIoU: the {missing[0]} split has no masks" if missing
                                                     else "mIoU (%): not run yet")
        rows.append({"result": label, "value": float("nan") if value is None else 100 * float(value), "unit": unit})
    rows += [{"result": label, "value": 100 * float(lookup(results, g, k)), "unit": "%"}
             for g, k, label in GT_FREE if lookup(results, g, k) is not None]
    seeds, gt = lookup(results, "08_stage2", "seeds_val_miou"), lookup(results, "08_stage2", "gt_val_miou")
    if seeds is not None and gt is not None and gt > 0:
        rows.append({"result": "Stage 2 on seeds relative to stage 2 on ground truth", "value": 100 * seeds / gt,
                     "unit": "% of ground truth"})
    return pd.DataFrame(rows)


def styled(table: pd.DataFrame, digits: int = 1, name: str = "table", na_rep: str = "not run"):
    """How the notebooks and the report show a table: no index, ``digits`` decimals, "not run" for a missing
    number, and a fixed element id (pandas' Styler draws a random one, which would change every rerun)."""
    return (table.style.format(precision=digits, na_rep=na_rep).hide(axis="index")
            .set_uuid(name))


def key_value_table(mapping: dict, prefix: str = "") -> pd.DataFrame:
    """A (nested) settings mapping as rows of dotted key and value, for display (no raw dict reprs)."""
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += key_value_table(value, name + ".").to_dict("records")
        else:
            shown = f"{value:g}" if isinstance(value, float) else \
                (", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
            rows.append({"key": name, "value": shown})
    return pd.DataFrame(rows, columns=["key", "value"])


def numbers_table(columns: dict[str, dict]) -> pd.DataFrame:
    """Settings columns ({name: settings_column(...)}) as one table of their numbers, one row per number."""
    keys = list(dict.fromkeys(k for c in columns.values() for k, v in c.items() if isinstance(v, float)))
    return pd.DataFrame([{"number": k, **{name: c.get(k) for name, c in columns.items()}} for k in keys])


# (claim, (group, key) that should be larger, (group, key) it is compared with): the paper's ordering.
CLAIMS = [
    ("learned cls prompts classify better than hand prompts (mAP vs the bg prompts, val)",
     ("03_cls_prompts", "cls_map_vs_bg"), ("03_cls_prompts", "hand_map_vs_bg")),
    ("learned cls prompts beat hand prompts (CAM-argmax seeds, val)", ("03_cls_prompts", "cls_seed_miou"),
     ("03_cls_prompts", "hand_seed_miou")),
    ("CAA refinement helps (cls CAM-argmax seeds, val)", ("03_cls_prompts", "cls_caa_seed_miou"),
     ("03_cls_prompts", "cls_seed_miou")),
    ("seg prompts beat cls prompts (CAM-argmax seeds + CAA, val)", ("05_seg_prompts", "seg_caa_seed_miou"),
     ("05_seg_prompts", "cls_caa_seed_miou")),
    ("SAMS beats the CAM argmax (coarse seeds, train)", ("04_coarse_seeds", "coarse_seed_miou"),
     ("04_coarse_seeds", "cam_argmax_miou")),
    ("seg prompts sharpen the seeds (fine > coarse, train)", ("06_fine_seeds", "fine_seed_miou"),
     ("04_coarse_seeds", "coarse_seed_miou")),
    ("ground truth bounds stage 2 (upper bound > seeds, val)", ("08_stage2", "gt_val_miou"),
     ("08_stage2", "seeds_val_miou")),
]

# (split, group, variant, results group, key): the ablation table and figure of notebook 07, gathered from the
# stage notebooks. Val rows are CAM-argmax seeds of each prompt set (the CLIP-ES protocol); train rows are the
# seeds each CAM set gives under each seeding rule. Variants name the seed kind (viz.SEED_COLORS).
ABLATIONS = [
    ("val", "hand prompts (CLIP-ES)", "CAM argmax", "03_cls_prompts", "hand_seed_miou"),
    ("val", "hand prompts (CLIP-ES)", "CAM argmax + CAA", "03_cls_prompts", "hand_caa_seed_miou"),
    ("val", "cls prompts", "CAM argmax", "03_cls_prompts", "cls_seed_miou"),
    ("val", "cls prompts", "CAM argmax + CAA", "03_cls_prompts", "cls_caa_seed_miou"),
    ("val", "cls prompts, bg prompts as negatives", "CAM argmax", "07_ablations", "bg_negatives_cls_seed_miou"),
    ("val", "cls prompts, bg prompts as negatives", "CAM argmax + CAA", "07_ablations",
     "bg_negatives_cls_caa_seed_miou"),
    ("val", "seg prompts", "CAM argmax", "05_seg_prompts", "seg_seed_miou"),
    ("val", "seg prompts", "CAM argmax + CAA", "05_seg_prompts", "seg_caa_seed_miou"),
    ("train", "cls CAMs (coarse)", "CAM argmax", "04_coarse_seeds", "cam_argmax_miou"),
    ("train", "cls CAMs (coarse)", "SAMS, p without GT", "04_coarse_seeds", "coarse_seed_miou"),
    ("train", "cls CAMs (coarse)", "SAMS, p best on GT", "04_coarse_seeds", "gt_best_miou"),
    ("train", "seg CAMs (fine)", "CAM argmax", "06_fine_seeds", "cam_argmax_miou"),
    ("train", "seg CAMs (fine)", "SAMS, p without GT", "06_fine_seeds", "fine_seed_miou"),
    ("train", "seg CAMs (fine)", "SAMS, p best on GT", "06_fine_seeds", "gt_best_miou"),
    ("train", "seg CAMs (fine)", "SAMS, whole masks only", "07_ablations", "levels_whole_miou"),
    ("train", "seg CAMs (fine)", "SAMS, whole + part", "07_ablations", "levels_whole_part_miou"),
]


for _g, _k in [(g, k) for g, k, _ in HEADLINE + GT_FREE] + [(g, k) for *_, g, k in ABLATIONS] \
        + [pair for _, *pairs in CLAIMS for pair in pairs]:
    check_field(_g, _k)  # a misspelt name fails on import, not as a silent "not run"


def ablation_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Seed mIoU (%) per ablation row (split, CAMs or prompts, seed kind), from the results the notebooks
    recorded; NaN = not run."""
    results = read_results(out_dir)
    return pd.DataFrame([{"split": split, "CAMs": group, "seeds": variant,
                          "mIoU (%)": 100 * float(lookup(results, g, k, float("nan")))}
                         for split, group, variant, g, k in ABLATIONS])


def ablation_figure(table: pd.DataFrame):
    """The ablation table as two panels of grouped horizontal bars — CAM-argmax seeds on val, seeds on train
    — never one axis for both splits; a row not run is left out."""
    parts = {split: table[(table["split"] == split) & table["mIoU (%)"].notna()] for split in ("val", "train")}
    fig, axes = plt.subplots(2, 1, figsize=(9, 0.32 * sum(map(len, parts.values())) + 2.8),
                             height_ratios=[max(1, len(p)) for p in parts.values()])
    titles = {"val": "CAM-argmax seeds per prompt set (val)", "train": "Seeds per CAM set and seeding rule (train)"}
    for ax, (split, part) in zip(axes, parts.items()):
        grouped_hbars(part, "CAMs", "seeds", "mIoU (%)", titles[split], "seed mIoU against ground truth (%)", ax=ax)
    fig.suptitle("Ablations: what each ingredient buys", fontweight="bold")
    fig.tight_layout()
    return fig


def settings_table(out_dir: str | os.PathLike) -> pd.DataFrame:
    """The paper's orderings under the toy's settings and under the paper's (notebook 07's two columns):
    per ordering and column, its two numbers and whether it holds; empty when notebook 07 has not run."""

    columns = lookup(read_results(out_dir), "07_ablations", "settings", {})
    parts = []
    for name, column in columns.items():
        rows = pd.DataFrame(orderings(column)).set_index("ordering")
        rows["holds"] = rows["holds"].map({True: "holds", False: "does NOT hold", None: "not run"})
        parts.append(rows.rename(columns=lambda c: f"{name}: {c}"))
    return pd.concat(parts, axis=1).reset_index() if parts else pd.DataFrame()


def ordering_verdicts(results: dict) -> list[str]:
    """Per CLAIMS entry: "holds", "does NOT hold", or "not run" where a number is missing."""
    out = []
    for _claim, (g1, k1), (g2, k2) in CLAIMS:
        a, b = lookup(results, g1, k1), lookup(results, g2, k2)
        out.append("not run" if a is None or b is None else ("holds" if a > b else "does NOT hold"))
    return out


def ordering_check(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Does each ordering the paper claims hold in this run? 'not run' where a number is missing."""
    results = read_results(out_dir)
    rows = []
    for (claim, (g1, k1), (g2, k2)), verdict in zip(CLAIMS, ordering_verdicts(results)):
        rows.append({"claim": claim, "larger": lookup(results, g1, k1), "smaller": lookup(results, g2, k2),
                     "verdict": verdict})
    return pd.DataFrame(rows)
