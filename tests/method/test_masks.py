"""Multi-level SAM masks: RLE codec, level rules, overlap filter (vs a plain loop), small-region NMS, cache,
resumable sharded stage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData

from fmalib.core.errors import FmalibError
from fmalib.core.params import load_params
from fmalib.data import open_dataset
from fmalib.method.generator import MASK_KEYS, MultiLevelMaskGenerator, nms_score, passes_pred_iou, remove_small_regions
from fmalib.method.masks import MaskSet, bool_to_runs, concat_runs
from fmalib.method.overlap import overlap_filter
from fmalib.method.rle import MaskRuns, decode_count_strings
from fmalib.models.checkpoints import load_sam_from_params
from fmalib.stages.masks import load_masks, mask_cache, run_mask_stage


def blobs(rng, n, h, w):
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h), rng.uniform(2, w)
        out[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    out[0] = True  # a full mask: one run over every column
    out[1] = False  # an empty mask
    out[2] = rng.random((h, w)) < 0.5  # many short runs
    return out


def test_rle_round_trip_against_pycocotools():
    rng = np.random.default_rng(0)
    masks = blobs(rng, 8, 97, 131)  # long runs: multi-chunk counts and negative deltas
    coco = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    runs = MaskRuns.from_rles(coco)
    np.testing.assert_array_equal(runs.to_bool(), masks)
    np.testing.assert_array_equal(runs.areas, mask_utils.area(coco))
    counts, offsets = decode_count_strings([r["counts"] for r in coco])
    assert len(offsets) == 9 and counts.sum() == 8 * 97 * 131
    # encoding from runs gives pycocotools' own bytes; the torch encoder agrees
    assert [r["counts"] for r in MaskRuns.from_bool(masks).to_rles()] == [r["counts"] for r in coco]
    torch_runs = bool_to_runs(torch.from_numpy(masks))
    np.testing.assert_array_equal(torch_runs.starts, runs.starts)
    np.testing.assert_array_equal(torch_runs.offsets, runs.offsets)
    # the cache arrays round-trip
    ms = MaskSet.from_runs(runs, rng.integers(0, 3, 8), rng.random(8), rng.random(8))
    back = MaskSet.from_arrays(ms.to_arrays())
    np.testing.assert_array_equal(back.to_bool(), masks)
    assert back.counts == ms.counts and (back.levels == ms.levels).all()
    np.testing.assert_array_equal(mask_utils.decode(back.rles()).transpose(2, 0, 1), masks)
    with pytest.raises(FmalibError, match="missing array"):
        MaskSet.from_arrays({"size": np.array([2, 2])}, "x.npz")


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def reference_overlap_filter(masks: np.ndarray, levels, thresh: float) -> list[int]:
    """docs/method.md §5's filter read literally, on dense masks, pixel counts by numpy sums, one pair at a time."""
    n = len(masks)
    kept = [i for i in range(n) if levels[i] == 2]
    for level in (1, 0):
        against = list(kept)  # fixed before the level: candidates of one level never see each other
        for i in range(n):
            if levels[i] != level:
                continue
            worst = 0.0
            for k in against:
                worst = max(worst, np.logical_and(masks[i], masks[k]).sum() / masks[i].sum())
            if worst < thresh:
                kept.append(i)
    return sorted(kept)


def _filter(masks, levels, thresh=0.3):
    rles = MaskRuns.from_bool(np.asarray(masks)).to_rles()
    return overlap_filter(rles, np.asarray(levels), thresh).tolist()


def test_overlap_filter_level_batches_by_hand():
    h, w = 20, 20
    masks = np.stack([
        _rect(h, w, 0, 10, 0, 20),  # 0 whole, top half
        _rect(h, w, 5, 15, 0, 20),  # 1 whole overlapping 0 by half: wholes are always kept
        _rect(h, w, 15, 20, 0, 10),  # 2 part, free: kept
        _rect(h, w, 16, 20, 8, 20),  # 3 part: 8/48 in part 2, 40/48 in part 4 -- parts ignore parts: kept
        _rect(h, w, 14, 20, 10, 20),  # 4 part: 10/60 in whole 1, 40/60 in part 3 -- kept too
        _rect(h, w, 17, 20, 0, 4),  # 5 subpart inside part 2: dropped by a kept part
        _rect(h, w, 0, 4, 0, 4),  # 6 subpart inside whole 0: dropped
        _rect(h, w, 18, 20, 0, 20),  # 7 subpart: 20/40 in part 2 -> dropped
        _rect(h, w, 15, 16, 0, 10),  # 8 subpart, its own row, fully in part 2 -> dropped
    ])
    levels = [2, 2, 1, 1, 1, 0, 0, 0, 0]
    assert _filter(masks, levels) == [0, 1, 2, 3, 4] == reference_overlap_filter(masks, levels, 0.3)
    # two parts overlapping each other almost fully both survive (a sequential filter keeps only one)
    two = np.stack([_rect(10, 10, 0, 5, 0, 10), _rect(10, 10, 0, 5, 0, 9), _rect(10, 10, 6, 10, 0, 10)])
    assert _filter(two, [1, 1, 2]) == [0, 1, 2]
    # a part dropped by a whole does not count against the subparts; a kept part does
    m = np.stack([_rect(12, 12, 0, 6, 0, 12),  # 0 whole, top
                  _rect(12, 12, 0, 8, 0, 6),  # 1 part: 36/48 in whole 0 -> dropped
                  _rect(12, 12, 6, 12, 6, 12),  # 2 part, bottom right: free -> kept
                  _rect(12, 12, 6, 8, 0, 6),  # 3 subpart only inside the dropped part 1 -> kept
                  _rect(12, 12, 8, 12, 6, 12)])  # 4 subpart inside the kept part 2 -> dropped
    assert _filter(m, [2, 1, 1, 0, 0]) == [0, 2, 3] == reference_overlap_filter(m, [2, 1, 1, 0, 0], 0.3)
    # the threshold is strict: a part exactly 30 % covered is dropped
    m = np.stack([_rect(10, 10, 0, 3, 0, 10), _rect(10, 10, 0, 10, 0, 10)])
    assert _filter(m, [2, 1], 0.3) == [0] and _filter(m, [2, 1], 0.31) == [0, 1]
    # no wholes: every part stays (nothing to be covered by); subparts then test against the parts
    m = np.stack([_rect(8, 8, 0, 8, 0, 4), _rect(8, 8, 0, 8, 2, 8), _rect(8, 8, 0, 2, 0, 2)])
    assert _filter(m, [1, 1, 0]) == [0, 1]
    assert _filter(m[:0], []) == []


@pytest.mark.parametrize("seed", range(6))
def test_overlap_filter_equals_reference_loop(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(8, 30)), int(rng.integers(8, 30))
    masks = blobs(rng, int(rng.integers(3, 16)), h, w)  # a full mask, a random-pixel one, ellipses
    masks = masks[masks.reshape(len(masks), -1).any(1)]  # SAM gives no empty mask
    levels = rng.integers(0, 3, len(masks))
    for thresh in (0.1, 0.3, 0.6):
        assert _filter(masks, levels, thresh) == reference_overlap_filter(masks, levels, thresh)


def test_small_region_nms_uses_stock_scores():
    """After the clean-up, box NMS prefers unchanged masks (score 1) over changed ones (0), whatever their
    level: the whole bonus belongs to the per-crop NMS only."""
    whole = _rect(16, 16, 2, 14, 2, 14)
    whole[7, 7] = False  # a 1-px hole: the cleaning changes the whole
    part = _rect(16, 16, 2, 14, 2, 13)  # the same box but one column: unchanged
    far = _rect(16, 16, 0, 2, 0, 2)  # elsewhere: kept either way

    def mask_data(masks):
        return MaskData(runs=[MaskRuns.from_bool(m[None]) for m in masks], levels=torch.tensor([2, 1, 0]),
                        iou_preds=torch.tensor([0.9, 0.95, 0.9]), stability_score=torch.ones(3),
                        boxes=torch.zeros(3, 4), crop_boxes=torch.zeros(3, 4))

    # min area 4, NMS threshold max(box_nms_thresh, crop_nms_thresh) = 0.7
    out = MultiLevelMaskGenerator.postprocess_small_regions(mask_data([whole, part, far]), 4, 0.7)
    assert out["levels"].tolist() == [1, 0]
    np.testing.assert_array_equal(concat_runs(out["runs"]).to_bool(), np.stack([part, far]))
    # both unchanged: a tie on score, NMS keeps one of the two (torchvision's order), never both
    out = MultiLevelMaskGenerator.postprocess_small_regions(mask_data([_rect(16, 16, 2, 14, 2, 14), part, far]),
                                                            4, 0.7)
    assert len(out["levels"]) == 2


def test_whole_bonuses():
    iou = torch.tensor([0.8, 0.8, 0.8, 0.9])
    levels = torch.tensor([0, 1, 2, 1])
    assert passes_pred_iou(iou, levels, 0.86, 0.1).tolist() == [False, False, True, True]
    score = nms_score(iou, levels, 1.0)
    assert score[2] > score[3] > score[0]  # a whole beats a better-scored part in NMS


def test_remove_small_regions():
    m = _rect(12, 12, 2, 10, 2, 10)
    m[5, 5] = False  # a 1-px hole
    m[0, 11] = True  # a 1-px island
    filled, changed = remove_small_regions(m, 3, "holes")
    assert changed and filled[5, 5] and filled[0, 11]
    cleaned, changed = remove_small_regions(filled, 3, "islands")
    assert changed and not cleaned[0, 11] and cleaned[5, 5]
    assert not remove_small_regions(cleaned, 3, "islands")[1]
    only_small = np.zeros((6, 6), bool)
    only_small[0, 0] = only_small[3, 3] = only_small[3, 4] = True
    kept, _ = remove_small_regions(only_small, 5, "islands")  # every island small: the largest stays
    assert kept.sum() == 2 and kept[3, 3]


@pytest.fixture
def toy_params(tmp_path):
    return load_params("params/toy.yaml", {
        "data.root": str(tmp_path / "data"), "workdir": str(tmp_path / "work"),
        "data.synthetic.n_train": 4, "data.synthetic.n_val": 1,
        "data.synthetic.size_min": 64, "data.synthetic.size_max": 72,
        "sam.checkpoint": None,  # random init tiny SAM
        "masks.points_per_side": 4, "masks.points_per_batch": 8,
        "masks.pred_iou_thresh": 0.0, "masks.stability_score_thresh": 0.0,
    })


def test_interrupted_sharded_run_resumes(toy_params, monkeypatch, one_thread):
    calls = []
    real_generate = MultiLevelMaskGenerator.generate

    def counting_generate(self, image):
        if fail_after[0] is not None and len(calls) >= fail_after[0]:
            raise KeyboardInterrupt("simulated kill")
        calls.append(image.shape)
        return real_generate(self, image)

    monkeypatch.setattr(MultiLevelMaskGenerator, "generate", counting_generate)
    torch.manual_seed(0)
    model = load_sam_from_params(toy_params)
    fail_after = [None]
    cache = run_mask_stage(toy_params, "train", (0, 2), model=model)  # images 0 and 2
    assert len(calls) == 2 and len(cache.done_ids()) == 2
    fail_after[0] = 3  # shard 1/2 is killed after its first image
    with pytest.raises(KeyboardInterrupt):
        run_mask_stage(toy_params, "train", (1, 2), model=model)
    assert len(calls) == 3 and len(cache.done_ids()) == 3
    fail_after[0] = None
    run_mask_stage(toy_params, "train", (1, 2), model=model)  # resumes: only the unfinished image
    assert len(calls) == 4
    merged = run_mask_stage(toy_params, "train", (0, 1), model=model)  # all shards merged: nothing to do
    assert len(calls) == 4 and merged.dir == cache.dir
    assert merged.done_ids() == set(open_dataset(toy_params, "train").ids)
    ms = load_masks(merged, sorted(merged.done_ids())[0])
    assert len(ms) >= 1 and set(np.unique(ms.levels)) <= {0, 1, 2}
    assert ms.to_bool().shape[1:] == (ms.height, ms.width)
    with pytest.raises(FmalibError, match="no cached SAM masks"):
        load_masks(merged, "not-an-image")


def test_cache_key_follows_params(toy_params):
    a = mask_cache(toy_params, "train")
    b = mask_cache(load_params(dict(toy_params), {"masks.overlap_thresh": 0.5}), "train")
    assert a.dir != b.dir and a.dir == mask_cache(toy_params, "train").dir
    with pytest.raises(FmalibError, match="does not exist"):
        mask_cache(load_params(dict(toy_params), {"sam.model_type": "vit_h",
                                                   "sam.checkpoint": "/nonexistent/sam_vit_h.pth"}), "train")


class _PointsAsEmbeddings(torch.nn.Module):
    """Stands in for SAM's prompt encoder: hands the point coordinates through."""

    def forward(self, points, boxes, masks):
        return points[0].float(), None

    def get_dense_pe(self):
        return None


class _Discs(torch.nn.Module):
    """Stands in for SAM's mask decoder: output level l is a disc of radius radii[l] (input-frame pixels)
    around the prompt, with a fixed predicted IoU per level; steep logits, so masks are stable."""

    def __init__(self, size, radii, ious):
        super().__init__()
        self.size, self.radii, self.ious = size, torch.tensor(radii, dtype=torch.float32), torch.tensor(ious)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        low = self.size // 4
        centre = (torch.arange(low, dtype=torch.float32) + 0.5) * 4
        pts = sparse_prompt_embeddings[:, 0]
        d = torch.sqrt((centre[None, None, :] - pts[:, 0, None, None]) ** 2
                       + (centre[None, :, None] - pts[:, 1, None, None]) ** 2)  # (B, low, low)
        logits = 100 * (self.radii[None, :, None, None] - d[:, None])
        return logits, self.ious.expand(len(pts), 3).clone()


def _scripted_generator(radii, ious, **overrides):
    torch.manual_seed(0)
    model = load_sam_from_params(load_params("params/toy.yaml", {"sam.checkpoint": None}))
    model.prompt_encoder = _PointsAsEmbeddings()
    model.mask_decoder = _Discs(model.image_encoder.img_size, radii, ious)
    cfg = dict(load_params("params/toy.yaml").masks, points_per_side=4, points_per_batch=5,
               pred_iou_thresh=0.86, stability_score_thresh=0.92)
    cfg.update(overrides)
    return MultiLevelMaskGenerator(model, **{k: cfg[k] for k in MASK_KEYS})


def test_generator_levels_bonuses_and_filter_with_a_scripted_decoder(one_thread):
    image = np.full((96, 112, 3), 128, np.uint8)
    # part 0.85 fails the 0.86 threshold; whole 0.80 passes it thanks to the +0.1 bonus
    raw = _scripted_generator((4, 12, 30), (0.90, 0.85, 0.80)).generate_unfiltered(image)
    assert set(raw.levels.tolist()) == {0, 2}
    # part and whole nearly the same box: NMS keeps the whole (+1.0) over the better-scored part
    gen = _scripted_generator((4, 20, 22), (0.95, 0.99, 0.90))
    raw = gen.generate_unfiltered(image)
    assert 1 not in raw.levels.tolist() and (raw.levels == 2).sum() > 0
    # the overlap filter keeps every whole and no part/subpart >= 30 % inside a kept mask
    gen = _scripted_generator((5, 14, 40), (0.95, 0.95, 0.95), box_nms_thresh=0.9)
    raw, kept = gen.generate_unfiltered(image), gen.generate(image)
    assert (kept.levels == 2).sum() == (raw.levels == 2).sum() and len(kept) < len(raw)
    flat = kept.to_bool().reshape(len(kept), -1).astype(np.int64)
    inter, areas = flat @ flat.T, flat.sum(1)
    for i in np.flatnonzero(kept.levels < 2):  # parts vs wholes, subparts vs wholes + kept parts
        others = np.flatnonzero(kept.levels > kept.levels[i])
        assert (inter[i, others] / areas[i]).max(initial=0) < 0.3
    dense = raw.to_bool()
    want = reference_overlap_filter(dense, raw.levels, 0.3)
    np.testing.assert_array_equal(kept.to_bool(), dense[want])
    # one crop layer: crops are prompted too and their masks come back in image coordinates
    crops = _scripted_generator((3, 6, 9), (0.95, 0.95, 0.95), crop_n_layers=1).generate_unfiltered(image)
    assert len(crops) > 0 and crops.to_bool().shape == (len(crops), 96, 112)


def test_generator_is_the_stock_generator_without_the_bonuses(one_thread):
    """A SamAutomaticMaskGenerator subclass; with both whole bonuses at 0 (and no crops, no clean-up) its
    masks are the stock generator's, with the same predicted IoU and stability (the stock keeps them in NMS
    score order, ours in generation order)."""
    gen = _scripted_generator((5, 14, 40), (0.95, 0.93, 0.97), box_nms_thresh=0.9, whole_iou_bonus=0.0,
                              whole_nms_bonus=0.0, min_mask_region_area=0)
    assert isinstance(gen, SamAutomaticMaskGenerator)
    stock = SamAutomaticMaskGenerator(gen.predictor.model, points_per_side=4, points_per_batch=5,
                                      pred_iou_thresh=0.86, stability_score_thresh=0.92, box_nms_thresh=0.9,
                                      crop_n_layers=0)
    image = np.full((96, 112, 3), 128, np.uint8)
    ours, theirs = gen.generate_unfiltered(image), stock.generate(image)
    assert len(ours) == len(theirs) > 3 and set(ours.levels.tolist()) == {0, 1, 2}

    def key(mask, iou, stability):
        return np.packbits(mask).tobytes(), round(float(iou), 6), round(float(stability), 6)

    assert sorted(key(*t) for t in zip(ours.to_bool(), ours.scores, ours.stability)) == sorted(
        key(r["segmentation"], r["predicted_iou"], r["stability_score"]) for r in theirs)


def test_nms_survivors_keep_score_order():
    """Stock SAM and the original keep torchvision's NMS output as it is: highest score first (SAMS paints
    ties in this order)."""
    from fmalib.method.generator import box_nms

    boxes = torch.tensor([[0, 0, 4, 4], [10, 10, 14, 14], [20, 20, 24, 24], [0, 0, 4, 5]], dtype=torch.float32)
    scores = torch.tensor([0.2, 0.9, 0.5, 0.3])
    assert box_nms(boxes, scores, 0.7).tolist() == [1, 2, 3]  # box 0 overlaps the higher-scored box 3
