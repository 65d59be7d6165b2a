"""What a split's data is, for cache keys: the kind, the split, the class list and a fingerprint of the content
of every file that defines its items (images; with ``labels``, the label PNGs or the annotation file) — never
the dataset's path, so a moved or copied dataset keeps its caches and an edited label invalidates them."""
from __future__ import annotations

import os
from pathlib import Path

from ..core.cache import files_fingerprint, stable_hash
from ..core.errors import FmalibError
from . import open_dataset


def split_files(ds, labels: bool = True) -> list[tuple[str, Path]]:
    """(stable name, path) of the files that determine ``ds``'s items, in the split's order: the order and
    any repeat are part of what a split is (training follows it)."""
    files = []
    for i, image_id in enumerate(ds.ids):
        files.append((f"image/{image_id}", ds.image_path(i)))
        if labels and hasattr(ds, "gt_path") and ds.has_masks:
            try:
                files.append((f"label/{image_id}", ds.gt_path(i)))
            except FmalibError:  # no mask for this id: fingerprinted as missing
                files.append((f"label/{image_id}", Path(os.devnull + ".missing")))
    if labels and getattr(ds, "ann_file", None):
        files.append(("annotations", Path(ds.ann_file)))
    return files


def split_key(params, split: str, labels: bool = True) -> dict:
    """The cache-key entry of ``split``'s data (see the module doc); digests are indexed under
    ``workdir/fingerprints`` so unchanged files are not hashed again."""
    ds = open_dataset(params, split)
    index = params.resolve_path("workdir") / "fingerprints" / f"{stable_hash(str(Path(ds.root).resolve()))}.json"
    return {"kind": params["data"]["kind"], "split": split, "classes": list(ds.class_names),
            "files": files_fingerprint(split_files(ds, labels), index)}
