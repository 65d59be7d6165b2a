"""The embedded benchmark: procedurally generated, seeded, VOC-like images (the study's embedded default).

Each image shows 1-3 objects from six foreground classes on 1-3 textured background "stuff" bands.
A class has a distinct shape *and* a characteristic appearance (colour family + texture), overlapping
between some pairs so that shape still matters (ball/house share reds, star/kite share yellow, house/boat
share plank stripes, star/kite both favour sky). Four classes are made of parts (house, boat, car, kite) so
SAM's whole/part/subpart levels mean something. Each class prefers one stuff (boat on water 80 %, ...),
so CAMs can leak onto co-occurring background as they do on VOC.

Every sample is drawn from ``np.random.default_rng([seed, index])``: samples are independent of each other
and of the split sizes, and the same seed gives identical bytes on disk.
"""
from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from ..core.code_key import code_digest
from ..core.errors import FmalibError, io_error
from ..core.label_ids import IGNORE
from .labels import label_to_png_bytes, read_label_png

log = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = ("ball", "star", "boat", "house", "car", "kite")
STUFF_NAMES: tuple[str, ...] = ("grass", "water", "sky", "road", "sand", "wall")
PART_NAMES: dict[str, tuple[str, ...]] = {
    "ball": ("ball",), "star": ("star",), "boat": ("hull", "sail"), "house": ("walls", "roof", "door"),
    "car": ("body", "window", "wheel", "wheel"), "kite": ("sail", "tail"),
}
# P(stuff the object stands on | class); the rest of the mass is spread evenly over the other stuffs.
STUFF_PREFERENCE: dict[str, dict[str, float]] = {
    "ball": {"grass": 0.5, "sand": 0.3},
    "star": {"sky": 0.5, "wall": 0.3},
    "boat": {"water": 0.8},
    "house": {"grass": 0.6},
    "car": {"road": 0.75},
    "kite": {"sky": 0.8},
}
# Objects whose anchor is their bottom centre (standing on the stuff); the others float (centre anchor).
_GROUNDED = {"ball", "boat", "house", "car"}
_STUFF_RANK = {"sky": 0, "wall": 1, "grass": 2, "sand": 2, "road": 2, "water": 2}  # top-to-bottom order
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_MIN_VISIBLE = 0.45  # an occluded object keeps at least this fraction of its own pixels
_MIN_PIXELS = 60


@dataclass
class Instance:
    class_id: int
    mask: np.ndarray  # bool (H, W), visible pixels
    parts: list[np.ndarray] = field(default_factory=list)  # disjoint bool (H, W) masks inside `mask`


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3)
    labels: tuple[int, ...]  # sorted fg class ids present (1..C)
    semantic: np.ndarray  # uint8 (H, W): 0 bg, 1..C, 255 on thin object boundaries
    instances: list[Instance]
    stuff: list[tuple[str, np.ndarray]]  # (name, bool (H, W)), top to bottom
    caption: str


# ----------------------------------------------------------------------------------------------- colours

def _hsv(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float],
         val: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(*hue) % 360.0
    return np.array(colorsys.hsv_to_rgb(h / 360.0, rng.uniform(*sat), rng.uniform(*val)), np.float32) * 255


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend (H, W) t in [0, 1] between two RGB colours -> (H, W, 3)."""
    return c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid bilinearly upsampled (separable matrix products)."""
    gh, gw = cells
    grid = rng.random((gh + 1, gw + 1)).astype(np.float32)

    def interp(n: int, g: int) -> np.ndarray:
        pos = np.linspace(0, g, n, dtype=np.float32)
        lo = np.minimum(pos.astype(int), g - 1)
        frac = pos - lo
        m = np.zeros((n, g + 1), np.float32)
        m[np.arange(n), lo] = 1 - frac
        m[np.arange(n), lo + 1] = frac
        return m

    return interp(h, gh) @ grid @ interp(w, gw).T


# ---------------------------------------------------------------------------------------------- textures
# Each texture returns an (H, W, 3) float image over the whole canvas; masks pick the pixels later.

def _rotated(yy, xx, angle):
    c, s = math.cos(angle), math.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _object_texture(rng, pattern: str, c1, c2, yy, xx, center) -> np.ndarray:
    cy, cx = center
    if pattern == "dots":  # polka dots on a rotated lattice
        p = rng.uniform(6, 9)
        u, v = _rotated(yy - cy, xx - cx, rng.uniform(0, math.pi))
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        t = (du * du + dv * dv < (p * rng.uniform(0.22, 0.3)) ** 2).astype(np.float32)
    elif pattern == "radial":  # smooth, lighter towards a highlight near the centre
        d = np.sqrt((yy - cy + rng.uniform(-3, 3)) ** 2 + (xx - cx + rng.uniform(-3, 3)) ** 2)
        t = np.clip(1 - d / rng.uniform(14, 22), 0, 1)
    elif pattern == "planks":  # horizontal stripes with dark seams
        p = rng.uniform(3.5, 5.5)
        ph = (yy - cy) % p
        t = (ph < 1.0).astype(np.float32) * 0.9 + 0.15 * np.sin(xx * 0.35 + rng.uniform(0, 6))
        t = np.clip(t, 0, 1)
    elif pattern == "shingles":  # diagonal stripes
        p = rng.uniform(4, 6)
        u, _ = _rotated(yy, xx, rng.choice([0.8, -0.8]))
        t = ((u % p) < p / 2).astype(np.float32)
    elif pattern == "gloss":  # glossy paint: vertical gradient plus a specular band
        t = np.clip((yy - cy) / 25.0 + 0.5, 0, 1) * 0.5
        t = t + 0.9 * np.exp(-(((yy - cy) + 4) ** 2) / 6.0)
        t = np.clip(t, 0, 1)
    elif pattern == "checker":
        p = rng.uniform(5, 8)
        u, v = _rotated(yy - cy, xx - cx, math.pi / 4 + rng.uniform(-0.2, 0.2))
        t = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    elif pattern == "flat":
        t = np.zeros_like(yy)
    else:  # pragma: no cover - programming error
        raise ValueError(pattern)
    return _mix(c1, c2, np.broadcast_to(t, (yy.shape[0], xx.shape[1])))


def _stuff_texture(rng, name: str, yy, xx, h: int, w: int) -> np.ndarray:
    if name == "grass":  # vertical blades: noise stretched vertically
        c1 = _hsv(rng, (85, 130), (0.55, 0.85), (0.35, 0.6))
        c2 = _hsv(rng, (70, 110), (0.5, 0.8), (0.6, 0.85))
        blades = _smooth_noise(rng, h, w, (max(2, h // 10), w // 2))
        return _mix(c1, c2, blades ** 2)
    if name == "water":  # wavy horizontal bands
        c1 = _hsv(rng, (195, 225), (0.55, 0.85), (0.45, 0.7))
        c2 = _hsv(rng, (185, 205), (0.2, 0.4), (0.8, 0.95))
        ph = rng.uniform(0, 6.3)
        waves = np.sin(yy * rng.uniform(0.8, 1.2) + 1.5 * np.sin(xx * rng.uniform(0.12, 0.2) + ph))
        return _mix(c1, c2, np.clip(waves - 0.4, 0, 1))
    if name == "sky":  # vertical gradient with soft clouds
        c1 = _hsv(rng, (195, 215), (0.35, 0.6), (0.8, 0.95))
        c2 = np.array([245, 246, 250], np.float32)
        clouds = np.clip((_smooth_noise(rng, h, w, (3, 4)) - 0.55) * 3, 0, 1)
        grad = _mix(c1, c1 * 0.85 + 38, np.broadcast_to(yy / max(h - 1, 1), (h, w)).astype(np.float32))
        return grad * (1 - clouds[..., None]) + c2 * clouds[..., None]
    if name == "road":  # grey asphalt speckle with a dashed centre line
        c1 = _hsv(rng, (0, 360), (0.0, 0.06), (0.28, 0.45))
        img = _mix(c1, c1 + 40, rng.random((h, w)).astype(np.float32) ** 3)
        y0 = rng.uniform(0.3, 0.8) * h
        dash = (np.abs(yy - y0) < 1.2) & ((xx + rng.uniform(0, 12)) % 12 < 6)
        img[np.broadcast_to(dash, (h, w))] = (230, 225, 200)
        return img
    if name == "sand":  # pale speckle with faint ripples
        c1 = _hsv(rng, (35, 48), (0.25, 0.45), (0.75, 0.9))
        rip = 0.5 + 0.5 * np.sin(yy * 0.9 + 2 * np.sin(xx * 0.1))
        t = 0.35 * rip + 0.4 * rng.random((h, w)).astype(np.float32)
        return _mix(c1, c1 * 0.8, t)
    if name == "wall":  # bricks with light mortar
        c1 = _hsv(rng, (5, 30), (0.3, 0.55), (0.45, 0.65))
        mortar = np.array([200, 195, 185], np.float32)
        bh, bw = rng.uniform(5, 7), rng.uniform(10, 14)
        row = np.floor(yy / bh)
        off = (row % 2) * bw / 2
        line = ((yy % bh) < 1.0) | (((xx + off) % bw) < 1.0)
        shade = _smooth_noise(rng, h, w, (4, 4)) * 0.25
        return _mix(c1, mortar, np.broadcast_to(line, (h, w)).astype(np.float32)) * (0.875 + shade[..., None])
    raise ValueError(name)  # pragma: no cover


# ------------------------------------------------------------------------------------------------ shapes
# A shape builder returns, for an object of size s anchored at (0, 0), its parts in draw order:
# list of (primitives, appearance). Primitives are ("poly", pts) / ("ellipse", box) / ("line", pts, width).

def _appearance(rng, cls: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(pattern, colour1, colour2) per part, from the class's colour family and texture."""
    light = lambda c: np.clip(c * 0.45 + 140, 0, 255)  # noqa: E731
    if cls == "ball":
        c = _hsv(rng, (-10, 30), (0.7, 1.0), (0.75, 1.0))
        return [("dots", c, light(c) + 40)]
    if cls == "star":
        c = _hsv(rng, (42, 58), (0.75, 1.0), (0.8, 1.0))
        return [("radial", c, np.clip(c + 60, 0, 255))]
    if cls == "boat":
        hull = _hsv(rng, (15, 35), (0.5, 0.8), (0.35, 0.6))
        sail = _hsv(rng, (0, 360), (0.0, 0.12), (0.85, 1.0))
        return [("planks", hull, hull * 0.45), ("flat", sail, sail)]
    if cls == "house":
        walls = _hsv(rng, (-5, 30), (0.55, 0.85), (0.6, 0.9))
        roof = _hsv(rng, (0, 25), (0.35, 0.7), (0.25, 0.45))
        door = _hsv(rng, (20, 35), (0.5, 0.8), (0.18, 0.32))
        return [("planks", walls, walls * 0.6), ("shingles", roof, roof * 0.6), ("flat", door, door)]
    if cls == "car":
        body = _hsv(rng, (200, 280), (0.6, 1.0), (0.55, 0.95))
        window = _hsv(rng, (180, 200), (0.1, 0.3), (0.75, 0.9))
        tyre = _hsv(rng, (0, 360), (0.0, 0.1), (0.08, 0.18))
        return [("gloss", body, np.clip(body + 90, 0, 255)), ("flat", window, window),
                ("radial", tyre, tyre + 70), ("radial", tyre, tyre + 70)]
    if cls == "kite":
        hue = (45, 60) if rng.random() < 0.5 else (295, 335)  # yellow (like stars) or magenta
        c = _hsv(rng, hue, (0.7, 1.0), (0.8, 1.0))
        c2 = _hsv(rng, (hue[0] + 150, hue[1] + 150), (0.6, 0.9), (0.7, 0.95))
        tail = _hsv(rng, (0, 360), (0.2, 0.6), (0.15, 0.35))
        return [("checker", c, c2), ("flat", tail, tail)]
    raise ValueError(cls)  # pragma: no cover


def _star_pts(r_out, r_in, rot, cy=0.0):
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = rot - math.pi / 2 + k * math.pi / 5
        pts.append((r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _shape(rng, cls: str, s: float) -> list[list[tuple]]:
    """Primitive lists per part (same order as PART_NAMES[cls]) for size s; anchor at (0, 0)."""
    u = rng.uniform
    if cls == "ball":
        r = s / 2
        a = u(0.9, 1.1)
        return [[("ellipse", (-r * a, -2 * r, r * a, 0))]]
    if cls == "star":
        return [[("poly", _star_pts(s / 2, s / 2 * u(0.4, 0.55), u(-0.3, 0.3)))]]
    if cls == "boat":
        w = s
        hh = w * u(0.22, 0.32)
        inset = w * u(0.12, 0.25)
        hull = [(-w / 2, -hh), (w / 2, -hh), (w / 2 - inset, 0), (-w / 2 + inset, 0)]
        mast = u(-0.15, 0.15) * w
        sh = w * u(0.6, 0.9)
        side = 1 if rng.random() < 0.5 else -1
        sail = [(mast, -hh - sh), (mast, -hh - 1), (mast + side * w * u(0.3, 0.42), -hh - 1)]
        return [[("poly", hull)], [("poly", sail)]]
    if cls == "house":
        w = s * u(0.8, 1.0)
        hw = w * u(0.55, 0.8)
        ov = w * u(0.05, 0.12)
        rh = w * u(0.35, 0.55)
        dw, dh = w * u(0.18, 0.26), hw * u(0.45, 0.6)
        dx = u(-w / 2 + dw * 0.8, w / 2 - dw * 1.8)
        walls = [(-w / 2, -hw), (w / 2, -hw), (w / 2, 0), (-w / 2, 0)]
        roof = [(-w / 2 - ov, -hw), (w / 2 + ov, -hw), (0, -hw - rh)]
        door = [(dx, -dh), (dx + dw, -dh), (dx + dw, 0), (dx, 0)]
        return [[("poly", walls)], [("poly", roof)], [("poly", door)]]
    if cls == "car":
        w = s * u(1.0, 1.2)
        wr = w * u(0.1, 0.13)
        bh = w * u(0.22, 0.3)
        yb = -wr * 0.9  # body bottom, above the ground by most of a wheel radius
        ch = w * u(0.18, 0.25)
        cw = w * u(0.5, 0.62)
        cx = u(-0.08, 0.08) * w
        body = [(-w / 2, yb - bh), (w / 2, yb - bh), (w / 2, yb), (-w / 2, yb)]
        cabin = [(cx - cw / 2, yb - bh), (cx + cw / 2, yb - bh), (cx + cw / 2 - ch * 0.5, yb - bh - ch),
                 (cx - cw / 2 + ch * 0.5, yb - bh - ch)]
        i = ch * 0.22
        window = [(cx - cw / 2 + i * 1.6, yb - bh - 0.5), (cx + cw / 2 - i * 1.6, yb - bh - 0.5),
                  (cx + cw / 2 - ch * 0.5 - i * 0.6, yb - bh - ch + i), (cx - cw / 2 + ch * 0.5 + i * 0.6, yb - bh - ch + i)]
        wx = w / 2 - w * u(0.18, 0.24)
        wheels = [[("ellipse", (x - wr, yb - wr, x + wr, yb + wr))] for x in (-wx, wx)]
        return [[("poly", body), ("poly", cabin)], [("poly", window)]] + wheels
    if cls == "kite":
        a = s * u(0.28, 0.36)
        top, bot = s * u(0.35, 0.45), s * u(0.5, 0.62)
        rot = u(-0.35, 0.35)
        c, sn = math.cos(rot), math.sin(rot)
        R = lambda x, y: (x * c - y * sn, x * sn + y * c)  # noqa: E731
        sail = [R(0, -top), R(a, 0), R(0, bot), R(-a, 0)]
        n = 6
        length = s * u(0.45, 0.7)
        amp, ph = s * u(0.04, 0.08), u(0, 6.3)
        tail = [R(amp * math.sin(ph + 2.4 * k / n * math.pi), bot + length * k / n) for k in range(n + 1)]
        bows = []
        for k in (2, 4):  # small bow ties along the tail
            bx, by = tail[k]
            bows.append(("poly", [(bx - 3.5, by - 2.5), (bx + 3.5, by + 2.5), (bx + 3.5, by - 2.5), (bx - 3.5, by + 2.5)]))
        return [[("poly", sail)], [("line", tail, 3)] + bows]
    raise ValueError(cls)  # pragma: no cover


def _extent(parts) -> tuple[float, float, float, float]:
    xs, ys = [], []
    for prims in parts:
        for p in prims:
            if p[0] == "ellipse":
                x0, y0, x1, y1 = p[1]
                xs += [x0, x1]
                ys += [y0, y1]
            else:
                xs += [q[0] for q in p[1]]
                ys += [q[1] for q in p[1]]
                if p[0] == "line":  # pad by the stroke width
                    xs += [min(xs) - p[2], max(xs) + p[2]]
                    ys += [min(ys) - p[2], max(ys) + p[2]]
    return min(xs), min(ys), max(xs), max(ys)


def _raster(prims, dx: float, dy: float, h: int, w: int) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for p in prims:
        if p[0] == "poly":
            draw.polygon([(x + dx, y + dy) for x, y in p[1]], fill=1)
        elif p[0] == "ellipse":
            x0, y0, x1, y1 = p[1]
            draw.ellipse((x0 + dx, y0 + dy, x1 + dx, y1 + dy), fill=1)
        else:
            draw.line([(x + dx, y + dy) for x, y in p[1]], fill=1, width=p[2], joint="curve")
    return np.asarray(img, dtype=bool)


# ---------------------------------------------------------------------------------------------- sampling

def make_caption(class_ids: Sequence[int], stuff: Sequence[str] = ()) -> str:
    """'a boat and two stars on water and sky': objects in first-appearance order, then the stuff."""
    counts: dict[int, int] = {}
    for c in class_ids:
        counts[c] = counts.get(c, 0) + 1
    words = [f"{_NUMBER_WORDS.get(n, str(n))} {CLASS_NAMES[c - 1]}{'s' if n > 1 else ''}" for c, n in counts.items()]
    text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    if stuff:
        text += " on " + " and ".join(stuff)
    return text


def _choose_stuff(rng, cls: str) -> str:
    pref = STUFF_PREFERENCE[cls]
    rest = [s for s in STUFF_NAMES if s not in pref]
    probs = [pref.get(s, (1 - sum(pref.values())) / len(rest)) for s in STUFF_NAMES]
    return STUFF_NAMES[rng.choice(len(STUFF_NAMES), p=np.array(probs) / sum(probs))]


def _normalize_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _boundary(inst: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another instance id where either side is an object (2 px wide edges)."""
    b = np.zeros(inst.shape, bool)
    for a, c in ((inst[1:], inst[:-1]), (inst[:, 1:], inst[:, :-1])):
        d = (a != c) & ((a > 0) | (c > 0))
        if a.shape[0] != inst.shape[0]:
            b[1:] |= d
            b[:-1] |= d
        else:
            b[:, 1:] |= d
            b[:, :-1] |= d
    return b


def generate_sample(seed: int, index: int, size: int | tuple[int, int] = 128) -> Sample:
    """One benchmark image with its labels, GT and masks, from ``default_rng([seed, index])`` only."""
    h, w = _normalize_size(size)
    if min(h, w) < 48:
        raise FmalibError(f"synthetic image size {size} too small; expected sides >= 48 px")
    rng = np.random.default_rng([int(seed), int(index)])
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]

    # 1. objects and the stuff each one stands on (the co-occurrence lives here)
    n_obj = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    classes = [CLASS_NAMES[i] for i in rng.integers(0, len(CLASS_NAMES), n_obj)]
    on = [_choose_stuff(rng, c) for c in classes]
    stuff = list(dict.fromkeys(on))
    if len(stuff) < 3 and rng.random() < 0.4:
        extra = [s for s in STUFF_NAMES if s not in stuff]
        stuff.append(extra[rng.integers(len(extra))])
    stuff.sort(key=lambda s: (_STUFF_RANK[s], rng.random()))

    # 2. stuff as horizontal bands with wavy borders, each >= 20 % of the height
    k = len(stuff)
    frac = 0.2 + (1 - 0.2 * k) * rng.dirichlet(np.full(k, 2.0))
    cuts = np.cumsum(frac)[:-1] * h
    region = np.zeros((h, w), np.int64)
    for c in cuts:
        wave = c + rng.uniform(1, 4) * np.sin(xx * rng.uniform(0.05, 0.15) + rng.uniform(0, 6.3))
        region += yy >= wave
    canvas = np.zeros((h, w, 3), np.float32)
    stuff_masks = []
    for i, name in enumerate(stuff):
        m = region == i
        canvas[m] = _stuff_texture(rng, name, yy, xx, h, w)[m]
        stuff_masks.append((name, m))

    # 3. objects, each anchored inside its stuff region and kept mostly visible under later ones
    inst_map = np.zeros((h, w), np.int32)  # 0 = stuff, i+1 = object i
    part_map = np.zeros((h, w), np.int32)  # part index within its object
    placed: list[tuple[str, int]] = []  # (class, full pixel count)
    smin = min(h, w)
    for cls, st in zip(classes, on):
        region_mask = stuff_masks[stuff.index(st)][1]
        ok = False
        for attempt in range(24):
            if attempt == 12:  # crowded or thin stuff band: drop the stuff constraint, shrink
                region_mask = np.ones((h, w), bool)
            s = rng.uniform(0.3, 0.5) * smin * (0.7 if attempt >= 12 else 1.0)
            parts = _shape(rng, cls, s)
            x0, y0, x1, y1 = _extent(parts)
            if x1 - x0 > w - 4 or y1 - y0 > h - 4:
                continue
            # anchor: a pixel of the stuff region that the object stands on (grounded: bottom centre)
            # or is centred on (floating), such that the whole object fits in the frame
            sx, sy = (0.0, 0.0) if cls in _GROUNDED else (-(x0 + x1) / 2, -(y0 + y1) / 2)
            x0, x1, y0, y1 = x0 + sx, x1 + sx, y0 + sy, y1 + sy
            ys, xs = np.nonzero(region_mask)
            fit = (xs + x0 >= 1) & (xs + x1 <= w - 2) & (ys + y0 >= 1) & (ys + y1 <= h - 2)
            if not fit.any():
                continue
            j = rng.integers(fit.sum())
            ax, ay = float(xs[fit][j]) + sx, float(ys[fit][j]) + sy
            x0, x1, y0, y1 = x0 - sx, x1 - sx, y0 - sy, y1 - sy
            rasters = [_raster(prims, ax, ay, h, w) for prims in parts]
            full = np.zeros((h, w), bool)
            for r in rasters:
                full |= r
            area = int(full.sum())
            if area < _MIN_PIXELS:
                continue
            trial = inst_map.copy()
            trial[full] = len(placed) + 1
            if all((trial == i + 1).sum() >= max(_MIN_VISIBLE * a, _MIN_PIXELS) for i, (_, a) in enumerate(placed)):
                ok = True
                break
        if not ok:
            if not placed:  # pragma: no cover - every image needs an object; never seen in practice
                raise RuntimeError(f"synthetic sample {seed}/{index}: could not place any object")
            continue
        oid = len(placed) + 1
        inst_map[full] = oid
        for pi, r in enumerate(rasters):  # later parts draw over earlier ones (door over walls)
            part_map[r] = pi
        center = ((y0 + y1) / 2 + ay, (x0 + x1) / 2 + ax)
        for pi, (pattern, c1, c2) in enumerate(_appearance(rng, cls)):
            m = (inst_map == oid) & (part_map == pi)
            if m.any():
                canvas[m] = _object_texture(rng, pattern, c1, c2, yy, xx, center)[m]
        placed.append((cls, area))

    # 4. photometric noise: smooth illumination + pixel noise
    light = 0.85 + 0.3 * _smooth_noise(rng, h, w, (2, 2))
    canvas = canvas * light[..., None] + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    instances = []
    for i, (cls, _) in enumerate(placed):
        m = inst_map == i + 1
        parts = [m & (part_map == pi) for pi in range(len(PART_NAMES[cls]))]
        instances.append(Instance(CLASS_NAMES.index(cls) + 1, m, [p for p in parts if p.any()]))
    lut = np.array([0] + [inst.class_id for inst in instances], np.uint8)
    semantic = lut[inst_map]
    semantic[_boundary(inst_map)] = IGNORE
    ids = [inst.class_id for inst in instances]
    return Sample(image=image, labels=tuple(sorted(set(ids))), semantic=semantic, instances=instances,
                  stuff=stuff_masks, caption=make_caption(ids, stuff))


# ------------------------------------------------------------------------------------------------ writer

def sample_size(seed: int, index: int, size_range: tuple[int, int]) -> tuple[int, int]:
    """(H, W) drawn independently from the multiples of 8 in [size_min, size_max]."""
    lo, hi = int(size_range[0]), int(size_range[1])
    choices = np.arange(-(-lo // 8) * 8, hi + 1, 8)
    if choices.size == 0:
        raise FmalibError(f"synthetic size range {size_range} holds no multiple of 8")
    rng = np.random.default_rng([int(seed), int(index), 8])
    h, w = rng.choice(choices, 2)
    return int(h), int(w)


SPLIT_OFFSET = {"train": 0, "val": 1_000_000}  # val index space never meets train's


def split_sizes(params) -> dict[str, int]:
    """Images per benchmark split of a synthetic params file."""
    syn = params["data"]["synthetic"]
    return {"train": syn["n_train"], "val": syn["n_val"]}


def check_outside_splits(offset: int, n: int, sizes: dict[str, int], where: str) -> None:
    """Raise unless generator indices [offset, offset + n) miss every benchmark split's indices: the tiny
    foundation models pretrain on generated images, and any of the study's own images among them would leak
    its test data into its frozen models. ``where`` names the params file and key in the error."""
    for split, size in sizes.items():
        lo = SPLIT_OFFSET[split]
        if offset < lo + size and lo < offset + n:
            raise FmalibError(f"{where}: generator indices {offset}..{offset + n - 1} overlap the {split} split's "
                              f"{lo}..{lo + size - 1}; expected an offset outside every split")


def sample_ids(split: str, n: int) -> list[tuple[str, int]]:
    """(image id, generator index) pairs of a split."""
    return [(f"{split}_{i:05d}", SPLIT_OFFSET[split] + i) for i in range(n)]


def encode_mask(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _render(args) -> tuple[str, bytes, bytes, dict]:
    seed, index, image_id, split, size_range = args
    hw = sample_size(seed, index, size_range)
    s = generate_sample(seed, index, hw)
    ann = {
        "split": split, "index": index, "size": list(hw), "labels": list(s.labels), "caption": s.caption,
        "instances": [{"class_id": i.class_id, "mask": encode_mask(i.mask), "parts": [encode_mask(p) for p in i.parts]}
                      for i in s.instances],
        "stuff": [{"name": n, "mask": encode_mask(m)} for n, m in s.stuff],
    }
    return image_id, _png_bytes(s.image), label_to_png_bytes(s.semantic), ann


def coco_instances(images: dict[str, dict]) -> dict:
    """COCO instances-format dict (images, annotations with RLE segmentation, categories 1..C)."""
    out: dict = {"images": [], "annotations": [],
                 "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(CLASS_NAMES)]}
    for img_id, (image_id, ann) in enumerate(sorted(images.items()), start=1):
        out["images"].append({"id": img_id, "file_name": f"{image_id}.png", "height": ann["size"][0],
                              "width": ann["size"][1]})
        for inst in ann["instances"]:
            rle = {"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode("ascii")}
            out["annotations"].append({
                "id": len(out["annotations"]) + 1, "image_id": img_id, "category_id": inst["class_id"],
                "segmentation": inst["mask"], "area": int(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return out


def _manifest(n_train: int, n_val: int, seed: int, size_range) -> dict:
    return {"generator": __name__, "code": code_digest(__name__), "seed": int(seed),
            "n_train": int(n_train), "n_val": int(n_val), "size_range": [int(size_range[0]), int(size_range[1])]}


def write_benchmark(root: str | os.PathLike, n_train: int, n_val: int, seed: int,
                    size_range: tuple[int, int] = (112, 128), workers: int = 1) -> Path:
    """Write the benchmark in VOC layout under ``root`` (skipped when an identical one is there).

    root/JPEGImages/<id>.png (lossless, so bytes are deterministic), root/SegmentationClass/<id>.png
    (palette), root/ImageSets/Segmentation/{train,val}.txt, root/annotations.json, root/manifest.json.
    Everything is written to a sibling temp dir and renamed into place, so an interrupted run never
    leaves a half benchmark. A root generated with other settings is replaced; a root that is not a
    benchmark is never touched.
    """
    root = Path(root)
    manifest = _manifest(n_train, n_val, seed, size_range)
    if root.exists():
        mpath = root / "manifest.json"
        if not mpath.is_file():
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            else:
                raise FmalibError(f"{root} exists but holds no synthetic benchmark manifest.json; "
                                  "refusing to overwrite it (point data.root elsewhere or remove it)")
        elif json.loads(mpath.read_text()) == manifest:
            log.info("synthetic benchmark already at %s (seed %s, %d/%d)", root, seed, n_train, n_val)
            return root
    try:
        return _write_benchmark(root, manifest, n_train, n_val, seed, size_range, workers)
    except OSError as exc:
        raise io_error(exc, getattr(exc, "filename", None) or root, "write the synthetic benchmark at") from None


def _write_benchmark(root: Path, manifest: dict, n_train: int, n_val: int, seed: int, size_range, workers: int):
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        jobs = [(seed, idx, iid, split, size_range)
                for split, n in (("train", n_train), ("val", n_val)) for iid, idx in sample_ids(split, n)]
        images: dict[str, dict] = {}
        results = _map(_render, jobs, workers)
        for image_id, img_png, lab_png, ann in tqdm(results, total=len(jobs), desc="synthetic benchmark"):
            (tmp / "JPEGImages" / f"{image_id}.png").write_bytes(img_png)
            (tmp / "SegmentationClass" / f"{image_id}.png").write_bytes(lab_png)
            images[image_id] = ann
        for split, n in (("train", n_train), ("val", n_val)):
            (tmp / "ImageSets/Segmentation" / f"{split}.txt").write_text(
                "".join(f"{iid}\n" for iid, _ in sample_ids(split, n)))
        for split in ("train", "val"):  # the same instances in COCO format, for COCO-style tools
            (tmp / "annotations").mkdir(exist_ok=True)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(
                coco_instances({k: v for k, v in images.items() if v["split"] == split}), separators=(",", ":")))
        ann_all = {"class_names": list(CLASS_NAMES), "stuff_names": list(STUFF_NAMES),
                   "part_names": {k: list(v) for k, v in PART_NAMES.items()}, "images": images}
        (tmp / "annotations.json").write_text(json.dumps(ann_all, sort_keys=True, separators=(",", ":")))
        (tmp / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1))
        if root.exists():  # an older benchmark with other settings: swap it out
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            try:
                os.rename(tmp, root)
            except OSError:  # a concurrent process (another shard of the same run) wrote it first
                mpath = root / "manifest.json"
                if not (mpath.is_file() and json.loads(mpath.read_text()) == manifest):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("wrote synthetic benchmark to %s (%d train, %d val, seed %d)", root, n_train, n_val, seed)
    return root


def _map(fn, jobs, workers: int):
    """Results in job order; with workers > 1 from a process pool, streamed so tqdm shows progress."""
    if workers <= 1:
        yield from map(fn, jobs)
        return

    with mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        yield from pool.imap(fn, jobs, chunksize=8)


def read_annotations(root: str | os.PathLike) -> dict:
    """annotations.json of a written benchmark: {class_names, stuff_names, part_names, images: {id: {...}}}.

    Per image: split, index, size [H, W], labels, caption, instances [{class_id, mask RLE, parts [RLE]}],
    stuff [{name, mask RLE}]; decode an RLE with ``decode_mask``.
    """
    path = Path(root) / "annotations.json"
    if not path.is_file():
        raise FmalibError(f"{path} not found; expected a synthetic benchmark written by "
                          "fmalib.data.synthetic.write_benchmark (root/annotations.json)")
    return json.loads(path.read_text())


def load_sample(root: str | os.PathLike, image_id: str, annotations: dict | None = None) -> Sample:
    """A written sample back as a ``Sample`` (image, GT and masks from disk)."""

    root = Path(root)
    ann = (annotations or read_annotations(root))["images"][image_id]
    image = np.array(Image.open(root / "JPEGImages" / f"{image_id}.png").convert("RGB"))
    inst = [Instance(a["class_id"], decode_mask(a["mask"]), [decode_mask(p) for p in a["parts"]])
            for a in ann["instances"]]
    return Sample(image=image, labels=tuple(ann["labels"]),
                  semantic=read_label_png(root / "SegmentationClass" / f"{image_id}.png"), instances=inst,
                  stuff=[(s["name"], decode_mask(s["mask"])) for s in ann["stuff"]], caption=ann["caption"])
