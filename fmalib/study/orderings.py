"""The paper's orderings over one settings column (``fmalib.study.compare.settings_column``): which number
should be larger, and whether it is. Plain dicts in, rows out — the report reads it without the method's stack."""
from __future__ import annotations

# (row label, how the row's two numbers compare: first > second is what the paper reports)
ORDERINGS = [
    ("learned cls prompts > hand prompts (val mAP)", "map_cls", "map_hand"),
    ("learned cls prompts > hand prompts (val CAM-argmax seeds, params' CAA)", "argmax_val_cls_{cls}",
     "argmax_val_hand_{hand}"),
    ("CAA > no CAA (cls CAMs, val CAM-argmax seeds)", "argmax_val_cls_caa", "argmax_val_cls_no_caa"),
    ("seg prompts > cls prompts (val CAM-argmax seeds, params' CAA)", "argmax_val_seg_{seg}",
     "argmax_val_cls_{cls}"),
    ("SAMS > CAM argmax (coarse, train)", "coarse_miou", "cls_argmax_train_miou"),
    ("SAMS > CAM argmax (fine, train)", "fine_miou", "seg_argmax_train_miou"),
    ("fine seeds > coarse seeds (train)", "fine_miou", "coarse_miou"),
    ("stage 2: ground truth > fine seeds (val)", "stage2_gt_val_miou", "stage2_seeds_val_miou"),
]


def orderings(column: dict) -> list[dict]:
    """One row per ordering of ``ORDERINGS``: its two numbers and whether it holds (None if not run)."""
    tags = {kind: "caa" if on else "no_caa" for kind, on in column["use_caa"].items()}  # cam.use_caa per kind
    rows = []
    for label, a, b in ORDERINGS:
        va, vb = column.get(a.format(**tags)), column.get(b.format(**tags))
        holds = None if va is None or vb is None else bool(va > vb)
        rows.append({"ordering": label, "first": va, "second": vb, "holds": holds})
    return rows
