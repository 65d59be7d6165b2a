"""CoOp prompt learners on a frozen CLIP (docs/method.md §2) and the CLIP-ES hand-prompt baseline.

Every prompt set is K = C foreground + N background prompts whose text features come from the CLIP text
tower run on token *embeddings*; some token positions hold learnable context vectors:

- ``ClsPromptLearner``: one context of M vectors shared by every prompt, class name last:
  "[SOS] ctx_1 … ctx_M <name>. [EOS]" (fg synonyms and bg words alike); init N(0, 0.015²).
- ``SegPromptLearner``: a context per prompt, class name first: "[SOS] <name> ctx_1 … ctx_M. [EOS]";
  the N background prompts carry no word, only their own context; init N(0, 0.0125²) (VOC; the original's
  COCO seg prompts use the cls layout instead: ``prompts.seg.layout: shared_end``).
- ``HandPrompts``: no context, "a clean origami {}." — the same code path with nothing to learn.

CLIP is held by reference, not registered as a submodule, so ``parameters()`` and ``state_dict()`` hold the
contexts only; the frozen token embeddings are non-persistent buffers.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.errors import FmalibError
from ..models import clip as C

log = logging.getLogger(__name__)

HAND_TEMPLATE = "a clean origami {}."
KINDS = ("hand", "cls", "seg")
CTX = object()  # placeholder segment: the M context vectors go here
_PLACEHOLDER = "X"


def _token_count(tokenizer: Callable, text: str) -> int:
    """Number of BPE tokens of ``text`` (without SOS/EOS)."""
    if not text:
        return 0
    return int(tokenizer([text])[0].argmax()) - 1  # EOS has the largest id


class PromptSet(nn.Module):
    """K prompts built from segments (strings and ``CTX``); ``forward()`` -> (K, D) L2-normalised features.

    ``segments[k]`` lists prompt k's pieces, e.g. ``[CTX, "boat."]``; ``groups[k]`` is the index of the
    context that fills prompt k's ``CTX`` (None: the prompt has no context). Contexts are ``self.ctx``
    (G, M, W), or absent when no prompt has one.
    """

    def __init__(self, model, tokenizer: Callable, segments: Sequence[Sequence], groups: Sequence[int | None],
                 n_fg: int, n_ctx: int, init_std: float, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "clip", model)  # held, not registered: not trained, not saved
        if len(segments) != len(groups) or not 0 <= n_fg <= len(segments):
            raise FmalibError("PromptSet: segments/groups lengths differ or n_fg out of range")
        self.n_fg, self.n_bg, self.n_ctx = int(n_fg), len(segments) - int(n_fg), int(n_ctx)
        texts, rows, cols = [], [], []
        for k, segs in enumerate(segments):
            words, start = [], None
            for s in segs:
                if s is CTX:
                    start = 1 + _token_count(tokenizer, " ".join(words))
                    words.extend([_PLACEHOLDER] * self.n_ctx)
                else:
                    words.append(str(s))
            texts.append(" ".join(words))
            if (start is None) != (groups[k] is None):
                raise FmalibError(f"prompt {k} ({texts[-1]!r}): a context slot needs a context group and vice versa")
            if start is not None:
                rows += [k] * self.n_ctx
                cols += list(range(start, start + self.n_ctx))
        tokens = tokenizer(texts)
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1
        max_len = int(model.positional_embedding.shape[0])
        if length > max_len or (tokens[:, -1] != 0).any():
            raise FmalibError(f"a prompt is {length} tokens long; the CLIP text context holds {max_len} "
                              f"(shorten the synonyms or n_ctx={self.n_ctx})")
        tokens = tokens[:, :length]  # causal text tower: tokens after EOS never reach it
        rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        ph = int(tokenizer([_PLACEHOLDER])[0, 1])
        if len(rows) and not bool((tokens[rows_t, cols_t] == ph).all()):
            raise FmalibError("context slots do not line up with the placeholder tokens (a class name that "
                              "tokenises differently alone and in context?)")
        device = model.positional_embedding.device
        with torch.no_grad():
            base = C.token_embedding(model, tokens.to(device)).detach()
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("eot", eot.to(device), persistent=False)
        self.register_buffer("rows", rows_t.to(device), persistent=False)
        self.register_buffer("cols", cols_t.to(device), persistent=False)
        used = sorted({g for g in groups if g is not None})
        if used and used != list(range(len(used))):
            raise FmalibError(f"context groups must be 0..G-1; got {used}")
        self.register_buffer("slot_group", torch.tensor([g for g in groups if g is not None], dtype=torch.long,
                                                        device=device).repeat_interleave(self.n_ctx), persistent=False)
        if used:
            gen = torch.Generator().manual_seed(int(seed))
            width = base.shape[-1]
            self.ctx = nn.Parameter(torch.randn(len(used), self.n_ctx, width, generator=gen).mul_(init_std).to(device))
        else:
            self.register_parameter("ctx", None)
        self.texts = texts

    def embeddings(self) -> torch.Tensor:
        """(K, L, W) prompt embeddings: frozen token embeddings with the contexts in their slots."""
        if self.ctx is None:
            return self.base
        m = self.n_ctx
        slot = torch.arange(len(self.rows), device=self.rows.device) % m
        vals = self.ctx[self.slot_group, slot].to(self.base.dtype)
        return self.base.index_put((self.rows, self.cols), vals)

    def forward(self) -> torch.Tensor:
        feats = C.encode_text_embeddings(self.clip, self.embeddings(), self.eot)
        return F.normalize(feats.float(), dim=-1)

    def context_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}


class ClsPromptLearner(PromptSet):
    """One shared context, class name last; bg prompts are the bg words with the same context."""

    def __init__(self, model, tokenizer: Callable, class_names: Sequence[str], bg_words: Sequence[str],
                 n_ctx: int = 16, init_std: float = 0.015, seed: int = 0):
        names = list(class_names) + list(bg_words)
        super().__init__(model, tokenizer, [[CTX, f"{n}."] for n in names], [0] * len(names),
                         len(class_names), n_ctx, init_std, seed)


class SegPromptLearner(PromptSet):
    """Class-specific contexts, class name first; ``n_bg`` context-only background prompts."""

    def __init__(self, model, tokenizer: Callable, class_names: Sequence[str], n_bg: int,
                 n_ctx: int = 16, init_std: float = 0.0125, seed: int = 0):
        segs = [[f"{n}", CTX, "."] for n in class_names] + [[CTX, "."] for _ in range(int(n_bg))]
        super().__init__(model, tokenizer, segs, list(range(len(segs))), len(class_names), n_ctx, init_std, seed)


class HandPrompts(PromptSet):
    """CLIP-ES baseline: ``template.format(word)`` for the synonyms and the bg words; nothing to learn."""

    def __init__(self, model, tokenizer: Callable, class_names: Sequence[str], bg_words: Sequence[str],
                 template: str = HAND_TEMPLATE):
        names = list(class_names) + list(bg_words)
        super().__init__(model, tokenizer, [[template.format(n)] for n in names], [None] * len(names),
                         len(class_names), 0, 0.0)


def fg_similarity(features: torch.Tensor, n_fg: int) -> float:
    """Mean cosine between distinct foreground prompts of (K, D) L2-normalised features (1.0: all alike).

    A shared context can make every class prompt alike (a generic "object" prompt); the contrastive loss's
    absent-class negatives work against that, its bg-negatives ablation does not. This number shows which
    happens during training."""
    fg = features[:n_fg].detach().float()
    if n_fg < 2:
        return float("nan")
    sim = fg @ fg.T
    return float((sim.sum() - sim.diagonal().sum()) / (n_fg * (n_fg - 1)))
