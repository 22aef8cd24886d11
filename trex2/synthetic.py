"""Synthetic "repeated objects" scenes that teach a visual-prompt detector to find the repeats.

A scene is a background plus K = 1..4 object *prototypes*, each pasted 1..40 times (a quarter
of the scenes are dense: 30-150 copies of 10-30 px). Object sizes run log-uniformly from ~8 to
~300 px across scenes.

- Backgrounds: smooth noise, gradients, stripes, checkers, blurred colour blobs, or a crop of a
  real photo whose labelled objects were blurred away (so they do not appear unlabelled).
- Prototypes: a procedural shape described by a small ``spec`` dict (outline, fill texture,
  shading, border, inner mark) rendered to RGB + alpha. Later prototypes of a scene are often
  *mutations* of an earlier one that change one attribute (colour, shape, elongation, inner mark,
  texture), which forces fine discrimination. Or a real object crop (soft rectangular or
  elliptical alpha); real prototypes of one scene come from distinct categories.
- Instances: scale jitter 0.8-1.25, small rotation (sometimes any), flips, colour jitter. Each
  paste is placed by rejection so that every instance keeps >= 55% of its mask visible, however
  it is occluded by later pastes or cut by the border. Hence every pasted object is labelled.
- A box is the tight box of the instance's visible mask (alpha >= 0.5 and not covered later).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import cv2
import numpy as np

__all__ = ["Scene", "ObjectSource", "generate_scene", "load_object_sources"]

DEFAULT_TRAIN_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")  # the labelled train sets
MIN_VISIBLE = 0.55      # fraction of an instance's full mask that must stay visible
MIN_SIZE, MAX_SIZE = 8.0, 300.0   # object long side in px (at size=640)


@dataclass
class Scene:
    """One synthetic scene. ``labels`` index the scene's prototypes, 0..K-1."""
    image: np.ndarray          # uint8 (H, W, 3) RGB
    boxes: np.ndarray          # float32 (N, 4) xyxy pixels (x1 = last column + 1)
    labels: np.ndarray         # int64 (N,)
    instance_map: np.ndarray   # int32 (H, W): index into boxes of the visible instance, -1 = none
    background: np.ndarray | None = None   # uint8 (H, W, 3), only with return_background=True


class ObjectSource(NamedTuple):
    """A labelled real photo: prototypes are cut from its boxes, backgrounds from the rest."""
    image: np.ndarray          # uint8 (H, W, 3) RGB
    boxes: np.ndarray          # float32 (M, 4) xyxy pixels
    names: list[str]           # category key per box, e.g. "chess/white-pawn"


# ----------------------------------------------------------------------------- colours, noise
def _rand_color(rng) -> np.ndarray:
    h, s, v = rng.random(), rng.random() ** 0.7, rng.uniform(0.12, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255


def _distinct_color(rng, *old: np.ndarray, min_dist: float = 90.0) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance) from each of ``old``."""
    for _ in range(100):
        c = _rand_color(rng)
        if all(np.linalg.norm(c - o) >= min_dist for o in old):
            return c
    return (255.0 - old[0]).astype(np.float32)   # far from old[0] at least


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """float32 (h, w) in [0, 1]: bicubic-upsampled random grid with ~``cells`` cells."""
    g = rng.random((cells + 1, cells + 1)).astype(np.float32)
    n = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(n.min()), float(n.max())
    return (n - lo) / max(hi - lo, 1e-6)


def _ramp(h: int, w: int, angle: float) -> np.ndarray:
    """float32 (h, w): coordinate along direction ``angle`` (radians), scaled to [0, 1]."""
    y, x = np.ogrid[0:h, 0:w]
    t = (x * math.cos(angle) + y * math.sin(angle)).astype(np.float32)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _pattern(rng, kind: str, h: int, w: int) -> np.ndarray:
    """float32 (h, w) in [0, 1] mixing weight for a two-colour texture."""
    if kind == "gradient":
        return _ramp(h, w, rng.uniform(0, 2 * math.pi))
    if kind == "stripes":
        phase = 2 * math.pi * rng.uniform(2, 12) * _ramp(h, w, rng.uniform(0, math.pi))
        t = 0.5 + 0.5 * np.sin(phase)
        return (t > 0.5).astype(np.float32) if rng.random() < 0.5 else t
    if kind == "checker":
        c = max(2, int(rng.integers(3, 12)))
        y, x = np.ogrid[0:h, 0:w]
        return (((x * c) // w + (y * c) // h) % 2).astype(np.float32)
    if kind == "radial":
        y, x = np.ogrid[0:h, 0:w]
        d = np.hypot((x - w / 2) / (w / 2), (y - h / 2) / (h / 2))
        return np.clip(d, 0, 1).astype(np.float32)
    if kind == "spots":
        m = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(3, 12))):
            r = max(1, int(rng.uniform(0.05, 0.15) * min(h, w)))
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(m, centre, r, 1.0, -1, cv2.LINE_AA)
        return m
    if kind == "noise":
        return _smooth_noise(rng, h, w, int(rng.integers(2, 8)))
    return np.zeros((h, w), np.float32)   # "solid"


# ----------------------------------------------------------------------------- backgrounds
def _photo_background(rng, src: ObjectSource, size: int) -> np.ndarray:
    """A random crop of a real photo, labelled boxes (grown 15%) replaced by a heavy blur."""
    img = src.image
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // 16), max(1, h // 16)), interpolation=cv2.INTER_AREA)
    blurred = cv2.resize(cv2.GaussianBlur(small, (0, 0), 1.5), (w, h))
    mask = np.zeros((h, w), np.float32)
    for x0, y0, x1, y1 in src.boxes:
        gx, gy = 0.15 * (x1 - x0), 0.15 * (y1 - y0)
        cv2.rectangle(mask, (int(x0 - gx), int(y0 - gy)), (int(x1 + gx), int(y1 + gy)), 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)[..., None]
    img = img * (1 - mask) + blurred * mask
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.resize(np.ascontiguousarray(crop, np.float32), (size, size))


def _background(rng, size: int, sources, exclude_sets: set[str]) -> np.ndarray:
    """float32 (size, size, 3) RGB in [0, 255]. Photos holding a category of ``exclude_sets``
    (the "<set>" of "<set>/<name>") are not used."""
    if sources and rng.random() < 0.3:
        pool = [s for s in sources if not exclude_sets & {n.split("/")[0] for n in s.names}]
        if pool:
            return _photo_background(rng, pool[int(rng.integers(len(pool)))], size)
    kind = str(rng.choice(["noise", "gradient", "stripes", "checker", "blobs", "solid"],
                          p=[0.3, 0.2, 0.15, 0.1, 0.2, 0.05]))
    c1, c2 = _rand_color(rng), _rand_color(rng)
    if kind == "blobs":   # drawn and blurred at 1/4 scale (a wide blur is costly), then upsampled
        q = max(8, size // 4)
        img = np.empty((q, q, 3), np.float32)
        img[:] = c1
        for _ in range(int(rng.integers(5, 40))):
            centre = (int(rng.integers(0, q)), int(rng.integers(0, q)))
            cv2.circle(img, centre, int(rng.uniform(0.06, 0.3) * q), _rand_color(rng).tolist(), -1)
        img = cv2.resize(cv2.GaussianBlur(img, (0, 0), rng.uniform(2, 7.5) * q / 160), (size, size),
                         interpolation=cv2.INTER_LINEAR)
    else:
        t = _pattern(rng, kind, size, size)
        if kind in ("stripes", "checker"):
            t = cv2.GaussianBlur(t, (0, 0), rng.uniform(0.5, 4))
        img = c1 + (c2 - c1) * t[..., None]
    grain = _smooth_noise(rng, size, size, int(rng.integers(20, 120))) - 0.5
    img += grain[..., None] * np.float32(rng.uniform(0, 40))
    return img


# ----------------------------------------------------------------------------- prototypes
SHAPES = ("ellipse", "polygon", "star", "superellipse", "blob", "ring")
FILLS = ("solid", "gradient", "stripes", "noise", "radial", "spots", "checker")
SMOOTH_FILLS = ("solid", "gradient", "noise", "radial")
INNERS = (None, "dot", "cross", "bar", "shape")


def _random_spec(rng) -> dict:
    aspect = rng.uniform(0.35, 0.7) if rng.random() < 0.4 else rng.uniform(0.8, 1.0)
    c1, c2 = _rand_color(rng), _rand_color(rng)
    return dict(shape=str(rng.choice(SHAPES)), n=int(rng.integers(3, 9)), seed=int(rng.integers(2**31)),
                aspect=float(aspect),
                star_r=float(rng.uniform(0.35, 0.6)), power=float(rng.uniform(4, 10)),
                hole=float(rng.uniform(0.35, 0.7)), fill=str(rng.choice(FILLS)),
                c1=c1, c2=c2, c3=_distinct_color(rng, c1, c2),   # c3: outline and inner mark
                shade=bool(rng.random() < 0.5),
                outline=float(rng.uniform(0.03, 0.1)) if rng.random() < 0.35 else 0.0,
                inner=INNERS[int(rng.integers(len(INNERS)))])   # (a ring shows only None or "bar")


def _inner_seen(spec: dict):
    return spec["inner"] if spec["shape"] != "ring" or spec["inner"] == "bar" else None


def _mutate(spec: dict, rng, small: bool) -> dict:
    """A sibling prototype differing in one visible attribute (texture or inner mark: not if small)."""
    new = dict(spec)
    what = str(rng.choice(["color", "shape", "aspect"] + ([] if small else ["inner", "fill"])))
    if what == "color":
        new["c1"] = _distinct_color(rng, spec["c1"])
        new["c2"] = _distinct_color(rng, spec["c2"]) if spec["fill"] != "solid" else new["c2"]
    elif what == "shape":
        n_matters = spec["shape"] in ("polygon", "star")   # n only changes these two shapes
        while new["shape"] == spec["shape"] and (new["n"] == spec["n"] or not n_matters):
            new["shape"], new["n"] = str(rng.choice(SHAPES)), int(rng.integers(3, 9))
    elif what == "aspect":
        round_ = spec["aspect"] > 0.7
        new["aspect"] = float(rng.uniform(0.3, 0.55) if round_ else rng.uniform(0.85, 1.0))
    elif what == "inner":
        seen = _inner_seen(spec)   # marks inside a ring's hole are invisible
        while _inner_seen(new) == seen:
            new["inner"] = INNERS[int(rng.integers(len(INNERS)))]
    else:   # smooth fills look alike: a smooth fill becomes a patterned one, patterned any other
        smooth = spec["fill"] in SMOOTH_FILLS
        new["fill"] = str(rng.choice([f for f in FILLS if f != spec["fill"]
                                      and not (smooth and f in SMOOTH_FILLS)]))
        if np.linalg.norm(new["c2"] - new["c1"]) < 120:
            new["c2"] = _distinct_color(rng, new["c1"], min_dist=120)
    return new


def _outline(spec: dict, npts: int = 96) -> np.ndarray:
    """float32 (P, 2) closed outline in [-1, 1]^2 (x scaled by ``aspect``)."""
    srng = np.random.default_rng(spec["seed"])
    shape, n = spec["shape"], spec["n"]
    th = np.linspace(0, 2 * np.pi, npts, endpoint=False)
    if shape == "polygon":
        th = np.sort((np.arange(n) + srng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n)
        r = srng.uniform(0.7, 1.0, n)
    elif shape == "star":
        th = np.arange(2 * n) * np.pi / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, spec["star_r"])
    elif shape == "blob":
        r = np.ones_like(th)
        for k in range(2, 5):
            r += srng.uniform(0.1, 0.25) * np.cos(k * th + srng.uniform(0, 2 * np.pi))
        r /= r.max()
    else:
        r = np.ones_like(th)
    x, y = r * np.cos(th), r * np.sin(th)
    if shape == "superellipse":
        e = 2.0 / spec["power"]
        cs, sn = np.cos(th), np.sin(th)
        x, y = np.sign(cs) * np.abs(cs) ** e, np.sign(sn) * np.abs(sn) ** e
    return np.stack([x * spec["aspect"], y], 1).astype(np.float32)


def _render_spec(spec: dict, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a procedural prototype. Returns rgb float32 (h, w, 3) and alpha float32 (h, w)."""
    side = int(np.clip(side, 16, 400))
    c, rad = side / 2, side / 2 - 2
    pts = _outline(spec) * rad + c

    def poly(img, p, color):   # anti-aliased filled polygon, 4 bits of sub-pixel precision
        cv2.fillPoly(img, [np.round(p * 16).astype(np.int32)], color, cv2.LINE_AA, shift=4)

    mask = np.zeros((side, side), np.uint8)
    poly(mask, pts, 255)
    if spec["shape"] == "ring":
        poly(mask, (pts - c) * spec["hole"] + c, 0)
    trng = np.random.default_rng(spec["seed"] + 1)
    t = _pattern(trng, spec["fill"], side, side)[..., None]
    rgb = spec["c1"] * (1 - t) + spec["c2"] * t
    if spec["shade"]:   # light from the upper left: a cheap 3-D look
        y, x = np.mgrid[0:side, 0:side].astype(np.float32)
        d = np.hypot(x - 0.35 * side, y - 0.3 * side) / side
        rgb = rgb * (1.25 - 0.8 * d)[..., None]
    c3 = spec["c3"].tolist()
    if spec["inner"] == "dot":
        r = max(1, int(0.3 * rad * max(spec["aspect"], 0.6)))
        cv2.circle(rgb, (int(c), int(c)), r, c3, -1, cv2.LINE_AA)
    elif spec["inner"] == "cross":
        th = max(1, int(0.12 * rad))
        dy, dx = int(0.6 * rad), int(0.5 * rad * spec["aspect"])
        cv2.line(rgb, (int(c), int(c) - dy), (int(c), int(c) + dy), c3, th, cv2.LINE_AA)
        cv2.line(rgb, (int(c) - dx, int(c)), (int(c) + dx, int(c)), c3, th, cv2.LINE_AA)
    elif spec["inner"] == "bar":
        cv2.rectangle(rgb, (0, int(c - 0.15 * rad)), (side, int(c + 0.15 * rad)), c3, -1)
    elif spec["inner"] == "shape":
        poly(rgb, (pts - c) * 0.45 + c, c3)
    if spec["outline"] > 0:
        cv2.polylines(rgb, [np.round(pts * 16).astype(np.int32)], True, c3,
                      max(1, int(2 * spec["outline"] * rad)), cv2.LINE_AA, shift=4)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return np.clip(rgb[y0:y1, x0:x1], 0, 255), mask[y0:y1, x0:x1].astype(np.float32) / 255


def _crop_prototype(rng, src: ObjectSource, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut box ``i`` of a real photo with a soft rectangular or elliptical alpha."""
    h, w = src.image.shape[:2]
    x0, y0, x1, y1 = src.boxes[i]
    x0, y0 = int(max(0, math.floor(x0))), int(max(0, math.floor(y0)))
    x1, y1 = int(min(w, math.ceil(x1))), int(min(h, math.ceil(y1)))
    rgb = src.image[y0:y1, x0:x1].astype(np.float32)
    ph, pw = rgb.shape[:2]
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32) + 0.5
    if rng.random() < 0.5:   # ellipse inscribed in the box, feathered edge
        d = np.hypot((xx - pw / 2) / (pw / 2), (yy - ph / 2) / (ph / 2))
        alpha = np.clip((1 - d) * min(pw, ph) / 3 + 0.5, 0, 1)
    else:                    # rectangle, feathered over ~5% of the short side (1-3 px)
        f = float(np.clip(0.05 * min(ph, pw), 1, 3))
        alpha = np.clip(np.minimum(np.minimum(xx, pw - xx), np.minimum(yy, ph - yy)) / f, 0, 1)
    return rgb, alpha


def _real_prototypes(rng, sources: Sequence[ObjectSource], k: int) -> tuple[list, set[str]]:
    """Up to ``k`` real crops (rgb, alpha) of pairwise distinct categories (often from one photo),
    and the categories used."""
    out, used = [], set()
    src = sources[int(rng.integers(len(sources)))]
    for _ in range(8 * k):
        if len(out) == k:
            break
        if rng.random() < 0.4:
            src = sources[int(rng.integers(len(sources)))]
        i = int(rng.integers(len(src.boxes)))
        bw, bh = src.boxes[i, 2] - src.boxes[i, 0], src.boxes[i, 3] - src.boxes[i, 1]
        if src.names[i] in used or min(bw, bh) < 10:
            continue
        used.add(src.names[i])
        out.append(_crop_prototype(rng, src, i))
    return out, used


def _as_source(s) -> ObjectSource:
    """Accept ObjectSource or a plain (image, boxes[, names]) tuple. Without names all boxes share
    one category, so such sources give at most one real prototype per scene."""
    if isinstance(s, ObjectSource):
        return s
    image, boxes, *rest = s
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    names = list(rest[0]) if rest else ["?"] * len(boxes)
    return ObjectSource(np.asarray(image, np.uint8), boxes, names)


# ----------------------------------------------------------------------------- instances
def _transform(rgb, alpha, scale: float, angle: float, flip: bool):
    """Scale, rotate (degrees) and flip a prototype. Returns rgb (h, w, 3), alpha (h, w)."""
    rgba = np.dstack([rgb, alpha[..., None]]).astype(np.float32)
    if flip:
        rgba = rgba[:, ::-1]
    if scale < 0.7:   # area-average first: avoids aliasing when shrinking a lot
        h, w = rgba.shape[:2]
        dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgba = cv2.resize(rgba, dsize, interpolation=cv2.INTER_AREA)
        scale = 1.0
    h, w = rgba.shape[:2]
    a = math.radians(angle)
    ow = int(math.ceil((abs(w * math.cos(a)) + abs(h * math.sin(a))) * scale)) + 2
    oh = int(math.ceil((abs(w * math.sin(a)) + abs(h * math.cos(a))) * scale)) + 2
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (ow / 2 - w / 2, oh / 2 - h / 2)
    out = cv2.warpAffine(np.ascontiguousarray(rgba), m, (ow, oh), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out[..., :3], out[..., 3]


def _plan(rng, size: int) -> tuple[list[int], list[float]]:
    """Instance count and long-side size (px) per prototype."""
    if rng.random() < 0.25:   # dense counting scene
        k = 1 if rng.random() < 0.6 else 2
        counts = [int(rng.integers(30, 151))] + [int(rng.integers(5, 60)) for _ in range(k - 1)]
        sizes = [float(np.exp(rng.uniform(np.log(10), np.log(30)))) for _ in range(k)]
    else:
        k = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.2, 0.2]))
        counts = [int(round(np.exp(rng.uniform(0, np.log(40))))) for _ in range(k)]
        base = np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE)))
        sizes = [float(base * rng.uniform(0.6, 1.6)) for _ in range(k)]
        area = sum(n * s * s * 0.7 for n, s in zip(counts, sizes))   # ~0.7 mask fill of a box
        shrink = min(1.0, math.sqrt(0.35 * 640 * 640 / area))
        sizes = [max(MIN_SIZE, s * shrink) for s in sizes]
    f = size / 640
    return counts, [max(MIN_SIZE, s * f) for s in sizes]


class _Layout:
    """Canvas being pasted on, with the occupancy bookkeeping that caps occlusion."""

    def __init__(self, bg: np.ndarray):
        self.canvas = bg.copy()
        self.occ = np.full(bg.shape[:2], -1, np.int32)   # topmost instance (alpha >= 0.5) per pixel
        self.full, self.visible, self.labels, self.rects = [], [], [], []

    def try_paste(self, rgb, alpha, mask, x: int, y: int, label: int, allow_overlap: bool) -> bool:
        """Paste at top-left (x, y) unless an instance (this one or an earlier) would keep less
        than MIN_VISIBLE of its full mask visible, or overlap is disallowed and would happen."""
        h, w = self.occ.shape
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + mask.shape[1], w), min(y + mask.shape[0], h)
        if ix1 <= ix0 or iy1 <= iy0:
            return False
        crop = np.s_[iy0 - y:iy1 - y, ix0 - x:ix1 - x]
        m, area = mask[crop], int(mask.sum())
        inside = int(m.sum())
        if inside < MIN_VISIBLE * area:
            return False
        hit = self.occ[iy0:iy1, ix0:ix1][m]
        hit = hit[hit >= 0]
        if hit.size:
            if not allow_overlap:
                return False
            cnt = np.bincount(hit)
            ids = np.nonzero(cnt)[0]
            vis = np.asarray(self.visible)[ids] - cnt[ids]
            if np.any(vis < MIN_VISIBLE * np.asarray(self.full)[ids]):
                return False
            for j, v in zip(ids, vis):
                self.visible[j] = int(v)
        a = alpha[crop][..., None]
        region = self.canvas[iy0:iy1, ix0:ix1]
        region *= 1 - a
        region += rgb[crop] * a
        self.occ[iy0:iy1, ix0:ix1][m] = len(self.full)
        self.full.append(area)
        self.visible.append(inside)
        self.labels.append(label)
        self.rects.append((ix0, iy0, ix1, iy1))
        return True

    def boxes(self) -> np.ndarray:
        """float32 (N, 4) tight xyxy boxes of the visible masks."""
        out = np.zeros((len(self.rects), 4), np.float32)
        for i, (x0, y0, x1, y1) in enumerate(self.rects):
            ys, xs = np.nonzero(self.occ[y0:y1, x0:x1] == i)
            out[i] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
        return out


def _prototypes(rng, sizes: list[float], sources, size: int):
    """Real and procedural prototypes [(rgb, alpha)] in random label order, and the background.
    ``sizes`` (target long side per prototype) is capped in place for real crops (<= 3x upscale)."""
    k = len(sizes)
    n_real = int(rng.binomial(k, 0.5)) if sources else 0
    reals, used = _real_prototypes(rng, sources, n_real) if n_real else ([], set())
    # A photo background never comes from the data set of a pasted real prototype: its (possibly
    # unlabelled) objects would be unlabelled look-alikes.
    bg = _background(rng, size, sources, {n.split("/")[0] for n in used})
    real_slots = set(rng.permutation(k)[:len(reals)].tolist())
    protos, specs, bg_mean = [], [], bg[::8, ::8].reshape(-1, 3).mean(0)
    for j in range(k):
        if j in real_slots:
            protos.append(reals.pop())
            sizes[j] = min(sizes[j], 3.0 * max(protos[-1][1].shape))
            continue
        spec = (_mutate(specs[int(rng.integers(len(specs)))], rng, small=sizes[j] < 40)
                if specs and rng.random() < 0.6 else _random_spec(rng))
        if np.linalg.norm(spec["c1"] - bg_mean) < 60:   # keep objects visible on the background
            spec = {**spec, "c1": _distinct_color(rng, bg_mean, min_dist=60)}
        specs.append(spec)
        protos.append(_render_spec(spec, int(sizes[j] * 1.3)))
    return protos, bg


def generate_scene(rng: np.random.Generator, size: int = 640,
                   object_sources: Sequence[ObjectSource] | None = None,
                   return_background: bool = False) -> Scene:
    """Generate one ``size`` x ``size`` scene; deterministic for a given ``rng`` state.

    ``object_sources``: real labelled photos (see :func:`load_object_sources`) for prototypes and
    backgrounds; None -> procedural only. ``return_background`` also returns the scene's
    background (same global effects, no objects), for tests and debugging.
    """
    sources = [s for s in map(_as_source, object_sources or ()) if len(s.boxes)] or None
    counts, sizes = _plan(rng, size)
    protos, bg = _prototypes(rng, sizes, sources, size)
    lay = _Layout(bg)
    allow_overlap, p_trunc = rng.random() < 0.5, rng.uniform(0, 0.3)
    spin = [rng.uniform(0, 25) if rng.random() < 0.85 else 180.0 for _ in protos]
    for lab in rng.permutation(np.repeat(np.arange(len(protos)), counts)):
        rgb, alpha = protos[lab]
        scale = sizes[lab] / max(alpha.shape) * math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
        angle = rng.uniform(-spin[lab], spin[lab])
        rgb, alpha = _transform(rgb, alpha, scale, angle, rng.random() < 0.5)
        gain = (rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)).astype(np.float32)
        rgb = rgb * gain + rng.uniform(-8, 8, 3).astype(np.float32)
        mask = alpha >= 0.5
        if mask.sum() < 6:
            continue
        ph, pw = mask.shape
        for _ in range(15):
            if rng.random() < p_trunc:   # may hang over the border
                x = int(rng.integers(-pw // 2, size - pw // 2 + 1))
                y = int(rng.integers(-ph // 2, size - ph // 2 + 1))
            else:
                x = int(rng.integers(0, max(1, size - pw + 1)))
                y = int(rng.integers(0, max(1, size - ph + 1)))
            if lay.try_paste(rgb, alpha, mask, x, y, int(lab), allow_overlap):
                break
    if not lay.labels:   # nothing could be placed (very rare): draw another scene from the stream
        return generate_scene(rng, size, object_sources, return_background)
    present = sorted(set(lay.labels))   # prototypes without instances are dropped: labels 0..K'-1
    labels = np.array([present.index(lab) for lab in lay.labels], np.int64)

    # Global photometric effects, applied identically to the background layer.
    gain, bias = np.float32(rng.uniform(0.8, 1.2)), np.float32(rng.uniform(-20, 20))
    blur = rng.uniform(0.5, 1.2) if rng.random() < 0.3 else 0.0
    noise = (rng.standard_normal((size, size, 3), np.float32) * np.float32(rng.uniform(1, 6))
             if rng.random() < 0.5 else None)

    def finish(img: np.ndarray) -> np.ndarray:
        img = img * gain + bias
        if blur:
            img = cv2.GaussianBlur(img, (0, 0), blur)
        if noise is not None:
            img += noise
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)

    return Scene(finish(lay.canvas), lay.boxes(), labels, lay.occ,
                 finish(bg) if return_background else None)


# ----------------------------------------------------------------------------- real sources
def load_object_sources(train_root: str | os.PathLike = DEFAULT_TRAIN_ROOT,
                        max_per_set: int | None = None, rng: np.random.Generator | None = None,
                        max_side: int = 640) -> list[ObjectSource]:
    """Read every ``<set>/gt.json`` under ``train_root`` into :class:`ObjectSource` records.

    ``max_per_set`` keeps that many images per set (chosen with ``rng``, default seed 0);
    images are downscaled to a long side of at most ``max_side`` px (boxes with them) to bound
    memory. Category names become ``"<set>/<name>"``. Images without boxes are skipped.
    """
    from exports.coco import read_coco
    from trex2.image_io import load_image

    root = Path(train_root)
    if "dev" in root.resolve().parts:
        raise ValueError(f"{root}: refusing to read development data for training")
    sets = sorted(p for p in root.iterdir() if (p / "gt.json").is_file()) if root.is_dir() else []
    if not sets:
        raise FileNotFoundError(f"{root}: no <set>/gt.json found")
    rng = rng if rng is not None else np.random.default_rng(0)
    out: list[ObjectSource] = []
    for set_dir in sets:
        coco = read_coco(set_dir / "gt.json")
        per_image: dict[str, list] = {}
        for a in coco.annotations:
            per_image.setdefault(a.image, []).append(a)
        images = [im.file_name for im in coco.images if im.file_name in per_image]
        if max_per_set is not None and len(images) > max_per_set:
            keep = sorted(rng.choice(len(images), max_per_set, replace=False))
            images = [images[i] for i in keep]
        for name in images:
            img = load_image(set_dir / "images" / name)
            boxes = np.array([a.box for a in per_image[name]], np.float32).reshape(-1, 4)
            f = max_side / max(img.shape[:2])
            if f < 1:
                dsize = (round(img.shape[1] * f), round(img.shape[0] * f))
                img = cv2.resize(img, dsize, interpolation=cv2.INTER_AREA)
                boxes *= f
            names = [f"{set_dir.name}/{a.category}" for a in per_image[name]]
            out.append(ObjectSource(img, boxes, names))
    return out


# ----------------------------------------------------------------------------- debug preview
def _palette(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.61803) % 1, 0.9, 1.0)
    return int(b * 255), int(g * 255), int(r * 255)   # BGR for cv2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trex2.synthetic",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for JPEGs, *_boxes.jpg, scenes.json")
    p.add_argument("--n", type=int, default=20, help="number of scenes")
    p.add_argument("--seed", type=int, default=0, help="scene i uses numpy default_rng([seed, i])")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--real", metavar="TRAIN_ROOT", nargs="?", const=DEFAULT_TRAIN_ROOT,
                   help="also use real object crops/backgrounds from TRAIN_ROOT (default %(const)s)")
    p.add_argument("--max-per-set", type=int, default=20, help="images per set read with --real")
    args = p.parse_args(argv)
    sources = load_object_sources(args.real, args.max_per_set) if args.real else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(args.n):
        scene = generate_scene(np.random.default_rng([args.seed, i]), args.size, sources)
        name = f"scene_{i:03d}"
        bgr = np.ascontiguousarray(scene.image[..., ::-1])
        cv2.imwrite(str(out / f"{name}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        for (x0, y0, x1, y1), lab in zip(scene.boxes.astype(int), scene.labels):
            # pixel-inclusive rectangle: the line is drawn on the object's outermost pixels
            cv2.rectangle(bgr, (x0, y0), (x1 - 1, y1 - 1), _palette(int(lab)), 1)
        cv2.imwrite(str(out / f"{name}_boxes.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        records.append({"file_name": f"{name}.jpg", "width": args.size, "height": args.size,
                        "boxes_xyxy": scene.boxes.tolist(), "labels": scene.labels.tolist()})
    (out / "scenes.json").write_text(json.dumps({"scenes": records}, indent=1), encoding="utf-8")
    print(f"wrote {args.n} scenes, {sum(len(r['labels']) for r in records)} boxes to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
