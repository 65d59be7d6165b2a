"""Pretrain a tiny CLIP (``clip.model``: one of fmalib's packaged configs) on generated images of the benchmark.

What the method needs from CLIP is (1) hand-prompt scores that rank images by class and (2) patch tokens
that localise classes where the original's Grad-CAM looks: the output of the last block's ``ln_1``. A plain
caption-contrastive run on 2 CPU cores learns the background textures and not the shapes (DESIGN "What a CPU
can pretrain"), so the recipe adds, on the same images and the same text tower:

- **caption InfoNCE**: image ↔ caption naming the objects only (``"two stars and a boat"``, no stuff
  words), random caption template; images with the same object set are all positives (multi-positive
  targets), so the batch's negatives differ only in their objects — the hard negatives.
- **concept sigmoid loss** (SigLIP-style, multi-positive): image embedding vs one prompt per concept (6
  object classes + 6 stuff names, a random one of ``concept_templates`` each step, never the study's hand
  template); targets from the caption's concept set, stuff included so bg prompts mean something.
- **patch loss** vs the same concept prompts: ``mil_value`` (the default) and ``mil`` use image labels only —
  per-patch softmax over concepts, max over patches vs the concept set — on the projected patch tokens and,
  for ``mil_value``, also on the last block's value path (``models.clip.last_block_value_tokens``): a Grad-CAM at
  ``ln_1``'s output reaches a patch only through that path, so this trains the property the method reads.
  ``dense`` (the first tiny CLIP's, params ``variants.first_tiny_clip``) = soft per-patch concept fractions from
  the generator's masks: supervision no real CLIP had; its localisation lived in the residual stream.

``pool`` picks the embedding the caption and concept losses train: docs/method.md §1's mean of projected patch tokens
(``patch_mean``; the configs' ``pool_type: avg``, so open_clip's own ``encode_image`` equals it), the class
token (ViT-B/16's own pretraining) or both. Images come from a fixed pool drawn once (indices outside the
benchmark's splits), bucketed by size (the benchmark's 112–128 px, multiples of 8); a step's batch, flips and
templates are a function of (seed, step) only, so resuming from a checkpoint gives the same bytes as a straight
run. ``python -m fmalib.pretrain.clip --params params/toy.yaml [--variant first_tiny_clip]``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..core.cache import atomic_save_npz, atomic_write_bytes, load_npz, stable_hash, torch_bytes
from ..core.code_key import code_digest
from ..core.device import seed_everything
from ..core.errors import FmalibError
from ..core.label_ids import IGNORE
from ..core.params import Params, load_params, repo_root, with_variant
from ..data.synthetic import (CLASS_NAMES, STUFF_NAMES, check_outside_splits, generate_sample,
                              make_caption, sample_ids, sample_size, split_sizes)
from ..models import clip as C
from .clip_quality import cam_peak_hit_rate, zero_shot_map

log = logging.getLogger(__name__)

PATCH_LOSSES = ("dense", "mil", "mil_value", "none")  # foundation.clip.patch_loss's choices (core/config.py)

CAPTION_TEMPLATES = ("{}", "a photo of {}.", "a picture with {}.", "an image of {}.", "{} in the scene.")


def pretrain_config(params: Params) -> dict:
    """foundation.clip of ``params``, checked key by key (names the file and dotted key on error)."""
    where = str(params.path or "params")
    if params["data"]["kind"] != "synthetic":
        raise FmalibError(f"{where}: CLIP pretraining needs data.kind: synthetic (got {params['data']['kind']!r})")
    if params["clip"]["model"] not in C.packaged_configs():
        raise FmalibError(f"{where}: CLIP pretraining trains one of fmalib's packaged configs "
                          f"({', '.join(C.packaged_configs())}) as clip.model, not {params['clip']['model']!r}")
    cfg = params["foundation"]["clip"]
    check_outside_splits(cfg["pool_offset"], cfg["pool_size"], split_sizes(params), f"{where}: foundation.clip.pool_offset")
    if not cfg["concept_templates"] or any("{}" not in t for t in cfg["concept_templates"]):
        raise FmalibError(f"{where}: foundation.clip.concept_templates must be a non-empty list of templates "
                          f"with a {{}} for the concept name")
    if params["prompts"]["hand_template"] in cfg["concept_templates"]:  # the first tiny CLIP's recipe did this
        log.warning("%s: foundation.clip.concept_templates holds the study's hand template %r: the hand-prompt "
                    "baseline is then a pretraining template", where, params["prompts"]["hand_template"])
    return dict(cfg)


# ------------------------------------------------------------------------------------------------ data

def concept_names() -> list[str]:
    """6 object classes then 6 stuff names: the concepts the loss scores."""

    return list(CLASS_NAMES) + list(STUFF_NAMES)


def patch_fractions(sample, patch: int) -> np.ndarray:
    """float16 (h, w, K) fraction of each patch's labelled pixels per concept (objects over stuff; the 255
    boundary band ignored; all zeros for a patch of boundary only)."""

    h, w = sample.semantic.shape
    k = len(CLASS_NAMES) + len(STUFF_NAMES)
    concept = np.full((h, w), k, np.int64)  # k = ignore
    for name, m in sample.stuff:
        concept[m] = len(CLASS_NAMES) + STUFF_NAMES.index(name)
    fg = (sample.semantic > 0) & (sample.semantic != IGNORE)
    concept[fg] = sample.semantic[fg].astype(np.int64) - 1
    concept[sample.semantic == IGNORE] = k
    onehot = np.eye(k + 1, dtype=np.float32)[concept][..., :k]
    counts = onehot.reshape(h // patch, patch, w // patch, patch, k).sum(axis=(1, 3))
    return (counts / np.maximum(counts.sum(-1, keepdims=True), 1)).astype(np.float16)


def _pool_item(args) -> tuple:

    seed, index, size_range, patch = args
    hw = sample_size(seed, index, size_range)
    s = generate_sample(seed, index, hw)
    objects = np.zeros(3, np.int8)  # instance class ids in caption order, 0-padded
    ids = [inst.class_id for inst in s.instances][:3]
    objects[: len(ids)] = ids
    concepts = np.zeros(len(concept_names()), np.uint8)
    for c in ids:
        concepts[c - 1] = 1
    n_fg = len(concepts) - len(STUFF_NAMES)
    for name, m in s.stuff:
        if m.any():
            concepts[n_fg + STUFF_NAMES.index(name)] = 1
    return hw, s.image, patch_fractions(s, patch), objects, concepts


def build_pool(seed: int, offset: int, n: int, size_range: tuple[int, int], patch: int, workers: int = 1) -> dict:
    """{(H, W): dict(image, frac, objects, concepts)} arrays per size bucket, in index order."""
    jobs = [(seed, offset + i, size_range, patch) for i in range(n)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            items = list(tqdm(pool.imap(_pool_item, jobs, chunksize=32), total=n, desc="clip pretrain pool"))
    else:
        items = [_pool_item(j) for j in tqdm(jobs, desc="clip pretrain pool")]
    buckets: dict[tuple, list] = {}
    for it in items:
        buckets.setdefault(it[0], []).append(it[1:])
    return {hw: {"image": np.stack([b[0] for b in v]), "frac": np.stack([b[1] for b in v]),
                 "objects": np.stack([b[2] for b in v]), "concepts": np.stack([b[3] for b in v])}
            for hw, v in sorted(buckets.items())}


def cached_pool(cfg: dict, params: Params, cache_dir: Path, workers: int) -> dict:
    """``build_pool`` once per settings; stored as one npz under the run's cache dir."""

    syn = params["data"]["synthetic"]
    key = dict(seed=syn["seed"], offset=cfg["pool_offset"], n=cfg["pool_size"], lo=syn["size_min"],
               hi=syn["size_max"], patch=8, code=code_digest("fmalib.data.synthetic"))
    path = cache_dir / f"pool-{stable_hash(key)}.npz"
    if path.is_file():
        flat = load_npz(path)
    else:
        pool = build_pool(syn["seed"], cfg["pool_offset"], cfg["pool_size"], (syn["size_min"], syn["size_max"]),
                          8, workers)
        flat = {f"{h}x{w}/{k}": v for (h, w), b in pool.items() for k, v in b.items()}
        atomic_save_npz(path, **flat)
        log.info("cached the CLIP pretraining pool (%d images) at %s", cfg["pool_size"], path)
    pool: dict[tuple, dict] = {}
    for name, arr in flat.items():
        size, field = name.split("/")
        h, w = (int(v) for v in size.split("x"))
        pool.setdefault((h, w), {})[field] = arr
    return pool


def object_caption(objects: np.ndarray) -> str:

    return make_caption([int(c) for c in objects if c > 0])


def make_batch(pool: dict, step: int, seed: int, batch_size: int, mean, std, templates: Sequence[str]) -> dict:
    """The batch of ``step``: a size bucket (∝ its count), images, flips and templates from (seed, step)."""
    rng = np.random.default_rng([seed, step, 7])
    sizes = list(pool)
    counts = np.array([len(pool[s]["image"]) for s in sizes], np.float64)
    bucket = pool[sizes[rng.choice(len(sizes), p=counts / counts.sum())]]
    idx = np.sort(rng.choice(len(bucket["image"]), min(batch_size, len(bucket["image"])), replace=False))
    flip = rng.random(len(idx)) < 0.5
    img = bucket["image"][idx].copy()
    frac = bucket["frac"][idx].astype(np.float32)
    img[flip] = img[flip][:, :, ::-1]
    frac[flip] = frac[flip][:, :, ::-1]
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    objects = bucket["objects"][idx]
    captions = [CAPTION_TEMPLATES[t].format(object_caption(o))
                for o, t in zip(objects, rng.integers(len(CAPTION_TEMPLATES), size=len(idx)))]
    sets = [frozenset(int(c) for c in o if c > 0) for o in objects]
    same = torch.tensor([[a == b for b in sets] for a in sets], dtype=torch.float32)
    prompts = [templates[t].format(n)
               for n, t in zip(concept_names(), rng.integers(len(templates), size=len(concept_names())))]
    return {"x": x, "frac": torch.from_numpy(frac), "concepts": torch.from_numpy(bucket["concepts"][idx]).float(),
            "captions": captions, "same": same, "prompts": prompts}


# ------------------------------------------------------------------------------------------------ losses

class Heads(torch.nn.Module):
    """Training-only sigmoid scale/bias pairs (SigLIP init); not part of the saved CLIP."""

    def __init__(self):
        super().__init__()
        self.concept = torch.nn.Parameter(torch.tensor([math.log(10.0), -5.0]))
        self.patch = torch.nn.Parameter(torch.tensor([math.log(10.0), 0.0]))


def step_losses(model, heads: Heads, tokenizer, batch: dict, patch_loss: str, pool: str = "patch_mean") -> dict:
    """The batch's losses. ``pool``: the image embedding(s) the caption and concept losses train — the patch
    mean the method scores with, the class token (as ViT-B/16 was trained: its last blocks' attention must
    then carry the class evidence from the patches, which is where the ln_1 Grad-CAM target looks), or the
    mean of both losses."""
    out = C.encode_image_tokens(model, batch["x"])
    tokens = out.patch_embed.flatten(1, 2)  # (B, N, D)
    text = F.normalize(model.encode_text(tokenizer(batch["captions"] + batch["prompts"])), dim=-1)
    cap, con = text[: len(batch["captions"])], text[len(batch["captions"]):]
    scale = model.logit_scale.exp().clamp(max=100)
    target = batch["same"] / batch["same"].sum(1, keepdim=True)  # same object set = positive
    y = batch["concepts"]
    embeds = {"patch_mean": [out.image_embed], "class_token": [out.class_embed],
              "both": [out.image_embed, out.class_embed]}[pool]
    caption = concept = 0.0
    for emb in embeds:
        img = F.normalize(emb, dim=-1)
        logits = scale * img @ cap.T
        caption = caption + 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean()
                                   - (target * logits.T.log_softmax(1)).sum(1).mean())
        z = heads.concept[0].exp() * img @ con.T + heads.concept[1]
        concept = concept + F.binary_cross_entropy_with_logits(z, y)
    losses = {"caption": caption / len(embeds), "concept": concept / len(embeds)}
    if patch_loss == "dense":
        zp = heads.patch[0].exp() * F.normalize(tokens, dim=-1) @ con.T  # (B, N, K)
        frac = batch["frac"].flatten(1, 2)
        valid = frac.sum(-1) > 0
        losses["patch"] = -(frac * zp.log_softmax(-1)).sum(-1)[valid].mean()
    elif patch_loss in ("mil", "mil_value"):
        # image labels only: some patch is each present concept, no patch is an absent one. mil_value also asks
        # it of the last block's value path (the tokens a Grad-CAM at its ln_1 output weighs)
        sets = [tokens] + ([C.last_block_value_tokens(model, out.block_input)] if patch_loss == "mil_value" else [])
        losses["patch"] = sum(F.binary_cross_entropy(
            (heads.patch[0].exp() * F.normalize(t, dim=-1) @ con.T).softmax(-1).amax(1).clamp(1e-6, 1 - 1e-6), y)
            for t in sets) / len(sets)
    return losses


# ------------------------------------------------------------------------------------------------ loop

def lr_at(step: int, cfg: dict) -> float:
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    t = (step - cfg["warmup_steps"]) / max(1, cfg["steps"] - cfg["warmup_steps"])
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model, heads: Heads, weight_decay: float) -> list[dict]:
    """No decay on gains, biases, embeddings and temperatures (open_clip's training convention)."""
    decay, no_decay = [], []
    for name, p in list(model.named_parameters()) + [("heads." + n, p) for n, p in heads.named_parameters()]:
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.startswith("heads.")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def state_bytes(model, fp16: bool) -> bytes:
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    return torch_bytes(state)


def val_set(params: Params, n: int) -> tuple[list, list, list]:
    """First ``n`` val images, labels and GT exactly as the benchmark writes them (no disk needed)."""

    syn = params["data"]["synthetic"]
    rng = (syn["size_min"], syn["size_max"])
    samples = [generate_sample(syn["seed"], idx, sample_size(syn["seed"], idx, rng))
               for _, idx in sample_ids("val", min(n, syn["n_val"]))]
    return [s.image for s in samples], [list(s.labels) for s in samples], [s.semantic for s in samples]


def evaluate(model, tokenizer, params: Params, val: tuple) -> dict:

    names, bg = params["classes"]["synonyms"], params["classes"]["bg_words"]
    was = model.training
    model.eval()
    try:
        zs = zero_shot_map(model, tokenizer, val[0], val[1], names)
        cam = cam_peak_hit_rate(model, tokenizer, val[0], val[1], val[2], names, bg)  # the original's ln1_out
        residual = cam_peak_hit_rate(model, tokenizer, val[0], val[1], val[2], names, bg, target_layer="block_input")
    finally:
        model.train(was)
    return {"map": zs["map"], "ap": zs["ap"], "hit_rate": cam["hit_rate"], "hit_chance": cam["chance"],
            "hit_per_class": cam["per_class"], "hit_rate_block_input": residual["hit_rate"], "n_images": len(val[0])}


def pretrain_run_dir(params: Params, cfg: dict) -> Path:
    """``workdir/foundation_clip/<key>``: the resumable state of one pretraining, keyed by what changes the
    weights (not where they are saved, in which precision, or how often it checkpoints and evaluates)."""
    key = {k: v for k, v in cfg.items() if k not in ("output", "fp16", "checkpoint_every_s", "eval_every", "eval")}
    key |= {"data": params["data"]["synthetic"], "templates": CAPTION_TEMPLATES, "model": params["clip"]["model"],
            "code": code_digest("fmalib.pretrain.clip")}  # not __name__: run as __main__ too
    return params.resolve_path("workdir") / "foundation_clip" / stable_hash(key)


def pretrain_clip(params: Params, steps: int | None = None, output: str | None = None, evaluate_end: bool = True,
                  workers: int = 1) -> dict:
    """Train (resuming from the run's last checkpoint), save the weights to ``output``, evaluate on val."""
    cfg = pretrain_config(params)
    if steps is not None:
        cfg["steps"] = int(steps)
    out_path = Path(output or cfg["output"])
    out_path = out_path if out_path.is_absolute() else repo_root() / out_path
    cache_dir = params.resolve_path("workdir") / "foundation_clip"
    run_dir = pretrain_run_dir(params, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"

    seed_everything(cfg["seed"])
    torch.set_flush_denormal(True)  # measured: denormal values made steps 2.2x slower from about step 100 on
    model = C.build_clip(params["clip"]["model"])
    model.train()
    heads = Heads()
    tokenizer = C.get_tokenizer(params["clip"]["model"])
    mean, std = C.image_normalization(model)
    opt = torch.optim.AdamW(param_groups(model, heads, cfg["weight_decay"]), lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
    start, history, train_s = 0, [], 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        heads.load_state_dict(ck["heads"])
        opt.load_state_dict(ck["opt"])
        start, history, train_s = ck["step"], ck["history"], ck["train_s"]
        log.info("resuming CLIP pretraining from step %d (%s)", start, ckpt_path)

    pool = cached_pool(cfg, params, cache_dir, workers)
    val = val_set(params, cfg["eval"]["n_images"])
    quick_val = tuple(v[: min(100, len(v))] for v in val)

    def save_checkpoint(step: int) -> None:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                    "step": step, "history": history, "train_s": train_s}, buf)
        atomic_write_bytes(ckpt_path, buf.getvalue())
        log.info("checkpoint at step %d -> %s", step, ckpt_path)

    last_ckpt = time.time()
    n_images = 0
    t0 = time.time()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], desc="clip pretrain")
    for step in bar:
        ts = time.time()
        batch = make_batch(pool, step, cfg["seed"], cfg["batch_size"], mean, std, cfg["concept_templates"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        losses = step_losses(model, heads, tokenizer, batch, cfg["patch_loss"], cfg["pool"])
        total = (cfg["caption_weight"] * losses["caption"] + cfg["concept_weight"] * losses["concept"]
                 + cfg["patch_weight"] * losses.get("patch", torch.zeros(())))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        train_s += time.time() - ts
        n_images += len(batch["x"])
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        if step % 20 == 0:
            log.info("step %d %s lr %.2e %.1f img/s", step, " ".join(f"{k} {v.item():.4f}" for k, v in losses.items()),
                     lr_at(step, cfg), n_images / max(1e-9, time.time() - t0))
        done = step + 1
        if cfg["eval_every"] and done % cfg["eval_every"] == 0 and done < cfg["steps"]:
            q = evaluate(model, tokenizer, params, quick_val)
            history.append({"step": done, "map": q["map"], "hit_rate": q["hit_rate"],
                            "hit_rate_block_input": q["hit_rate_block_input"], "train_s": train_s})
            log.info("eval step %d (%d val images): mAP %.3f hit %.3f (block_input %.3f)", done, q["n_images"],
                     q["map"], q["hit_rate"], q["hit_rate_block_input"])
        if time.time() - last_ckpt > cfg["checkpoint_every_s"] and done < cfg["steps"]:
            save_checkpoint(done)
            last_ckpt = time.time()
    if start < cfg["steps"]:
        save_checkpoint(cfg["steps"])

    model.eval()
    data = state_bytes(model, cfg["fp16"])
    atomic_write_bytes(out_path, data)
    log.info("wrote %s (%.1f MB)", out_path, len(data) / 1e6)
    report = {"output": str(out_path), "size_mb": len(data) / 1e6, "steps": cfg["steps"],
              "batch_size": cfg["batch_size"], "train_s": train_s,
              "img_per_s": cfg["steps"] * cfg["batch_size"] / max(train_s, 1e-9), "history": history,
              "threads": torch.get_num_threads()}
    if evaluate_end:
        loaded = C.load_clip(params["clip"]["model"], out_path)  # what users get: the file through open_clip's loader
        report["val"] = evaluate(loaded, tokenizer, params, val)
        log.info("val (%d images): mAP %.3f, CAM peak hit %.3f (chance %.3f)", report["val"]["n_images"],
                 report["val"]["map"], report["val"]["hit_rate"], report["val"]["hit_chance"])
    atomic_write_bytes(run_dir / "report.json", json.dumps(report, indent=1).encode())
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--steps", type=int, default=None, help="override foundation.clip.steps (smoke runs)")
    ap.add_argument("--output", default=None, help="override foundation.clip.output")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the CPU is shared)")
    ap.add_argument("--workers", type=int, default=1, help="processes generating the image pool")
    ap.add_argument("--variant", default=None, help="apply the params' variants.<name> first (e.g. first_tiny_clip)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=YAML",
                    help="dotted params override, e.g. foundation.clip.patch_loss=mil")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.override)}
    params = load_params(args.params)
    if args.variant:
        params = with_variant(params, args.variant)
    if overrides:
        path, params = params.path, load_params(params.to_dict(), overrides)
        params.path = path
    report = pretrain_clip(params, args.steps, args.output,
                           evaluate_end=not args.no_eval, workers=args.workers)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
