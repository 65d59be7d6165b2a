"""What notebooks 04 (coarse seeds) and 06 (fine seeds) show, in one call: ``seed_study(params, kind)`` makes
(or reuses) the masks, CAMs and SAMS seeds of that kind (``fmalib.stages.pipeline.seeds``) and evaluates the
seeds against the ground truth beside CLIP-ES's CAM-argmax rule on the same CAMs (its bg threshold tuned on
ground truth, its own protocol, so the comparison favours it) and any other seed folders, per-class IoU,
the ground-truth sweep of p (for reference only: the method never uses it), the GT-free criterion, and a
few example rows. A split without masks (tags only) gets GT-free diagnostics in place of every mIoU."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.cache import StageCache
from ..data import open_dataset
from ..data.labels import read_label_png
from ..method.metrics import iou_table, mean_iou
from ..stages.cams import caa_for, load_cams
from ..stages.pipeline import SeedsRun, seeds
from ..stages.seeds import SeedSet
from ..stages.cam_argmax import cam_argmax_seed_dir
from ..stages.seed_eval import evaluate_seeds, seed_power_sweep
from . import viz
from .figures import seed_panels


def power_criterion_figure(seeds: SeedSet):
    """The GT-free criterion over p that chose the seeds' p (None when p is fixed by params)."""
    table = seeds.power_table
    if table is None:
        return None
    ax = table.plot(x="bg_power", y=["fg_agreement", "bg_agreement", "balanced_agreement"], marker="o",
                    logx=True, figsize=(5.5, 3.2), title="Background power p: the GT-free criterion")
    ax.axvline(seeds.bg_power, color="k", linestyle="--", linewidth=1)
    ax.annotate(f"chosen p = {seeds.bg_power:g}", (seeds.bg_power, 0.02), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set_xlabel("background power p (log scale)")
    ax.set_ylabel("hit rate on confident CAM pixels (0–1)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return ax.get_figure()


def seed_diagnostics(dataset, folders: dict[str, Path]) -> pd.DataFrame:
    """What seeds show without ground truth, per seed set and class (background first): ``tag_share``, the
    class's share of all image tags; ``pixel_share``, its share of the seeds' pixels (background: of all
    pixels; classes: of the foreground pixels — comparable with ``tag_share``); ``shown``, the share of the
    images tagged with it whose seed paints it (background: images whose seed is all background)."""
    names = ["background", *dataset.class_names]
    tags = np.zeros(len(names), np.int64)
    for i in range(len(dataset)):
        tags[np.asarray(dataset.image_labels(i), int)] += 1
    rows = []
    for set_name, folder in folders.items():
        pixels, shown, empty = np.zeros(len(names), np.int64), np.zeros(len(names), np.int64), 0
        for i, image_id in enumerate(dataset.ids):
            counts = np.bincount(read_label_png(folder / f"{image_id}.png").ravel(), minlength=256)[:len(names)]
            pixels += counts
            labels = np.asarray(dataset.image_labels(i), int)
            shown[labels] += counts[labels] > 0
            empty += len(labels) > 0 and not counts[1:].any()
        fg = max(int(pixels[1:].sum()), 1)
        for c, name in enumerate(names):
            rows.append({"seeds": set_name, "class": name,
                         "tag_share": np.nan if c == 0 else tags[c] / max(int(tags[1:].sum()), 1),
                         "pixel_share": pixels[0] / max(int(pixels.sum()), 1) if c == 0 else pixels[c] / fg,
                         "shown": empty / max(len(dataset), 1) if c == 0 else shown[c] / max(int(tags[c]), 1)})
    return pd.DataFrame(rows)


@dataclass
class SeedReport:
    run: SeedsRun  # the masks, CAMs and seeds evaluated
    seeds: SeedSet
    cams: StageCache
    dataset: object
    caa: bool
    folders: dict[str, Path]  # row name -> seed folder, the method's seeds first, the CAM argmax (if any) last
    argmax_threshold: float | None  # None: the split has no masks to tune the CAM argmax on
    tables: dict[str, pd.DataFrame]  # row name -> per-class IoU (empty without masks)
    miou: dict[str, float]
    sweep: pd.DataFrame | None  # p against ground truth (None without masks)
    diagnostics: pd.DataFrame | None = None  # seed_diagnostics, for a split without masks

    @property
    def name(self) -> str:
        return f"SAMS {self.run.kind} seeds"

    @property
    def has_gt(self) -> bool:
        return self.sweep is not None

    def iou_summary(self) -> pd.DataFrame:
        """One row per seed set: IoU per class and mIoU; without masks, the GT-free diagnostics instead (per class
        the share of the foreground seed pixels against the share of the tags, and how often a tagged class
        shows in its image's seed)."""
        if not self.has_gt:
            d = self.diagnostics
            tags = d.drop_duplicates("class").set_index("class")["tag_share"].rename(("tags", "share of tags"))
            wide = d.pivot(index="class", columns="seeds", values=["pixel_share", "shown"])
            wide.columns = [(s, "share of fg seed pixels" if v == "pixel_share" else "shown when tagged")
                            for v, s in wide.columns]
            out = pd.concat([tags, wide], axis=1).loc[["background", *self.dataset.class_names]]
            out.columns = pd.MultiIndex.from_tuples(out.columns)
            return out
        per_class = pd.DataFrame({k: t.set_index("class")["iou"] for k, t in self.tables.items()}).T
        return per_class.assign(mIoU=pd.Series(self.miou))

    def sweep_table(self) -> pd.DataFrame | str:
        """Seed mIoU against ground truth per p (3 decimals), the method's p marked; a sentence without masks."""
        if not self.has_gt:
            return (f"split {self.run.split!r} has no masks: no p can be scored against ground truth (the method "
                    f"chose p = {self.seeds.bg_power:g} without it)")
        return self.sweep.assign(chosen=self.sweep["bg_power"] == self.seeds.bg_power).round(3)

    def per_class_figure(self):
        if not self.has_gt:
            d = self.diagnostics[self.diagnostics["class"] != "background"]
            tags = d.drop_duplicates("class").assign(seeds="tags (share of image tags)",
                                                     pixel_share=lambda t: t["tag_share"])
            long = pd.concat([tags, d], ignore_index=True)
            return viz.per_class_bars(long, value="pixel_share", by="class", hue="seeds",
                                      ylabel="share per class (0–1)",
                                      title=f"{self.run.kind} seeds' fg pixels vs tags ({self.run.split})",
                                      palette={k: viz.seed_color(k) for k in long["seeds"].unique()})
        long = pd.concat([t.assign(seeds=k) for k, t in self.tables.items()], ignore_index=True)
        return viz.per_class_bars(long, value="iou", by="class", hue="seeds", ylabel="IoU against ground truth (0–1)",
                                  title=f"{self.run.kind} seeds: IoU per class ({self.run.split})",
                                  palette={k: viz.seed_color(k) for k in self.tables})

    def examples_figure(self, n: int = 4):
        """Image, GT, CAM heat map, then every seed set of the report, for the first ``n`` images."""
        rows, titles = [], []
        short = {k: k.split(" (")[0].replace(" seeds", "") for k in self.folders}
        for j in range(min(n, len(self.dataset))):
            item = self.dataset[j]
            cams, labels = load_cams(self.cams, item["id"], self.caa)
            seeds = {short[k]: read_label_png(d / f"{item['id']}.png") for k, d in reversed(self.folders.items())}
            images, tt = seed_panels(item, cams, labels, seeds)
            rows += images
            titles += tt
        return viz.image_grid(rows, titles, ncols=(3 if self.has_gt else 2) + len(self.folders),
                              class_names=["background", *self.dataset.class_names])

    def results(self) -> dict:
        """The fields notebooks 04 / 06 record (fmalib.study.results.SCHEMA); without masks, no mIoU: the
        seeds' foreground pixel share and the share of images left all background."""
        if not self.has_gt:
            d = self.diagnostics[self.diagnostics["seeds"] == self.name].set_index("class")
            fg = 1.0 - float(d.loc["background", "pixel_share"])
            return {"label_dir": str(self.seeds.dir), "bg_power": float(self.seeds.bg_power),
                    "fallback_images": int(self.seeds.fallback_images), "seed_fg_pixel_share": fg,
                    "seed_empty_image_share": float(d.loc["background", "shown"])}
        ours, argmax = self.miou[self.name], list(self.miou.values())[-1]
        gt_best = self.sweep.loc[self.sweep["miou"].idxmax()]
        return {"label_dir": str(self.seeds.dir), "bg_power": float(self.seeds.bg_power),
                f"{self.run.kind}_seed_miou": ours, "cam_argmax_miou": argmax,
                "cam_argmax_bg_threshold": float(self.argmax_threshold), "gain_points": 100 * (ours - argmax),
                "gt_best_bg_power": float(gt_best["bg_power"]), "gt_best_miou": float(gt_best["miou"]),
                "fallback_images": int(self.seeds.fallback_images)}


def seed_study(params, kind: str, split: str | None = None) -> SeedReport:
    """The ``kind`` seeds of ``split`` (default: train) with their masks and CAMs, evaluated against the split's
    ground truth beside the CAM-argmax seeds of the same CAMs (and, for fine seeds, the coarse ones)."""
    run = seeds(params, kind, split)
    return seed_report(params, run, {"SAMS coarse seeds": run.coarse.seeds.dir} if run.coarse else None)


def seed_report(params, run: SeedsRun, others: dict[str, Path] | None = None) -> SeedReport:
    """Evaluate the seeds of ``run`` against its split's ground truth, beside ``others`` ({row name: seed
    folder}) and the CAM-argmax seeds of the same CAMs."""
    split, seeds, cams = run.split, run.seeds, run.cams
    dataset = open_dataset(params, split)
    if not dataset.has_masks:  # tags only: GT-free diagnostics, no CAM argmax (its threshold needs masks)
        folders = {f"SAMS {run.kind} seeds": Path(seeds.dir), **(others or {})}
        return SeedReport(run, seeds, cams, dataset, caa_for(params, cams), folders, None, {}, {}, None,
                          seed_diagnostics(dataset, folders))
    argmax_dir, t, _ = cam_argmax_seed_dir(params, split, cams)
    folders = {f"SAMS {run.kind} seeds": Path(seeds.dir), **(others or {}),
               f"CAM argmax (bg {t:.2f}, GT-tuned)": Path(argmax_dir)}
    names = ["background", *dataset.class_names]
    conf = {k: evaluate_seeds(dataset, d) for k, d in folders.items()}
    return SeedReport(run, seeds, cams, dataset, caa_for(params, cams), folders, t,
                      {k: iou_table(c, names) for k, c in conf.items()}, {k: mean_iou(c) for k, c in conf.items()},
                      seed_power_sweep(params, split, cams))
