"""Training data: frozen-backbone feature cache and T-Rex2 episode sampling.

Every training image (real photos from the train sets, and synthetic repeated-object scenes from
synthetic.py) is resized into a square canvas of `image_size` px, passed once through the frozen
backbone, and its three feature maps are kept in memory as float16. An episode picks one category in
one image: 1..3 of its boxes (or points) are the prompts - on the same image, or on another image of
the same set for a cross-image episode - and all its instances are the targets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .box_ops import box_area, xyxy_to_cxcywh
from .image_io import ImageLoadError, load_image


@dataclass
class CachedImage:
    features: list[torch.Tensor]      # [(C_l, h_l, w_l)] float16
    boxes: torch.Tensor               # (N, 4) cx, cy, w, h in [0, 1] of the canvas
    labels: torch.Tensor              # (N,) int64, category index within `group`
    group: str                        # images of one group share categories (dataset or scene)
    valid_wh: tuple[float, float]     # image extent in the canvas


def canvas_features(model, image: np.ndarray, size: int, zoom: float = 1.0, stride4: bool = False):
    """Image -> backbone maps of a square size x size canvas (on the backbone's device; with stride4
    the stride-4 map first, see EfficientNetLite0.forward), resize factor, valid extent. zoom < 1
    shrinks the image further inside the canvas (scale augmentation: smaller objects, grey padding
    right and bottom as at inference)."""
    x, scale, _ = model.preprocess(image)
    if max(x.shape[2:]) > size:
        raise ValueError(f"canvas size {size} is smaller than the model's image_size")
    if zoom < 1.0:
        nh, nw = round(image.shape[0] * scale), round(image.shape[1] * scale)
        x = F.interpolate(x[..., :nh, :nw], size=(max(1, round(nh * zoom)), max(1, round(nw * zoom))),
                          mode="bilinear", align_corners=False, antialias=True)
        scale *= zoom
    valid = (round(image.shape[1] * scale) / size, round(image.shape[0] * scale) / size)
    x = F.pad(x, (0, size - x.shape[3], 0, size - x.shape[2]), value=127.0)
    device = next(model.backbone.parameters()).device
    with torch.no_grad():
        feats = model.backbone(x.to(device), stride4=stride4)
    return [f[0].half() for f in feats], scale, valid


def cache_image(model, image, boxes_xyxy, labels, group, size, zoom: float = 1.0,
                stride4: bool = False) -> CachedImage:
    feats, scale, valid = canvas_features(model, image, size, zoom, stride4)
    b = xyxy_to_cxcywh(torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)) * scale / size)
    return CachedImage(feats, b, torch.as_tensor(np.asarray(labels), dtype=torch.long), group, valid)


def random_crop(rng: np.random.Generator, image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray,
                min_side: float = 0.5, min_visible: float = 0.6):
    """Zoom-in augmentation: a random crop of min_side..1 of each image side (pixels). Boxes are
    clipped to it and kept when at least min_visible of their area stays inside. -> (image, boxes,
    labels), or None when no box survives."""
    h, w = image.shape[:2]
    f = rng.uniform(min_side, 1.0)
    cw, ch = max(2, round(w * f)), max(2, round(h * f))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    clipped = np.clip(b - [x0, y0, x0, y0], 0, [cw, ch, cw, ch])
    visible, whole = box_area(torch.from_numpy(clipped)).numpy(), box_area(torch.from_numpy(b)).numpy()
    keep = visible >= min_visible * np.maximum(whole, 1e-6)
    keep &= (clipped[:, 2] - clipped[:, 0] > 1) & (clipped[:, 3] - clipped[:, 1] > 1)
    if not keep.any():
        return None
    return image[y0:y0 + ch, x0:x0 + cw], clipped[keep], np.asarray(labels)[keep]


def turn_boxes(boxes_xyxy: np.ndarray, w: float, h: float, quarter_turns: int) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 px in a w x h image -> the same boxes after `quarter_turns`
    counter-clockwise quarter turns of the image (as np.rot90 and PIL's ROTATE_90 turn it: a point
    (x, y) goes to (y, w - x) per turn)."""
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    for _ in range(quarter_turns % 4):
        b = np.stack([b[:, 1], w - b[:, 2], b[:, 3], w - b[:, 0]], 1)
        w, h = h, w
    return b


def random_turn(rng: np.random.Generator, image: np.ndarray, boxes_xyxy: np.ndarray, labels: np.ndarray):
    """Orientation augmentation: the image turned by 90, 180 or 270 degrees (equally likely; a
    landscape image becomes portrait two times in three), boxes with it -> (image, boxes, labels)."""
    k = int(rng.integers(1, 4))
    h, w = image.shape[:2]
    return np.ascontiguousarray(np.rot90(image, k)), turn_boxes(boxes_xyxy, w, h, k), labels


def train_sets(train_root: str):
    """Yield (name, directory) of each labelled set (a gt.json inside) under train_root, sorted;
    refuses a dev set."""
    for name in sorted(os.listdir(train_root)):
        set_dir = os.path.join(train_root, name)
        if not os.path.isfile(os.path.join(set_dir, "gt.json")):
            continue
        if "dev" in os.path.abspath(set_dir).split(os.sep):
            raise ValueError("refusing to train on a dev set")
        yield name, set_dir


def read_coco_set(set_dir: str):
    """Yield (image RGB, boxes xyxy (N, 4), labels (N,)) for <set_dir>/gt.json + images/."""
    yield from read_labelled(os.path.join(set_dir, "gt.json"), os.path.join(set_dir, "images"))


def read_labelled(gt_path: str, images_dir: str, warn=None):
    """Yield (image RGB, boxes xyxy (N, 4) pixels, labels (N,) category index) of each image of a
    COCO file (file names relative to images_dir) that has boxes over 1 px. Annotations with a score
    are detections, not labels, and are left out. An image that cannot be read, or whose size
    differs from the file's width/height, raises ImageLoadError; with `warn` (a callable taking a
    message) it is skipped with a warning instead."""
    from exports import read_coco  # dataset formats live in exports/
    gt = read_coco(gt_path)
    cat_index = {name: i for i, name in enumerate(gt.categories)}
    for record in gt.images:
        anns = [a for a in gt.annotations_for(record.file_name)
                if a.score is None and a.box[2] - a.box[0] > 1 and a.box[3] - a.box[1] > 1]
        if not anns:
            continue
        try:
            image = load_image(os.path.join(images_dir, record.file_name))
            if image.shape[:2] != (record.height, record.width):
                raise ImageLoadError(f"it is {image.shape[1]} x {image.shape[0]} px, the labels were "
                                     f"drawn on {record.width} x {record.height}")
        except ImageLoadError as e:
            if warn is None:
                raise
            warn(f"skipped {record.file_name}: {e}")
            continue
        yield (image, np.array([a.box for a in anns], np.float32),
               np.array([cat_index[a.category] for a in anns]))


SYNTHETIC_GROUP = "synthetic"  # group of a synthetic scene: this prefix + the scene number


class EpisodeSampler:
    """Draws training episodes from cached images."""

    def __init__(self, images: list[CachedImage], seed: int = 0, max_prompts: int = 3,
                 cross_image_prob: float = 0.3, point_prob: float = 0.2, absent_prob: float = 0.0,
                 balance_sets: bool = False):
        """balance_sets: target images are drawn set by set - a synthetic scene as often as before
        (its share of the images), otherwise a real set uniformly, then one of its images - so that
        a small set is seen as often as a large one. Default: images uniformly."""
        self.images = images
        self.balance_sets = balance_sets
        self.synthetic_images: list[int] = []
        self.set_images: dict[str, list[int]] = {}   # real set -> its images
        for i, im in enumerate(images):
            if im.group.startswith(SYNTHETIC_GROUP):
                self.synthetic_images.append(i)
            else:
                self.set_images.setdefault(im.group, []).append(i)
        self.rng = np.random.default_rng(seed)
        self.max_prompts, self.cross_p, self.point_p = max_prompts, cross_image_prob, point_prob
        self.absent_p = absent_prob
        self.by_group_label: dict[tuple[str, int], list[int]] = {}
        for i, im in enumerate(images):
            for lab in set(im.labels.tolist()):
                self.by_group_label.setdefault((im.group, lab), []).append(i)
        self.group_labels: dict[str, set[int]] = {}
        for g, lab in self.by_group_label:
            self.group_labels.setdefault(g, set()).add(lab)
        # categories of the real sets (synthetic scenes paste crops of real objects, so a real
        # category may well be present in one)
        self.real_keys = [k for k in self.by_group_label if not k[0].startswith(SYNTHETIC_GROUP)]

    def _target_index(self) -> int:
        rng = self.rng
        if not self.balance_sets or not self.set_images:
            return int(rng.integers(len(self.images)))
        if self.synthetic_images and rng.random() < len(self.synthetic_images) / len(self.images):
            return self.synthetic_images[int(rng.integers(len(self.synthetic_images)))]
        views = list(self.set_images.values())[int(rng.integers(len(self.set_images)))]
        return views[int(rng.integers(len(views)))]

    def sample(self):
        """-> dict with target image index, prompt image index, label, prompt boxes (K, 4) canvas
        cx, cy, w, h, is_point (K,), target boxes (G, 4). With absent_prob, that share of the
        episodes (where the image's set has a category the image lacks) has no targets: the model
        learns to report nothing rather than its best guess. The missing category is one of the
        image's own set (a look-alike) or, half the time or when its set has none, a category of
        another real set (something else entirely); "group" is the set the label belongs to."""
        rng = self.rng
        i = self._target_index()
        im = self.images[i]
        labels = im.labels.numpy()
        group = im.group
        absent = None
        if self.absent_p and rng.random() < self.absent_p:
            own = sorted(self.group_labels[im.group] - set(labels.tolist()))
            foreign = ([k for k in self.real_keys if k[0] != im.group]
                       if not im.group.startswith(SYNTHETIC_GROUP) else [])
            if own and (not foreign or rng.random() < 0.5):
                absent = (im.group, int(rng.choice(own)))
            elif foreign:
                absent = foreign[int(rng.integers(len(foreign)))]
        if absent is not None:
            # prompts from an image that has the category, no targets
            group, lab = absent
            src = int(rng.choice(self.by_group_label[absent]))
        else:
            lab = int(rng.choice(np.unique(labels)))
            src = i
            peers = self.by_group_label[(im.group, lab)]
            if len(peers) > 1 and rng.random() < self.cross_p:
                src = int(rng.choice([p for p in peers if p != i]))
        src_boxes = self.images[src].boxes[self.images[src].labels == lab]
        k = int(rng.integers(1, min(self.max_prompts, len(src_boxes)) + 1))
        pick = src_boxes[torch.as_tensor(rng.choice(len(src_boxes), k, replace=False))].clone()
        # imprecise user boxes: jitter centre and size by a few percent
        jitter = torch.as_tensor(rng.normal(0, 0.04, (k, 4)), dtype=torch.float32)
        pick[:, :2] += jitter[:, :2] * pick[:, 2:]
        pick[:, 2:] *= (1 + jitter[:, 2:]).clamp(0.8, 1.2)
        is_point = torch.as_tensor(rng.random(k) < self.point_p)
        # a point lands somewhere in the central part of the object
        pick[is_point, :2] += torch.as_tensor(rng.uniform(-0.25, 0.25, (int(is_point.sum()), 2)),
                                              dtype=torch.float32) * pick[is_point, 2:]
        targets = im.boxes[:0] if absent is not None else im.boxes[im.labels == lab]
        return {"target": i, "source": src, "label": lab, "group": group, "prompts": pick.clamp(0, 1),
                "is_point": is_point, "targets": targets}


def hflip_boxes(b: torch.Tensor) -> torch.Tensor:
    """Mirror cx, cy, w, h boxes of a canvas the image fills entirely."""
    b = b.clone()
    b[:, 0] = 1 - b[:, 0]
    return b
