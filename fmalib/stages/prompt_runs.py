"""Where trained prompts live: the key of a prompt-training run (its directory under ``workdir/prompts_<kind>``),
the finished run's context file, and context files written and read back. Apart from the training loop
(``fmalib.stages.prompts``) so that the stages reading trained prompts (the CAM stage) do not hold the loop's code
in their cache keys — their keys hold the context file's content instead."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..core.cache import StageCache, atomic_torch_save, dir_fingerprint, stray_files
from ..core.device import get_device
from ..core.errors import FmalibError
from ..data import with_classes
from ..data.fingerprint import split_key
from ..method.prompts import KINDS, ClsPromptLearner, HandPrompts, PromptSet, SegPromptLearner
from ..models import clip as C
from ..models.checkpoints import clip_fingerprint
from .shards import fill_command

log = logging.getLogger(__name__)

TRAINED_KINDS = ("cls", "seg")
TRAINER = "fmalib.stages.prompts"  # the module whose code a training run's key holds


def train_cache(params, kind: str, seeds_dir: str | Path | None = None) -> StageCache:
    """Output dir of a training run: keyed by everything that changes its result."""
    if kind not in TRAINED_KINDS:
        raise FmalibError(f"prompt kind {kind!r}; expected one of {TRAINED_KINDS}")
    pr = params["prompts"]
    device = get_device(params["device"]).type
    # not the other kind's settings, the CLIP-ES template, checkpoint spacing or loader workers; AMP only
    # acts on CUDA
    common = {k: v for k, v in pr.items() if k not in TRAINED_KINDS + ("hand_template", "ckpt_every", "num_workers", "amp")}
    common["amp"] = bool(pr["amp"]) and device == "cuda"
    seeds = None
    if kind == "seg":
        if seeds_dir is None:
            raise FmalibError("train_prompts(kind='seg') needs seeds_dir: a folder of <image id>.png seed maps")
        seeds_dir = Path(seeds_dir)
        if not seeds_dir.is_dir():
            raise FmalibError(f"seeds_dir {seeds_dir} does not exist (expected <image id>.png seed label maps)")
        seeds = dir_fingerprint(seeds_dir)
        stray = stray_files(seeds_dir)
        if stray:
            log.warning("seeds folder %s holds %d hidden or temporary file(s), not part of its fingerprint (left by "
                        "an interrupted write?): %s", seeds_dir, len(stray), ", ".join(p.name for p in stray[:5]))
    key = {"kind": kind, "prompts": common, "schedule": pr[kind], "classes": params["classes"],
           "clip": clip_fingerprint(params), "data": split_key(params, params["data"]["train_split"]),
           "seed": int(params["seed"]), "seeds": seeds, "device": device}
    if kind == "seg":  # the seg loss differentiates Grad-CAMs of this target
        key["cam_target"] = params["cam"]["target"]
        key["cam_target_layer"] = params["cam"]["target_layer"]
    return StageCache(params.resolve_path("workdir"), f"prompts_{kind}", key, code=TRAINER)


def cam_context(out: Path, params, kind: str) -> Path:
    """The context file the CAM stage reads from a run dir: after ``prompts.<kind>.cam_iter`` iterations
    (``context_at_<n>.pt``) or, when that is null or the last iteration, the finished run's ``context.pt``."""
    cam_iter, iters = params["prompts"][kind]["cam_iter"], int(params["prompts"][kind]["iters"])
    return out / (f"context_at_{int(cam_iter)}.pt" if cam_iter is not None and cam_iter < iters else "context.pt")


def trained_context_path(params, kind: str, seeds_dir: str | Path | None = None) -> Path:
    """The contexts that give the CAMs of the finished ``train_prompts(params, kind, seeds_dir)`` run
    (``cam_context``); an error if not trained."""
    run_dir = train_cache(params, kind, seeds_dir).dir
    path = cam_context(run_dir, params, kind)
    if not path.is_file() or not (run_dir / "context.pt").is_file():
        why = "none trained on these seeds (new or changed coarse seeds?)" if kind == "seg" else "not trained"
        raise FmalibError(f"no trained {kind} prompts at {path}: {why}; run `{fill_command(params, 'prompts')}` "
                          f"(with this run's --set / --fast options) or fmalib.stages.prompts.train_prompts(params, "
                          f"{kind!r}{', seeds_dir=...' if kind == 'seg' else ''}) first")
    return path


def save_context(prompts: PromptSet, path: str | os.PathLike, **meta) -> Path:
    """Contexts only (+ small metadata), written atomically."""
    return atomic_torch_save(path, {"state": prompts.context_state(), "texts": prompts.texts, **meta})


def load_context(prompts: PromptSet, path: str | os.PathLike) -> PromptSet:
    """Load contexts saved by ``save_context`` (or a training checkpoint) into ``prompts``."""
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"prompt context file {path} does not exist (train the prompts first: "
                          f"fmalib.stages.prompts.train_prompts)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise FmalibError(f"prompt context file {path} has no 'state' mapping of context tensors")
    own = prompts.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in own.items()}
        raise FmalibError(f"prompt context file {path} holds {got}; these prompts expect {want} "
                          f"(another prompt kind, class list or n_ctx?)")
    prompts.load_state_dict(state)
    return prompts


def build_prompts(kind: str, model, params, seed: int | None = None) -> PromptSet:
    """The prompt set ``kind`` (hand | cls | seg) that ``params.classes`` and ``params.prompts`` describe."""
    if kind not in KINDS:
        raise FmalibError(f"prompt kind {kind!r}; expected one of {KINDS}")
    params = with_classes(params)
    names, bg, pr = list(params["classes"]["synonyms"]), list(params["classes"]["bg_words"]), params["prompts"]
    tok = C.get_tokenizer(params["clip"]["model"])
    seed = int(params["seed"] if seed is None else seed)
    if kind == "hand":
        return HandPrompts(model, tok, names, bg, pr["hand_template"])
    if kind == "cls":
        return ClsPromptLearner(model, tok, names, bg, pr["n_ctx"], pr["cls"]["init_std"], seed)
    if pr["seg"]["layout"] == "shared_end":  # the original's COCO seg prompts: the cls layout, its own training
        return ClsPromptLearner(model, tok, names, bg, pr["n_ctx"], pr["seg"]["init_std"], seed)
    return SegPromptLearner(model, tok, names, len(bg), pr["n_ctx"], pr["seg"]["init_std"], seed)
