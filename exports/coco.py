"""COCO object-detection files: the writer and reader used everywhere.

In memory a dataset is three lists (see :class:`CocoDataset`):

- images: ``ImageRecord(file_name, width, height)``; ``file_name`` is a relative POSIX
  path (relative to the image root), width/height in pixels of the EXIF-corrected image;
- categories: category names (ids are assigned 1.. in this order when writing;
  when reading, categories are matched by name, never by id);
- annotations: ``Annotation(image, category, box, score=None)`` with ``image`` a
  ``file_name``, ``category`` a name, ``box`` xyxy float pixels, ``score`` in [0, 1] for
  detections (None for ground truth).

On disk: ``bbox = [x, y, w, h]`` absolute pixels clipped to the image, ``area = w*h``,
``iscrowd = 0``, ids from 1, plus ``info`` and ``licenses``. Files load in
``pycocotools.coco.COCO``.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from ._io import atomic_write_json, check_relative_posix, read_json
from .boxes import clip_xyxy, xywh_to_xyxy, xyxy_to_xywh

__all__ = [
    "Annotation",
    "CocoDataset",
    "ImageRecord",
    "annotations_from_detections",
    "build_coco",
    "coco_results",
    "image_record",
    "parse_coco",
    "read_coco",
    "write_coco",
]

#: Decimals kept for bbox coordinates on disk (0.01 px).
BBOX_DECIMALS = 2


class ImageRecord(NamedTuple):
    """One image: ``file_name`` relative POSIX path, ``width``/``height`` pixels (EXIF-corrected)."""
    file_name: str
    width: int
    height: int


class Annotation(NamedTuple):
    """One box: ``image`` file_name, ``category`` name, ``box`` (x1, y1, x2, y2) float pixels,
    ``score`` confidence in [0, 1] or None for ground truth."""
    image: str
    category: str
    box: tuple[float, float, float, float]
    score: float | None = None


@dataclass
class CocoDataset:
    """A COCO dataset as read by :func:`read_coco`.

    ``image_ids`` / ``category_ids`` map file_name / category name to the ids used in the
    file (needed to build pycocotools results against this file). ``raw`` is the parsed JSON.
    """
    images: list[ImageRecord]
    categories: list[str]
    annotations: list[Annotation]
    info: dict = field(default_factory=dict)
    licenses: list = field(default_factory=list)
    image_ids: dict[str, int] = field(default_factory=dict)
    category_ids: dict[str, int] = field(default_factory=dict)
    raw: dict | None = None

    def annotations_for(self, file_name: str) -> list[Annotation]:
        """Annotations of one image, in file order."""
        return [a for a in self.annotations if a.image == file_name]


def image_record(root: str | os.PathLike, file_name: str) -> ImageRecord:
    """ImageRecord for ``root/file_name`` with the EXIF-corrected size read from the header."""
    from trex2.image_io import image_size

    file_name = check_relative_posix(file_name)
    w, h = image_size(Path(root) / file_name)
    return ImageRecord(file_name, w, h)


def annotations_from_detections(file_name: str, detections, class_names=None) -> list[Annotation]:
    """supervision.Detections of one image -> Annotations (with scores if present).

    Category names come from ``detections.data["class_name"]``, or from
    ``class_names[class_id]`` when given.
    """
    n = len(detections)
    if n == 0:
        return []
    if class_names is not None:
        names = [class_names[int(c)] for c in detections.class_id]
    else:
        if "class_name" not in detections.data:
            raise ValueError("detections carry no data['class_name']; pass class_names")
        names = [str(c) for c in detections.data["class_name"]]
    conf = detections.confidence
    out = []
    for i in range(n):
        box = tuple(float(v) for v in detections.xyxy[i])
        score = None if conf is None else float(conf[i])
        out.append(Annotation(file_name, names[i], box, score))
    return out


def _default_info() -> dict:
    return {
        "description": "written by exports.coco",
        "version": "1.0",
        "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_size(v, what: str) -> int:
    """A positive integer pixel count (integral floats such as 640.0 are accepted)."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


def check_annotations(annotations: Iterable, sizes: dict, categories) -> Iterator[tuple]:
    """Validate (image file_name, category name, xyxy box[, score]) annotations against the
    dataset's image sizes {file_name: (W, H)} and category names -> one (Annotation, its box
    clipped to the image as a (4,) float array, a "where" text for messages) per annotation.
    ValueError naming the annotation: unknown image or category, a box that is not 4 finite
    numbers, a box that is empty (width or height <= 0) after clipping."""
    for k, ann in enumerate(annotations, start=1):
        ann = Annotation(*ann)
        where = f"annotation {k} (image {ann.image!r}, category {ann.category!r})"
        if ann.image not in sizes:
            raise ValueError(f"{where}: image is not in the dataset's images")
        if ann.category not in categories:
            raise ValueError(f"{where}: category {ann.category!r} is not in the categories "
                             f"{list(categories)}")
        width, height = sizes[ann.image]
        b = np.asarray(ann.box, dtype=np.float64).reshape(-1)
        if b.shape != (4,) or not np.all(np.isfinite(b)):
            raise ValueError(f"{where}: box must be 4 finite numbers (x1, y1, x2, y2), got {ann.box!r}")
        box = clip_xyxy(b, width, height)[0]
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise ValueError(f"{where}: box {list(map(float, b))} is empty (width or height <= 0) "
                             f"after clipping to the {width}x{height} image")
        yield ann, box, where


def build_coco(images: Iterable, categories: Iterable[str], annotations: Iterable,
               info: dict | None = None, licenses: list | None = None) -> dict:
    """Build a COCO dict (see module doc). Raises ValueError naming the offending entry for
    duplicate/invalid file names or categories, unknown images or categories in annotations,
    non-finite boxes or scores, and boxes whose w or h is <= 0 after clipping.

    images: iterable of (file_name, width, height); categories: names;
    annotations: iterable of (image file_name, category name, xyxy box[, score]).
    """
    out_images, index = [], {}
    for i, rec in enumerate(images, start=1):
        file_name, width, height = rec
        file_name = check_relative_posix(file_name, what=f"image {i} file_name")
        if file_name in index:
            raise ValueError(f"duplicate image file_name {file_name!r}")
        width = _check_size(width, f"image {file_name!r} width")
        height = _check_size(height, f"image {file_name!r} height")
        index[file_name] = (i, width, height)
        out_images.append({"id": i, "file_name": file_name, "width": width, "height": height})

    out_cats, cat_ids = [], {}
    for j, name in enumerate(categories, start=1):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"category {j}: name must be a non-empty string, got {name!r}")
        if name in cat_ids:
            raise ValueError(f"duplicate category name {name!r}")
        cat_ids[name] = j
        out_cats.append({"id": j, "name": name, "supercategory": ""})

    out_anns = []
    sizes = {name: (w, h) for name, (_, w, h) in index.items()}
    for k, (ann, box, where) in enumerate(check_annotations(annotations, sizes, cat_ids), start=1):
        bbox = [round(float(v), BBOX_DECIMALS) for v in xyxy_to_xywh(box)[0]]
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise ValueError(f"{where}: box {bbox} is empty (width or height <= 0) after rounding")
        entry = {"id": k, "image_id": index[ann.image][0], "category_id": cat_ids[ann.category],
                 "bbox": bbox, "area": round(bbox[2] * bbox[3], 4), "iscrowd": 0}
        if ann.score is not None:
            score = float(ann.score)
            if not math.isfinite(score):
                raise ValueError(f"{where}: score must be finite, got {ann.score!r}")
            entry["score"] = round(score, 6)
        out_anns.append(entry)

    return {
        "info": {**_default_info(), **(info or {})},
        "licenses": list(licenses or []),
        "images": out_images,
        "categories": out_cats,
        "annotations": out_anns,
    }


def write_coco(path: str | os.PathLike, images: Iterable, categories: Iterable[str],
               annotations: Iterable, info: dict | None = None,
               licenses: list | None = None) -> dict:
    """Build (see :func:`build_coco`) and write a COCO file atomically; returns the dict."""
    data = build_coco(images, categories, annotations, info=info, licenses=licenses)
    atomic_write_json(path, data)
    return data


def _need(d: dict, key: str, typ, where: str):
    if key not in d:
        raise ValueError(f"{where}: missing '{key}'")
    if not isinstance(d[key], typ):
        raise ValueError(f"{where}: '{key}' has the wrong type ({type(d[key]).__name__})")
    return d[key]


def parse_coco(data: dict, source: str = "<dict>", *, strict_names: bool = True,
               skipped: list[str] | None = None) -> CocoDataset:
    """Validate a loaded COCO dict and convert it to a :class:`CocoDataset` (boxes -> xyxy).

    ``source`` names the file in error messages. Annotations without ``bbox`` (e.g. point
    prompts) are an error here; read prompt files with :mod:`exports.prompts`.
    ``strict_names=False`` (files of other tools, e.g. for scoring): a ``file_name`` may be any
    non-empty string (absolute, Windows or "./" paths) and width/height may be missing (0).
    ``skipped`` (a list): an annotation that fails its checks is left out and its error message
    appended there, instead of failing the whole file (images and categories stay strict).
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: top level must be a JSON object")
    images_raw = _need(data, "images", list, source)
    cats_raw = _need(data, "categories", list, source)
    anns_raw = _need(data, "annotations", list, source)

    images, image_ids, by_id = [], {}, {}
    for n, im in enumerate(images_raw):
        where = f"{source}: images[{n}]"
        if not isinstance(im, dict):
            raise ValueError(f"{where}: must be an object")
        iid = _need(im, "id", int, where)
        fn = _need(im, "file_name", str, where)
        if strict_names:
            fn = check_relative_posix(fn, allow_parent=True, what=f"{where} file_name")
        elif not fn.strip():
            raise ValueError(f"{where}: 'file_name' is empty")
        w, h = ((_check_size(_need(im, k, (int, float), where), f"{where} {k}")
                 if strict_names or k in im else 0) for k in ("width", "height"))
        if iid in by_id:
            raise ValueError(f"{where}: duplicate image id {iid}")
        if fn in image_ids:
            raise ValueError(f"{where}: duplicate file_name {fn!r}")
        rec = ImageRecord(fn, w, h)
        images.append(rec)
        image_ids[fn] = iid
        by_id[iid] = rec

    categories, category_ids, cat_by_id = [], {}, {}
    for n, c in enumerate(cats_raw):
        where = f"{source}: categories[{n}]"
        if not isinstance(c, dict):
            raise ValueError(f"{where}: must be an object")
        cid = _need(c, "id", int, where)
        name = _need(c, "name", str, where)
        if cid in cat_by_id:
            raise ValueError(f"{where}: duplicate category id {cid}")
        if name in category_ids:
            raise ValueError(f"{where}: duplicate category name {name!r}")
        categories.append(name)
        category_ids[name] = cid
        cat_by_id[cid] = name

    annotations = []
    for n, a in enumerate(anns_raw):
        try:
            annotations.append(_annotation(a, f"{source}: annotations[{n}]", by_id, cat_by_id))
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append(str(e))

    info = data.get("info") or {}
    licenses = data.get("licenses") or []
    return CocoDataset(images, categories, annotations, info=info, licenses=licenses,
                       image_ids=image_ids, category_ids=category_ids, raw=data)


def _annotation(a, where: str, by_id: dict, cat_by_id: dict) -> Annotation:
    """One raw COCO annotation, checked (ValueError naming `where`) -> Annotation (box xyxy)."""
    if not isinstance(a, dict):
        raise ValueError(f"{where}: must be an object")
    iid = _need(a, "image_id", int, where)
    cid = _need(a, "category_id", int, where)
    if iid not in by_id:
        raise ValueError(f"{where}: image_id {iid} is not in images")
    if cid not in cat_by_id:
        raise ValueError(f"{where}: category_id {cid} is not in categories")
    bbox = _need(a, "bbox", list, where)
    b = np.asarray(bbox, dtype=np.float64) if all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox) else None
    if b is None or b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if b[2] < 0 or b[3] < 0:
        raise ValueError(f"{where}: bbox {bbox} has negative width or height")
    score = a.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)) \
                or not math.isfinite(score):
            raise ValueError(f"{where}: score must be a finite number, got {score!r}")
        score = float(score)
    box = tuple(float(v) for v in xywh_to_xyxy(b)[0])
    return Annotation(by_id[iid].file_name, cat_by_id[cid], box, score)


def read_coco(path: str | os.PathLike) -> CocoDataset:
    """Read and validate a COCO file (see :func:`parse_coco`). Errors name the file."""
    return parse_coco(read_json(path, "COCO file"), source=str(path))


def coco_results(pred: CocoDataset, gt: CocoDataset, *, strict: bool = True) -> list[dict]:
    """Detections of ``pred`` as a pycocotools results list (for ``COCO.loadRes``) using
    ``gt``'s ids: images matched by file_name, categories by name.

    Each result: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``; a missing
    score counts as 1.0. With ``strict`` an image or category unknown to ``gt`` is a
    ValueError; otherwise such detections are dropped.
    """
    out = []
    for n, a in enumerate(pred.annotations):
        if a.image not in gt.image_ids or a.category not in gt.category_ids:
            if strict:
                what = (f"image {a.image!r}" if a.image not in gt.image_ids
                        else f"category {a.category!r}")
                raise ValueError(f"prediction {n}: {what} is not in the ground truth")
            continue
        x, y, w, h = (float(v) for v in xyxy_to_xywh(a.box)[0])
        out.append({"image_id": gt.image_ids[a.image], "category_id": gt.category_ids[a.category],
                    "bbox": [x, y, w, h], "score": 1.0 if a.score is None else float(a.score)})
    return out
