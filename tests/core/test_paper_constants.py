"""The paper's constants in params/voc.yaml and params/coco.yaml, pinned against a table that cites, for each,
the file of the original (HAL-42/FMA-WSSS at 112437e, its AlchemyCat library, linyq2117/CLIP-ES) that sets
it. A change to a default or to either file that moves one of these values fails here, naming its source."""
import pytest

from fmalib.core.params import load_params

FMA = "HAL-42/FMA-WSSS "
VOC = [  # (dotted key, value, where the original sets it)
    ("prompts.cls.iters", 1800, FMA + "configs/VOC/cls/cfg.py (max_iter = 500 + 1300)"),
    ("prompts.cls.init_std", 0.015, FMA + "configs/VOC/cls/cfg.py (ctx_std)"),
    ("prompts.n_ctx", 16, FMA + "configs/VOC/seg/cfg.py (n_ctx)"),
    ("prompts.seg.layout", "specific_front", FMA + "configs/VOC/seg/cfg.py (csc=True, cls_token_pos='front')"),
    ("prompts.seg.init_std", 0.0125, FMA + "configs/clip_cam/_patches/ref/coop_ctx-·125初/base.py"),
    ("prompts.crop_size", 224, FMA + "configs/clip_cam/base.py (scale_crop_method.crop_size)"),
    ("prompts.long_side", [288, 480], FMA + "configs/clip_cam/base.py (low_size, high_size)"),
    ("prompts.color_jitter.brightness", 25.0, "HAL-42/AlchemyCat alchemy_cat/data/plugins/augers.py "
                                              "(RandColorJitter defaults, used by src/libs/data/voc_auger.py)"),
    ("prompts.color_jitter.contrast", [0.6, 1.4], "AlchemyCat RandColorJitter (range_mul_contract)"),
    ("prompts.color_jitter.saturation", [0.5, 1.5], "AlchemyCat RandColorJitter (range_mul_saturate)"),
    ("prompts.color_jitter.hue", 25.0, "AlchemyCat RandColorJitter (max_delta_hue)"),
    ("prompts.color_jitter.p", 0.5, "AlchemyCat RandColorJitter (jitter_prob)"),
    ("cam.caa_last_k", 8, FMA + "configs/aff_voc/base.py (last_n_layers)"),
    ("cam.caa_threshold.cls", 0.4, FMA + "configs/aff_voc/base.py (aff_mask thresh)"),
    ("cam.sinkhorn_iters.cls", 1, FMA + "configs/VOC/cls/infer/final/affx2,at_score,att2affx1 (att2affx1)"),
    ("cam.caa_source.cls", "normalized", FMA + "configs/VOC/cls/infer/final/affx2,at_score,att2affx1 (at_score)"),
    ("cam.caa_threshold.seg", 0.5, FMA + "configs/VOC/seg/infer/final/affx2,at_cam,attx1,·5thresh"),
    ("cam.sinkhorn_iters.seg", 1, FMA + "configs/VOC/seg/infer/final/affx2,at_cam,attx1,·5thresh (attx1)"),
    ("cam.caa_source.seg", "raw", FMA + "configs/VOC/seg/infer/final/affx2,at_cam,attx1,·5thresh (at_cam)"),
    ("cam.sinkhorn_iters.hand", 3, "linyq2117/CLIP-ES generate_cams_voc12.py (one normalisation pair, then two more)"),
    ("cam.use_caa.cls", True, FMA + "configs/VOC/cls/infer/final/.../ann,affed (seeds from cam_affed)"),
    ("cam.use_caa.seg", True, FMA + "configs/VOC/seg/infer/final/.../ann,affed (seeds from cam_affed)"),
    ("prompts.cls.sub_batches", 1, FMA + "configs/clip_cam/base.py (sub_iter_num)"),
    ("prompts.cls.cam_iter", None, FMA + "configs/VOC/cls/infer/final (the final checkpoint)"),
]
COCO = [
    ("prompts.cls.iters", 20500, FMA + "configs/COCO/cls/cfg.py (max_iter = 500 + 4 * 5000)"),
    ("prompts.cls.warmup_iters", 1000, FMA + "configs/clip_cam/_patches/coco.py (warm_iters)"),
    ("prompts.cls.sub_batches", 4, FMA + "configs/clip_cam/coco,cl_loss/scale/base.py (sub_iter_num)"),
    ("prompts.cls.cam_iter", 6150, FMA + "configs/COCO/cls/infer/6150/cfg.py (iter-6150.pth)"),
    ("prompts.seg.iters", 75000, FMA + "configs/COCO/seg/cfg.py (max_iter)"),
    ("prompts.seg.sub_batches", 8, FMA + "configs/COCO/seg/cfg.py (sub_iter_num)"),
    ("prompts.seg.cam_iter", 45000, FMA + "configs/COCO/seg/infer/45k/cfg.py (iter-45000.pth)"),
    ("prompts.seg.layout", "shared_end", FMA + "configs/COCO/seg/cfg.py (csc=False, cls_token_pos='end')"),
    ("prompts.long_side", [318, 530], FMA + "configs/patterns/aug/coco_rand_range.py: round(224 * 1.42) to "
                                            "round(224 * 1.42 * 5/3), ratio from configs/COCO/cls/cfg.py"),
    ("cam.caa_threshold.cls", 0.6, FMA + "configs/aff_voc/coco/att1次,·6阈,aff2次,at_cam.py (thresh .6)"),
    ("cam.caa_source.cls", "raw", FMA + "configs/aff_voc/coco/att1次,·6阈,aff2次,at_cam.py (aff_at 'cam')"),
    ("cam.sinkhorn_iters.cls", 1, FMA + "configs/aff_voc/coco/att1次,·6阈,aff2次,at_cam.py (n_iter = 1)"),
    ("cam.use_caa.cls", True, FMA + "configs/COCO/cls/infer/6150/aff/ann/cfg.py (cam_affed)"),
    ("cam.use_caa.seg", False, FMA + "configs/COCO/seg/infer/45k/ann/cfg.py (cam, not cam_affed)"),
    ("classes.synonyms.0", "person with clothes,people,human", FMA + "configs/patterns/coco_names/clip_es.py"),
    ("classes.synonyms.31", "sknowboard", FMA + "configs/patterns/coco_names/clip_es.py (its spelling)"),
    ("classes.synonyms.78", "hairdrier,blowdrier", FMA + "configs/patterns/coco_names/clip_es.py"),
    ("classes.bg_words.13", "helmet", FMA + "configs/COCO/seg/cfg.py (VOC's list without keyboard and sign)"),
]


def _get(params, dotted: str):
    node = params.to_dict()
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("name, table", [("voc", VOC), ("coco", COCO)])
def test_real_params_hold_the_originals_constants(name, table):
    params = load_params(f"params/{name}.yaml")
    wrong = [f"{key} = {_get(params, key)!r}, the original's {value!r} ({source})" for key, value, source in table
             if _get(params, key) != value]
    assert not wrong, "\n".join(wrong)
    if name == "coco":
        assert len(params.classes.synonyms) == 80 and len(params.classes.bg_words) == 23
