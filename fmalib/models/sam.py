"""Load a segment-anything ``Sam`` — the real ViT-H/L/B or fmalib's tiny self-pretrained one — by one path.

Every model type is built by a builder in ``segment_anything.sam_model_registry`` (fmalib registers
``fmalib_tiny`` there on import) and its checkpoint, a plain state dict as in ``sam_vit_h_4b8939.pth``, is
checked key by key before loading so a wrong or truncated file fails with one message naming the first bad
key or shape. Nothing downstream assumes 1024 px: the input size is ``sam_image_size(model)``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..core.errors import FmalibError

log = logging.getLogger(__name__)

MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "fmalib_tiny")

# The tiny SAM: about the benchmark's image size (112–128 px; the longest side is resized to 112, which
# trains 1.4× faster than 128 on a CPU, measured), patch 8 so the embedding grid is 14×14 and the
# decoder's low-res masks 56×56, as SAM's 64 / 256 at 1024 px. On a 14×14 grid global attention in every
# block is cheaper than SAM's windows, and relative position terms cost 20 % of the encoder's CPU time
# for nothing the absolute embedding cannot do at this size (measured).
TINY_SAM_CONFIG = dict(
    img_size=112,
    patch_size=8,
    encoder_embed_dim=128,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(),
    window_size=0,
    use_rel_pos=False,
    prompt_embed_dim=128,
    decoder_depth=2,
    decoder_mlp_dim=512,
    decoder_num_heads=4,
    iou_head_hidden_dim=128,
    mask_in_chans=16,
)


def build_sam_tiny(
    checkpoint: str | os.PathLike | None = None,
    *,
    img_size: int = TINY_SAM_CONFIG["img_size"],
    patch_size: int = TINY_SAM_CONFIG["patch_size"],
    encoder_embed_dim: int = TINY_SAM_CONFIG["encoder_embed_dim"],
    encoder_depth: int = TINY_SAM_CONFIG["encoder_depth"],
    encoder_num_heads: int = TINY_SAM_CONFIG["encoder_num_heads"],
    encoder_global_attn_indexes: tuple[int, ...] = TINY_SAM_CONFIG["encoder_global_attn_indexes"],
    window_size: int = TINY_SAM_CONFIG["window_size"],
    use_rel_pos: bool = TINY_SAM_CONFIG["use_rel_pos"],
    prompt_embed_dim: int = TINY_SAM_CONFIG["prompt_embed_dim"],
    decoder_depth: int = TINY_SAM_CONFIG["decoder_depth"],
    decoder_mlp_dim: int = TINY_SAM_CONFIG["decoder_mlp_dim"],
    decoder_num_heads: int = TINY_SAM_CONFIG["decoder_num_heads"],
    iou_head_hidden_dim: int = TINY_SAM_CONFIG["iou_head_hidden_dim"],
    mask_in_chans: int = TINY_SAM_CONFIG["mask_in_chans"],
) -> Sam:
    """segment_anything's ``_build_sam`` with every size a parameter; same modules, same state-dict keys."""
    if img_size % patch_size:
        raise FmalibError(f"tiny SAM: img_size {img_size} is not a multiple of patch_size {patch_size}")
    grid = img_size // patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=encoder_num_heads,
            patch_size=patch_size,
            qkv_bias=True,
            use_rel_pos=use_rel_pos,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=window_size,
            out_chans=prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder_depth,
                embedding_dim=prompt_embed_dim,
                mlp_dim=decoder_mlp_dim,
                num_heads=decoder_num_heads,
            ),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        load_sam_state_dict(sam, read_sam_checkpoint(checkpoint), checkpoint)
    return sam


def register_tiny_sam() -> None:
    """Make ``sam_model_registry["fmalib_tiny"]`` build the tiny SAM, beside vit_h / vit_l / vit_b."""
    sam_model_registry.setdefault("fmalib_tiny", build_sam_tiny)


register_tiny_sam()


def read_sam_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A SAM state dict from disk (tensors on CPU); a missing, truncated or non-state-dict file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FmalibError(f"SAM checkpoint {path} does not exist (expected a state dict like sam_vit_h_4b8939.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        size = path.stat().st_size
        raise FmalibError(
            f"SAM checkpoint {path} ({size} bytes) cannot be read as a torch state dict — truncated or "
            f"corrupt? ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    except Exception as exc:  # pickle errors of unknown kinds: still one clear error naming the file
        raise FmalibError(f"SAM checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FmalibError(f"SAM checkpoint {path} is not a state dict of tensors (got {type(state).__name__})")
    return dict(state)


def check_sam_state_dict(model: Sam, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise one FmalibError naming the first missing / unexpected key or mismatched shape."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise FmalibError(
                f"SAM checkpoint {source} lacks key {key!r} (shape {tuple(ref.shape)}): wrong model type "
                f"or a truncated checkpoint ({len(state)} of {len(expected)} keys present)"
            )
        if tuple(state[key].shape) != tuple(ref.shape):
            raise FmalibError(
                f"SAM checkpoint {source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(ref.shape)} — a checkpoint of a different model type"
            )
    for key in state:
        if key not in expected:
            raise FmalibError(f"SAM checkpoint {source} has unexpected key {key!r}: a checkpoint of a different model")


def load_sam_state_dict(model: Sam, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state dict") -> Sam:
    """Check then load (fp16 weights are cast to the model's dtype by ``load_state_dict``'s copy)."""
    check_sam_state_dict(model, state, str(source))
    model.load_state_dict(state, strict=True)
    return model


def load_sam(model_type: str, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Sam:
    """A frozen SAM in eval mode: built by segment_anything's registry, weights from ``checkpoint`` if given.

    ``checkpoint=None`` gives a randomly initialised model (tests, or to train one).
    """
    if model_type not in sam_model_registry or model_type == "default":
        raise FmalibError(f"SAM model_type {model_type!r} is unknown; expected one of {', '.join(MODEL_TYPES)}")
    model = sam_model_registry[model_type](checkpoint=None)
    if checkpoint is not None:
        load_sam_state_dict(model, read_sam_checkpoint(checkpoint), checkpoint)
        log.info("loaded SAM %s from %s", model_type, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def sam_image_size(model: Sam) -> int:
    """The square input size the image encoder expects (1024 for real SAM, 128 for the tiny one)."""
    return int(model.image_encoder.img_size)


def sam_summary(model: Sam, model_type: str, checkpoint: str | os.PathLike | None = None) -> dict:
    """What a user checks first about a loaded SAM (notebook 01): encoder size and the file. Meta's release
    names carry the first 6 hex digits of the file's MD5 (``sam_vit_h_4b8939.pth``); where the name has
    them they are checked, so a damaged download shows here."""
    enc = model.image_encoder
    ident = {"model_type": model_type, "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
             "image size": sam_image_size(model), "patch size": int(enc.patch_embed.proj.kernel_size[0]),
             "encoder width": int(enc.patch_embed.proj.out_channels), "encoder depth": len(enc.blocks),
             "checkpoint": str(checkpoint) if checkpoint else None}
    if checkpoint and not Path(checkpoint).is_file():
        ident["checkpoint"] = f"{checkpoint} (absent: random init)"
    elif checkpoint:
        path = Path(checkpoint)
        sha, md5 = hashlib.sha256(), hashlib.md5()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
                md5.update(chunk)
        ident["file MB"] = round(path.stat().st_size / 2**20, 1)
        ident["sha256"] = sha.hexdigest()
        m = re.fullmatch(r"sam_vit_[hlb]_([0-9a-f]{6})\.pth", path.name)
        if m:
            ok = md5.hexdigest().startswith(m.group(1))
            ident["release checksum"] = (f"md5 starts with {m.group(1)}, as the name says" if ok else
                                         f"md5 {md5.hexdigest()[:6]}... is not the name's {m.group(1)}: a damaged "
                                         f"or different file")
    return ident
