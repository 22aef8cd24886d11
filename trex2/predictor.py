"""Predictor: encode an image once (cached), turn prompts into class embeddings, detect.

    predictor = Predictor(load_model())
    emb = predictor.encode_image(image)                 # ~backbone + encoder, cached
    cls = predictor.embed_prompts([(emb, boxes_xyxy)])  # prompt path only: cheap
    dets = predictor.detect(emb, {"tomato": cls})       # decoder only: cheap

Boxes and points are in pixels of the image as given (xyxy / xy); inside, everything is in the
normalised frame of the padded canvas the image is resized into (see TRex2.preprocess).
Predictor(model, flip=True) also searches each image mirrored and fuses the two (test-time
augmentation, as `app.py label` does by default).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .box_ops import (box_area, box_iou, cxcywh_to_xyxy, fuse_mirrored, mirror_boxes, nms, postprocess,
                      xyxy_to_cxcywh)
from .class_embedding import ClassEmbedding
from .model import STRIDE, TRex2

if TYPE_CHECKING:   # imported where detections are built: training (trex2.train) runs without supervision
    import supervision as sv

SCORE_FLOOR = 0.05  # detections below this are never returned
MIN_OBJECT_PX = 44  # small-object mode: exemplars are enlarged to at least this side in the canvas
                    # (the 25th percentile of the training objects at their own 640 px canvas: within
                    # the sizes the model saw most, not at the fringe)
MAX_CANVAS = 3200   # ... by a (tiled) canvas long side of at most this many pixels (7 x 5 tiles of a 4:3
                    # image, ~5 s on 2 cores; 2560 cost 6x6 mosaics of the dev sets 0.03-0.08 AP50)
MAX_OBJECT_PX = 110  # large-object mode: exemplars are shrunk to at most this side in the canvas
                     # (the 75th percentile of the training objects; the image is then smaller
                     # than the padded 640 px canvas, as in the zoomed-out training views)
MAX_SHARED_OBJECT_PX = 184  # a larger class shares a small class's tiles while its objects stay under
                            # this (the 90th percentile): one encode less, and larger objects are
                            # localised better than shrunk ones
TILE_OVERLAP = 0.25  # fraction of a tile shared with its neighbour
CLASS_OVERLAP_IOU = 0.7      # a box this close to a better-scored box of another class ...
CLASS_OVERLAP_FACTOR = 0.5   # ... keeps this share of its score (see compete_classes)
EXEMPLAR_MATCH_IOU = 0.5     # the detection of an exemplar's own object (see respect_exemplars) ...
EXEMPLAR_DUP_IOU = 0.35      # ... and other boxes of its class overlapping the exemplar this much
EXEMPLAR_SIZE_SHRINK = 0.27  # share of the exemplars' mean size error applied to the class's other
                             # boxes: cov / var of the per-image mean log size errors, exemplars
                             # against the other objects, on the first 12 images of each train set
                             # (tests/bench_exemplars.py)
SCALE_TOLERANCE = 1.3   # a class whose confident boxes on an image are this many times larger or
                        # smaller than its exemplars (in canvas px) is detected again at the canvas
                        # that gives them the exemplars' size (rescaled_size)
SHARE_CANVAS_WITHIN = 1.2  # ... and classes asking for canvases this close share one (share_canvases)
BLIND_LOOK_SCALE = 0.5  # a class with no box above the threshold on an image is looked at again at
                        # this share of the canvas (objects larger than the exemplars are the
                        # detector's weak side); that look counts only where it scores higher


def canvas_size(image_hw: tuple[int, int], object_side: float | None, base: int,
                min_object: float = MIN_OBJECT_PX, max_size: int = MAX_CANVAS,
                max_object: float = MAX_OBJECT_PX) -> int:
    """Long side (px, a multiple of 32) to resize an image of (H, W) px to, when its objects are
    about `object_side` px (sqrt of box area, in image pixels): `base` unless the objects would
    then be smaller than `min_object` px (then larger, up to `max_size`: the image is cut into
    overlapping tiles, see Predictor.encode_image) or larger than `max_object` px (then smaller,
    down to 64, inside the padded base canvas). None (unknown size) -> base."""
    if not object_side or object_side <= 0:
        return base
    long_side = max(image_hw)
    if object_side * base / long_side > max_object:
        return int(max(64, max_object * long_side / object_side // 32 * 32))
    want = min_object * long_side / object_side
    return int(min(max(base, -(-want // 32) * 32), max(base, max_size)))


def rescaled_size(size: int, image_hw: tuple[int, int], sides_px, object_px: float | None,
                  tol: float = SCALE_TOLERANCE, max_size: int = MAX_CANVAS) -> int | None:
    """Canvas long side at which to detect a class again on an (H, W) image searched at canvas
    `size`, when its confident boxes there (sides sqrt(w * h) in image px) have a median size that
    differs from its exemplars' (`object_px`, canvas px) by more than a factor `tol`: the canvas
    that brings them to the exemplars' size (a multiple of 32, 64..max_size). None: keep `size`
    (sizes agree, no confident box, or the exemplars' size is unknown). The model matches best
    at the exemplars' own scale; in cross-image prompting the objects' size varies between images."""
    if not object_px or not len(sides_px):
        return None
    ratio = float(np.median(sides_px)) * size / max(image_hw) / object_px
    if abs(np.log(ratio)) <= np.log(tol):
        return None
    new = snap_canvas(size / ratio, size, max_size)
    return None if new == size else new


def snap_canvas(px: float, size: int, max_size: int = MAX_CANVAS) -> int:
    """A canvas long side near `px` for a second look at an image searched at canvas `size`: a
    multiple of STRIDE, from 64 to max(max_size, size)."""
    return int(min(max(64, round(px / STRIDE) * STRIDE), max(max_size, size)))


def share_canvases(wanted: list[tuple[int, str]], within: float = SHARE_CANVAS_WITHIN) -> dict[int, list[str]]:
    """[(canvas long side, class name), ...] -> {canvas: [names]}: classes whose canvases are within
    a factor `within` of the smallest in their group share one canvas, the group's median (a
    multiple of 32): one encode for several classes of about the same size."""
    groups: list[list[tuple[int, str]]] = []
    for new, name in sorted(wanted):
        if groups and new <= groups[-1][0][0] * within:
            groups[-1].append((new, name))
        else:
            groups.append([(new, name)])
    return {int(round(float(np.median([n for n, _ in g])) / 32) * 32): [name for _, name in g] for g in groups}


def check_canvas_size(size: int) -> int:
    """`size` as an int if it is a usable canvas long side (a multiple of 32, 64..8192), else ValueError."""
    if int(size) != size or size % 32 or not 64 <= size <= 8192:
        raise ValueError(f"canvas size must be a multiple of 32 between 64 and 8192, got {size}")
    return int(size)


def object_side(boxes_xyxy) -> float | None:
    """Median sqrt(w * h) of (K, 4) xyxy pixel boxes, or None when there are none."""
    b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    if not len(b):
        return None
    return float(np.median(np.sqrt(np.clip(b[:, 2] - b[:, 0], 1, None) * np.clip(b[:, 3] - b[:, 1], 1, None))))


def canvas_groups(image_hw: tuple[int, int], sides: dict[str, float | None], base: int) -> dict[int, list[str]]:
    """Classes -> the canvas each is detected at on an (H, W) px image, from each class's exemplar
    object_side in image px (None: unknown) -> {canvas long side: [class names]}. A class whose
    exemplars fit the model at `base` (or of unknown size) is detected at `base`, a large one at
    its own smaller canvas (canvas_size), and the small ones share the canvas of the smallest
    (tiled): one encode per entry. A larger class joins the small ones (saving its encode) when
    its objects still fit whole in the tiles' overlap (tile_overlap) and stay within
    MAX_SHARED_OBJECT_PX there: large objects are never cut up, nor blown up, by a small class's tiles."""
    need = {name: canvas_size(image_hw, side, base) for name, side in sides.items()}
    small = [name for name, size in need.items() if size > base]
    groups = {}
    if small:
        size = max(need[n] for n in small)
        fits = min(tile_overlap(image_hw, size, base), MAX_SHARED_OBJECT_PX * max(image_hw) / size)
        groups[size] = [n for n in need if n in small or (sides[n] is not None and sides[n] <= fits)]
    for name in need:
        if not any(name in g for g in groups.values()):
            groups.setdefault(need[name], []).append(name)
    return groups


def canvas_of(groups: dict[int, list[str]], name: str) -> int | None:
    """The canvas of class `name` in canvas_groups' result (None if it is in no group)."""
    return next((size for size, names in groups.items() if name in names), None)


@dataclass
class ImageEmbedding:
    memory: torch.Tensor              # (1, N, d) encoded image tokens
    shapes: list[tuple[int, int]]     # (h, w) of each level
    scale: float                      # canvas pixels per image pixel
    canvas_hw: tuple[int, int]        # padded canvas size in pixels
    valid_wh: tuple[float, float]     # image extent in the canvas, fractions
    image_size: tuple[int, int]       # (H, W) of the original image
    decoder_pre: dict                 # BoxDecoder.precompute(memory): class-independent decoder work
    refine_maps: list | None = None   # backbone maps at strides 4, 8, 16, (1, C, h, w) float16, for
                                      # the box refiner (None when cfg.refine_iters is 0)
    mirror: ImageEmbedding | None = None  # the image flipped left-right (Predictor(flip=True))

    def _clip(self, b: torch.Tensor) -> torch.Tensor:
        """Clip (K, 4) xyxy pixel boxes to the image."""
        H, W = self.image_size
        return torch.stack([b[:, 0].clamp(0, W), b[:, 1].clamp(0, H), b[:, 2].clamp(0, W), b[:, 3].clamp(0, H)], -1)

    def to_canvas(self, boxes_xyxy: np.ndarray) -> torch.Tensor:
        """(K, 4) xyxy image pixels -> (K, 4) cx, cy, w, h in [0, 1] of the canvas."""
        b = self._clip(torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)))
        ch, cw = self.canvas_hw
        b = b * self.scale / torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
        return xyxy_to_cxcywh(b)

    def to_pixels(self, boxes_cxcywh: torch.Tensor) -> np.ndarray:
        """(K, 4) canvas cx, cy, w, h -> (K, 4) xyxy image pixels, clipped to the image."""
        ch, cw = self.canvas_hw
        b = cxcywh_to_xyxy(boxes_cxcywh) * torch.tensor([cw, ch, cw, ch], dtype=torch.float32) / self.scale
        b = self._clip(b)
        return b.numpy().astype(np.float32)


@dataclass
class TiledEmbedding:
    """An image encoded as overlapping tiles (small-object mode): each tile is an ImageEmbedding of
    the crop image[y0:y1, x0:x1] at the model's canvas size."""
    tiles: list[tuple[tuple[int, int, int, int], ImageEmbedding]]   # ((x0, y0, x1, y1), embedding)
    image_size: tuple[int, int]                                      # (H, W) of the original image

    def tile_for(self, box_xyxy) -> int:
        """Index of the tile that holds the box (or point, x1 = x2) with the widest margin."""
        x1, y1, x2, y2 = (float(v) for v in box_xyxy)
        margins = [min(x1 - a, y1 - b, c - x2, d - y2) for (a, b, c, d), _ in self.tiles]
        return int(np.argmax(margins))


def tile_window(image_hw: tuple[int, int], size: int, base: int) -> int | None:
    """Tile side in image px when an (H, W) image is encoded at canvas long side `size` with
    `base` px tiles; None when it is encoded whole (see Predictor.encode_image)."""
    window = int(np.ceil(base * max(image_hw) / size))
    return None if size <= base or window >= max(image_hw) else window


def tile_overlap(image_hw: tuple[int, int], size: int, base: int) -> float:
    """Smallest overlap (image px) between neighbouring tiles of an (H, W) image at canvas `size`:
    an object up to this side lies whole in some tile (inf when the image is not tiled)."""
    window = tile_window(image_hw, size, base)
    if window is None:
        return float("inf")
    starts = [tile_windows(n, window) for n in image_hw]
    gaps = [b - a for s in starts for a, b in zip(s, s[1:])]
    return float(window - max(gaps)) if gaps else float("inf")


def tile_windows(length: int, window: int, overlap: float = TILE_OVERLAP) -> list[int]:
    """Start offsets of windows of `window` px covering [0, length) with about `overlap` shared."""
    if window >= length:
        return [0]
    n = int(np.ceil((length - window) / (window * (1 - overlap)))) + 1
    return [round(i * (length - window) / (n - 1)) for i in range(n)]


def merge_tiles(xyxy: np.ndarray, scores: np.ndarray, class_id: np.ndarray, tile: np.ndarray,
                cut: np.ndarray, iou: float, cover: float = 0.7) -> np.ndarray:
    """Duplicates between overlapping tiles -> kept indices (sorted). Within a class, greedily keeps
    whole boxes before boxes cut by an inner tile edge (`cut`), best score first, and drops a box
    that overlaps a kept one by IoU > `iou`, or, when the two come from different tiles, covers
    more than `cover` of the smaller one (an object cut by one tile's edge and whole in the next)."""
    keep: list[int] = []
    for c in np.unique(class_id):
        idx = np.flatnonzero(class_id == c)
        idx = idx[np.lexsort((-scores[idx], cut[idx]))]
        b, t = torch.as_tensor(xyxy[idx], dtype=torch.float64), torch.as_tensor(tile[idx])
        area = box_area(b)
        suppressed = torch.zeros(len(idx), dtype=torch.bool)
        for i in range(len(idx)):       # one row at a time: memory stays linear in the boxes
            if suppressed[i]:
                continue
            keep.append(int(idx[i]))
            overlap, union = box_iou(b[i:i + 1], b)
            inter = (overlap * union)[0]
            smaller = torch.minimum(area[i], area).clamp(min=1e-9)
            suppressed |= (overlap[0] > iou) | ((t != t[i]) & (inter / smaller > cover))
    return np.array(sorted(keep), dtype=int)


def score_floor(score_threshold: float | None) -> float:
    """The lowest confidence detect() returns for a requested score_threshold (None: SCORE_FLOOR)."""
    return max(SCORE_FLOOR, score_threshold or 0.0)


def compete_classes(dets: sv.Detections, score_threshold: float | None = None, iou: float = CLASS_OVERLAP_IOU,
                    factor: float = CLASS_OVERLAP_FACTOR) -> sv.Detections:
    """Classes compete for an object: a box overlapping (IoU > `iou`) a higher-scored box of another
    class has its confidence multiplied by `factor`, and boxes then under score_floor(score_threshold)
    are dropped.
    Each class is scored on its own (a sigmoid per class, as in training), so one object can be
    confidently both "white pawn" and "white bishop"; the runner-up is kept, ranked lower, for a
    reviewer to pick. Measured on the Chess, Masks and Screws train sets (3 cross-image exemplars
    per class): AP50 0.434 -> 0.473, 0.436 -> 0.453, 0.376 -> 0.402; dropping the runner-up
    (factor 0) cost 0.02-0.10 instead."""
    floor = score_floor(score_threshold)
    if len(dets) < 2 or len(np.unique(dets.class_id)) < 2:
        keep = dets.confidence >= floor
        return dets[keep] if not keep.all() else dets
    b = torch.as_tensor(dets.xyxy, dtype=torch.float32)
    s = torch.as_tensor(dets.confidence)
    c = torch.as_tensor(dets.class_id)
    beaten = torch.zeros(len(b), dtype=torch.bool)
    for i in range(0, len(b), 1024):      # rows in chunks: memory stays linear in the boxes
        r = slice(i, i + 1024)
        other = (c[r, None] != c[None, :]) & (s[None, :] > s[r, None])   # another class, scored higher
        beaten[r] = ((box_iou(b[r], b)[0] > iou) & other).any(1)
    conf = np.where(beaten.numpy(), dets.confidence * factor, dets.confidence).astype(np.float32)
    keep = conf >= floor
    out = dets[keep]            # a copy: the caller's detections are left as they were
    out.confidence = conf[keep]
    return out


def respect_exemplars(dets: sv.Detections, exemplars: dict[str, np.ndarray] | None,
                      negatives: dict[str, np.ndarray] | None = None, names: list[str] | None = None,
                      match_iou: float = EXEMPLAR_MATCH_IOU, dup_iou: float = EXEMPLAR_DUP_IOU,
                      size_shrink: float = EXEMPLAR_SIZE_SHRINK) -> sv.Detections:
    """Detections on an image that has prompts drawn on it: exemplars {class name: (E, 4) xyxy
    pixels}, negatives {class name: (K, 4)} boxes drawn as "not this class". Prompts are labels:
    - the class's detections on a negative box (IoU > match_iou) are dropped;
    - the best-overlapping detection of each exemplar (IoU > match_iou, same class) becomes the
      exemplar, its box and a confidence of 1; an exemplar no detection matches is added so, with
      class_id = its index in `names` (classes not in `names` are not added);
    - the class's other detections overlapping an exemplar by IoU > dup_iou (fragments or merges
      of the boxed object) are dropped (on the dev sets' per-image runs: 807 false and 6 true
      positives on tomato, 210 and 12 on bccd);
    - the class's remaining boxes follow the way the user boxes it: the mean log ratio of the
      exemplars' widths (heights) to those of the detections that matched them, times
      size_shrink, rescales their widths (heights) about their centres.
    Returns a copy (or `dets` itself when there is nothing to apply)."""
    if not (exemplars or negatives):
        return dets
    xyxy = dets.xyxy.copy()
    conf = dets.confidence.copy()
    keep = np.ones(len(dets), dtype=bool)
    have = dets.data["class_name"] if len(dets) else np.array([], dtype=object)
    added = []                                        # (box, class name) of unmatched exemplars

    def overlap(name, boxes):
        """(rows of class `name`, IoU (D, E) of their boxes with `boxes`)."""
        rows = np.flatnonzero(have == name)
        if not len(rows) or not len(boxes):
            return rows, np.zeros((len(rows), len(boxes)), np.float32)
        return rows, box_iou(torch.as_tensor(xyxy[rows]), torch.as_tensor(boxes))[0].numpy()

    for name, boxes in (negatives or {}).items():
        rows, o = overlap(name, np.asarray(boxes, np.float32).reshape(-1, 4))
        if o.size:
            keep[rows[o.max(1) > match_iou]] = False
    for name, boxes in (exemplars or {}).items():
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        rows, o = overlap(name, boxes)
        o[~keep[rows]] = 0.0                          # dropped as a negative: takes no exemplar
        own, size_err = set(), []
        for e in np.argsort(-o.max(0, initial=0.0)):  # best-matched exemplars pick first
            free = [j for j in np.argsort(-o[:, e]) if j not in own and o[j, e] > match_iou]
            if free:
                r = rows[free[0]]
                own.add(free[0])
                size_err.append(np.log(np.maximum(boxes[e, 2:] - boxes[e, :2], 1e-3)
                                       / np.maximum(xyxy[r, 2:] - xyxy[r, :2], 1e-3)))
                xyxy[r], conf[r] = boxes[e], 1.0
            else:
                added.append((boxes[e], name))
        for j in range(len(rows)):
            if j not in own and o[j].max(initial=0.0) > dup_iou:
                keep[rows[j]] = False
        others = rows[[j for j in range(len(rows)) if j not in own]]
        if size_err and len(others):
            half = (xyxy[others, 2:] - xyxy[others, :2]) / 2 * np.exp(size_shrink * np.mean(size_err, 0))
            centre = (xyxy[others, 2:] + xyxy[others, :2]) / 2
            xyxy[others] = np.concatenate([centre - half, centre + half], 1)
    out = dets[keep]
    out.xyxy, out.confidence = xyxy[keep], conf[keep]
    added = [(b, n) for b, n in added if names is not None and n in names]
    if added:
        import supervision as sv
        extra = _detections(np.stack([b for b, _ in added]), np.ones(len(added), np.float32),
                            np.array([names.index(n) for _, n in added]), names)
        out = sv.Detections.merge([out, extra]) if len(out) else extra
    return out


class Predictor:
    def __init__(self, model: TRex2, cache_size: int = 32, flip: bool = False):
        """flip: test-time augmentation: every image is also encoded flipped left-right, each class
        (one embedding, from the prompts as given) is detected on both, and the two sets of boxes
        are fused (box_ops.fuse_mirrored). Twice the encode and decode time. It may be changed
        between calls (or given per call to encode_image): detect() fuses whenever the
        embedding it gets holds a mirror."""
        self.model = model.eval()
        self.flip = flip
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.encode_count = 0  # number of real (uncached) encodes, for tests and benchmarks

    @property
    def score_threshold(self) -> float:
        return float(self.model.cfg.score_threshold)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray, key=None, size: int | None = None, flip: bool | None = None):
        """RGB uint8 (H, W, 3) -> ImageEmbedding, cached by `key` (or by a hash of the pixels).
        size: canvas long side in px (default the model's image_size, 640). Above image_size the
        image is resized to that long side and cut into overlapping image_size tiles (small-object
        mode; a TiledEmbedding, about one encode per tile), see canvas_size.
        flip: also encode the image mirrored (None: self.flip); detect() then fuses both. The
        cache serves either setting from one entry: an image cached with its mirror comes back
        without it when flip is off, and one cached without gets only its mirror encoded."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8):
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {getattr(image, 'shape', type(image))}")
        flip = self.flip if flip is None else bool(flip)
        base = int(self.model.cfg.image_size)
        size = check_canvas_size(size or base)
        if key is None:
            key = hashlib.sha1(np.ascontiguousarray(image).data).hexdigest() + str(image.shape)
        hit = self.cached(key, size, flip)
        if hit is not None:
            return hit
        have = self.cache.get((key, size))                  # cached without its mirror, or None
        H, W = image.shape[:2]
        window = tile_window((H, W), size, base)            # tile side in image pixels
        if window is None:
            emb = self._encode(image, min(size, base), flip, have)
        else:
            tiles = []
            for y0 in tile_windows(H, window):
                for x0 in tile_windows(W, window):
                    x1, y1 = min(W, x0 + window), min(H, y0 + window)
                    # every tile at the same scale: a short edge tile is not enlarged
                    crop = image[y0:y1, x0:x1]
                    tile_size = round(base * max(crop.shape[:2]) / window)
                    plain = None if have is None else have.tiles[len(tiles)][1]
                    tiles.append(((x0, y0, x1, y1), self._encode(crop, tile_size, flip, plain)))
            emb = TiledEmbedding(tiles, (H, W))
        self.cache[(key, size)] = emb
        self.cache.move_to_end((key, size))
        # an entry weighs its encodes (memory): one per tile, twice with the mirror; the newest stays
        while len(self.cache) > 1 and sum(_encodes(e) for e in self.cache.values()) > self.cache_size:
            self.cache.popitem(last=False)
        return emb

    def cached(self, key, size: int | None = None, flip: bool | None = None):
        """The embedding encode_image(..., key=key, size=size, flip=flip) would return from the
        cache, or None (lets a caller skip decoding an image file that is already encoded)."""
        flip = self.flip if flip is None else bool(flip)
        key = (key, check_canvas_size(size or int(self.model.cfg.image_size)))
        emb = self.cache.get(key)
        mirrored = emb is not None and _mirrored(emb)
        if emb is None or (flip and not mirrored):
            return None
        self.cache.move_to_end(key)
        return _without_mirror(emb) if mirrored and not flip else emb

    def _encode(self, image: np.ndarray, size: int, flip: bool, have: ImageEmbedding | None = None) -> ImageEmbedding:
        """One image at canvas long side `size` (and its mirror with flip) -> ImageEmbedding.
        have: its embedding without the mirror (only the mirror is encoded, into a new object)."""
        x, scale, valid = self.model.preprocess(image, size)
        emb = have if have is not None else self._encode_canvas(x, scale, valid, image.shape[:2])
        if flip:   # the resized image mirrored: the same as resizing the mirrored image
            emb = replace(emb, mirror=self._encode_canvas(mirror_canvas(x, valid), scale, valid, image.shape[:2]))
        self.encode_count += 1
        return emb

    def _encode_canvas(self, x: torch.Tensor, scale: float, valid, image_hw) -> ImageEmbedding:
        refine = self.model.cfg.refine_iters > 0
        maps = self.model.backbone(x, stride4=refine)
        memory, shapes = self.model.encode_features(maps[1:] if refine else maps)
        return ImageEmbedding(memory, shapes, scale, tuple(x.shape[2:]), valid, image_hw,
                              self.model.decoder.precompute(memory, shapes),
                              [m.half() for m in maps[:3]] if refine else None)

    def _refine(self, emb: ImageEmbedding, scores: torch.Tensor, boxes: torch.Tensor):
        """One class's kept boxes (K, 4) canvas cx, cy, w, h through cfg.refine_iters box refiner
        passes; boxes that became duplicates are merged again (NMS) -> scores, boxes."""
        if emb.refine_maps is None or not len(boxes):
            return scores, boxes
        for _ in range(self.model.cfg.refine_iters):
            boxes, _ = self.model.refiner(emb.refine_maps, boxes)
        keep = nms(cxcywh_to_xyxy(boxes), scores, self.model.cfg.nms_iou)
        return scores[keep], boxes[keep]

    @torch.no_grad()
    def _visual_embeddings(self, prompts, sides: list | None = None) -> torch.Tensor:
        """[(emb, boxes, points?), ...] -> (n_images, d): one global-token output per image. `sides`
        (a list) gets (side sqrt(w * h) in canvas px, in image px) of every box."""
        out = []
        for item in self._split_tiled(prompts):
            emb, boxes = item[0], item[1]
            points = item[2] if len(item) > 2 else None
            b = emb.to_canvas(np.zeros((0, 4)) if boxes is None else boxes)
            p = np.zeros((0, 2)) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
            if sides is not None and len(b):
                px = (b[:, 2] * b[:, 3] * emb.canvas_hw[0] * emb.canvas_hw[1]).sqrt().tolist()
                sides.extend((s, s / emb.scale) for s in px)
            if len(p):
                pb = emb.to_canvas(np.concatenate([p, p], 1))
                b = torch.cat([b, pb], 0)
            if len(b) == 0:
                continue
            is_point = torch.arange(len(b)) >= len(b) - len(p)
            valid = torch.ones(1, len(b), dtype=torch.bool)
            out.append(self.model.encode_prompts(emb.memory, emb.shapes, b[None], is_point[None], valid)[0])
        return torch.stack(out) if out else torch.zeros(0, self.model.cfg.d_model)

    @staticmethod
    def _split_tiled(prompts):
        """Prompt tuples on TiledEmbeddings -> tuples on the tiles holding each box or point, in the
        tiles' pixels; other tuples pass through."""
        for item in prompts:
            emb = item[0]
            if not isinstance(emb, TiledEmbedding):
                yield item
                continue
            boxes = np.zeros((0, 4)) if item[1] is None else np.asarray(item[1], np.float64).reshape(-1, 4)
            points = np.zeros((0, 2)) if len(item) < 3 or item[2] is None else item[2]
            points = np.asarray(points, np.float64).reshape(-1, 2)
            where_b = np.array([emb.tile_for(b) for b in boxes], dtype=int)
            where_p = np.array([emb.tile_for([x, y, x, y]) for x, y in points], dtype=int)
            for t in np.union1d(where_b, where_p):
                (x0, y0, _, _), tile = emb.tiles[t]
                yield tile, boxes[where_b == t] - [x0, y0, x0, y0], points[where_p == t] - [x0, y0]

    @torch.no_grad()
    def embed_prompts(self, prompts=(), negatives=None, text: str | None = None) -> ClassEmbedding:
        """Exemplars on one or many images -> one ClassEmbedding (mean over images; mean with the
        text embedding when text is given). See the module docstring for the tuple form."""
        sides = []
        visual = self._visual_embeddings(prompts or [], sides)
        parts = []
        if len(visual):
            parts.append(visual.mean(0))
        if text:
            if self.model.text_encoder is None:
                self.model.attach_text_encoder()
            parts.append(self.model.text_encoder([text])[0])
        if not parts:
            raise ValueError("no prompt given: draw at least one box or point, or give a text phrase")
        neg = self._visual_embeddings(negatives or [])
        px, side = (float(v) for v in np.median(sides, 0)) if sides else (None, None)
        return ClassEmbedding(torch.stack(parts).mean(0), neg, px, side)

    def _decode(self, emb: ImageEmbedding, names, classes, cls, num_queries: int, floor: float):
        """Decoder + postprocess for the classes `names` (embeddings cls (C, d)) -> [(scores, boxes)]."""
        valid = torch.tensor([emb.valid_wh] * len(names))
        outputs, _, queries = self.model.decode(emb.memory, emb.shapes, cls, valid, num_queries,
                                                pre=emb.decoder_pre)
        logits, boxes = outputs[-1]
        out = []
        for c, name in enumerate(names):
            neg = classes[name].negatives
            neg_logits = None
            if neg.numel():
                head = self.model.decoder.class_head
                neg_logits = torch.stack([head(queries[c:c + 1], n[None])[0] for n in neg]).max(0).values
            _, s, b = postprocess(logits[c], boxes[c], self.model.cfg.nms_iou, floor, neg_logits)
            out.append(self._refine(emb, s, b))
        if emb.mirror is not None:
            flipped = self._decode(emb.mirror, names, classes, cls, num_queries, floor)
            out = [fuse_mirrored(s, b, ms, mirror_boxes(mb, emb.valid_wh[0]), floor)
                   for (s, b), (ms, mb) in zip(out, flipped)]
        return out

    @torch.no_grad()
    def detect(self, emb: ImageEmbedding, classes: dict[str, ClassEmbedding],
               score_threshold: float | None = None, compete: bool = True) -> sv.Detections:
        """Find every instance of each class -> sv.Detections (xyxy image pixels, confidence,
        class_id = index in `classes`, data["class_name"]). compete: classes compete for each
        object (compete_classes); False leaves that to a caller merging several detect() calls."""
        import supervision as sv
        floor = score_floor(score_threshold)
        names = list(classes)
        if not names:
            return sv.Detections.empty()
        if isinstance(emb, TiledEmbedding):
            dets = self._detect_tiled(emb, classes, score_threshold)
            return compete_classes(dets, score_threshold) if compete else dets
        cls = torch.stack([classes[n].embedding for n in names])
        cfg = self.model.cfg
        results = self._decode(emb, names, classes, cls, cfg.num_queries, floor)
        # a dense scene: if a class fills half of its queries with confident boxes, look again
        # with more queries (no fixed cap on the number of objects)
        dense = [c for c, (s, _) in enumerate(results)
                 if (s >= self.score_threshold).sum() > 0.5 * cfg.num_queries]
        if dense and cfg.dense_queries > cfg.num_queries:
            again = self._decode(emb, [names[c] for c in dense], classes, cls[dense], cfg.dense_queries, floor)
            for c, r in zip(dense, again):
                results[c] = r
        xyxy = [emb.to_pixels(b) for _, b in results]
        conf = [s.numpy() for s, _ in results]
        ids = [np.full(len(s), c) for c, (s, _) in enumerate(results)]
        xyxy = np.concatenate(xyxy).astype(np.float32)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        class_id = np.concatenate(ids).astype(int)[keep]
        dets = _detections(xyxy[keep], np.concatenate(conf).astype(np.float32)[keep], class_id, names)
        return compete_classes(dets, score_threshold) if compete else dets

    def rescale_classes(self, dets: sv.Detections, classes: dict[str, ClassEmbedding], size: int | None,
                        image_hw: tuple[int, int], encode, score_threshold: float | None = None) -> list:
        """A second look at another scale. dets: detect(emb, classes, compete=False) on an (H, W)
        image encoded at canvas long side `size` (None: the model's). Each class whose boxes scoring
        at least the recommended threshold are, by their median, more than SCALE_TOLERANCE times
        larger or smaller than its exemplars (ClassEmbedding.object_px) is detected again at the
        canvas that gives them the exemplars' size (rescaled_size; encode(size) -> the image's
        embedding there), and its boxes from both looks are fused (fuse_mirrored: a box found in
        one look only keeps half its score). A class with no box above the threshold (and a known
        object_px) is looked at again blind, at BLIND_LOOK_SCALE times the canvas, in case its
        objects here are larger than its exemplars; the two looks are fused only if the second
        one's best score beats the first's, else the first look's boxes stay as they are. Classes
        of `dets` not in `classes` are kept as they are. Returns [dets without the classes looked
        at again, one part per class looked at again], for a caller to merge (each part's class
        ids index its own classes)."""
        size = size or self.model.cfg.image_size
        names = dets.data.get("class_name", np.array([], dtype=object))
        ok = dets.confidence >= self.score_threshold if len(dets) else np.zeros(0, bool)
        xyxy, confident = dets.xyxy[ok], names[ok]
        sides = np.sqrt((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1]))
        wanted, blind = [], set()
        for name, ce in classes.items():
            mine = sides[confident == name]
            new = rescaled_size(size, image_hw, mine, ce.object_px)
            if new is None and not len(mine) and ce.object_px and BLIND_LOOK_SCALE:
                new = snap_canvas(size * BLIND_LOOK_SCALE, size)
                blind.add(name)
            if new:
                wanted.append((new, name))
        if not wanted:
            return [dets]
        again = share_canvases(wanted)
        moved = [n for ns in again.values() for n in ns]
        parts = [dets[~np.isin(names, moved)]]
        floor = score_floor(score_threshold)
        for new, ns in again.items():
            second = self.detect(encode(new), {n: classes[n] for n in ns}, score_threshold, compete=False)
            for name in ns:   # both looks fused like an image and its mirror: objects of other sizes stay
                a, b = dets[names == name], second[second.data["class_name"] == name]
                scores_higher = len(b) and (not len(a) or b.confidence.max() > a.confidence.max())
                if name in blind and not scores_higher:   # the blind look found nothing better
                    parts.append(a)
                    continue
                s, box = fuse_mirrored(torch.as_tensor(b.confidence), xyxy_to_cxcywh(torch.as_tensor(b.xyxy)),
                                       torch.as_tensor(a.confidence), xyxy_to_cxcywh(torch.as_tensor(a.xyxy)), floor)
                parts.append(_detections(cxcywh_to_xyxy(box).numpy(), s.numpy(), np.zeros(len(s), int), [name]))
        return parts

    def _detect_tiled(self, emb: TiledEmbedding, classes, score_threshold) -> sv.Detections:
        """detect() on each tile, boxes moved to image pixels, duplicates between tiles merged."""
        H, W = emb.image_size
        xyxy, conf, ids, cut, where = [], [], [], [], []
        for t, ((x0, y0, x1, y1), tile) in enumerate(emb.tiles):
            d = self.detect(tile, classes, score_threshold, compete=False)
            b = d.xyxy + np.array([x0, y0, x0, y0], np.float32)
            # touches an edge of the tile that is inside the image: the object may go on beyond it
            cut.append(((b[:, 0] <= x0 + 1) & (x0 > 0)) | ((b[:, 1] <= y0 + 1) & (y0 > 0))
                       | ((b[:, 2] >= x1 - 1) & (x1 < W)) | ((b[:, 3] >= y1 - 1) & (y1 < H)))
            xyxy.append(b)
            conf.append(d.confidence)
            ids.append(d.class_id)
            where.append(np.full(len(b), t))
        xyxy, conf, ids, cut, where = (np.concatenate(v) for v in (xyxy, conf, ids, cut, where))
        keep = merge_tiles(xyxy, conf, ids, where, cut, self.model.cfg.nms_iou)
        return _detections(xyxy[keep], conf[keep], ids[keep].astype(int), list(classes))


def mirror_canvas(x: torch.Tensor, valid_wh: tuple[float, float]) -> torch.Tensor:
    """Canvas (1, 3, S, S) of TRex2.preprocess -> the canvas of the image flipped left-right: the
    image region (top left, valid_wh of the canvas) mirrored, the padding left where it is."""
    h, w = round(valid_wh[1] * x.shape[2]), round(valid_wh[0] * x.shape[3])
    out = x.clone()
    out[..., :h, :w] = x[..., :h, :w].flip(-1)
    return out


def _mirrored(emb) -> bool:
    """Whether an ImageEmbedding (every tile of a TiledEmbedding) holds its mirror."""
    if isinstance(emb, TiledEmbedding):
        return all(_mirrored(tile) for _, tile in emb.tiles)
    return emb.mirror is not None


def _without_mirror(emb):
    """The same ImageEmbedding or TiledEmbedding without the mirrors (a new object, tensors shared)."""
    if isinstance(emb, TiledEmbedding):
        return TiledEmbedding([(w, replace(tile, mirror=None)) for w, tile in emb.tiles], emb.image_size)
    return replace(emb, mirror=None)


def _encodes(emb) -> int:
    """Number of encoder passes an ImageEmbedding or TiledEmbedding holds (tiles, mirrors)."""
    if isinstance(emb, TiledEmbedding):
        return sum(_encodes(tile) for _, tile in emb.tiles)
    return 1 if emb.mirror is None else 2


def _detections(xyxy: np.ndarray, confidence: np.ndarray, class_id: np.ndarray, names: list[str]) -> sv.Detections:
    """sv.Detections with data["class_name"] from class ids into names."""
    import supervision as sv
    class_id = np.asarray(class_id, dtype=int)
    return sv.Detections(xyxy=np.asarray(xyxy, np.float32).reshape(-1, 4),
                         confidence=np.asarray(confidence, np.float32), class_id=class_id,
                         data={"class_name": np.array(names, dtype=object)[class_id] if len(class_id)
                               else np.array([], dtype=object)})
