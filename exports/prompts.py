"""Prompt files (DESIGN.md section 2): visual prompts stored as a COCO dataset.

On disk::

    {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 640, "height": 480}],
     "categories": [{"id": 1, "name": "tomato", "text": "a ripe tomato"}],
     "annotations": [
       {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 30]},
       {"id": 2, "image_id": 1, "category_id": 1, "point": [100, 80]},
       {"id": 3, "image_id": 1, "category_id": 1, "bbox": [200, 20, 30, 30], "negative": true}]}

``file_name`` is relative to the prompt file's folder (POSIX, may use ".."). Each
annotation has exactly one of ``bbox`` ([x, y, w, h] pixels) or ``point`` ([x, y]).

In memory (:class:`PromptSet`): images are absolute resolved paths, boxes xyxy float
pixels, points xy float pixels, in the EXIF-corrected frame.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_write_json, check_relative_posix, read_json
from .boxes import clip_xyxy, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["Prompt", "PromptCategory", "PromptSet", "read_prompts", "write_prompts"]

_RESERVED_ANN_KEYS = {"id", "image_id", "category_id", "bbox", "point", "negative", "area",
                      "iscrowd"}
_DECIMALS = 2


@dataclass(frozen=True)
class PromptCategory:
    """A category: ``name`` (the key) and an optional text prompt ``text``."""
    name: str
    text: str | None = None


@dataclass(frozen=True)
class Prompt:
    """One exemplar on one image.

    image: path of the image file (stored absolute and resolved). category: category name.
    box: (x1, y1, x2, y2) float pixels, or None for a point prompt.
    point: (x, y) float pixels, or None for a box prompt.
    negative: True for an example of what must NOT be detected.
    extra: other keys of the annotation on disk (e.g. ``gt_ann_id``), kept on round trip.
    """
    image: Path
    category: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    negative: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "image", _resolve(self.image))
        if (self.box is None) == (self.point is None):
            raise ValueError(f"prompt on {self.image}: give exactly one of box or point")


@dataclass
class PromptSet:
    """Categories and prompts of a prompt file.

    image_sizes maps each image (absolute path, file order) to its (W, H); images may have
    no prompts. ``source`` is the file it was read from, if any.
    """
    categories: list[PromptCategory]
    prompts: list[Prompt]
    image_sizes: dict[Path, tuple[int, int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    source: Path | None = None

    def __post_init__(self):
        self.image_sizes = {_resolve(k): v for k, v in self.image_sizes.items()}

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def text_for(self, name: str) -> str | None:
        """The text prompt of category ``name`` (None if it has none)."""
        for c in self.categories:
            if c.name == name:
                return c.text
        raise KeyError(f"unknown category {name!r}; categories are {self.category_names}")

    def images(self) -> list[Path]:
        """Every image of the set (absolute paths), file order, then any only in prompts."""
        seen = dict.fromkeys(self.image_sizes)
        for p in self.prompts:
            seen.setdefault(p.image, None)
        return list(seen)

    def select(self, image=None, category: str | None = None,
               negative: bool | None = None) -> list[Prompt]:
        """Prompts filtered by image (any path to the same file), category and negative flag."""
        target = None if image is None else _resolve(image)
        return [p for p in self.prompts
                if (target is None or p.image == target)
                and (category is None or p.category == category)
                and (negative is None or p.negative == negative)]

    def boxes(self, image, category: str, negative: bool = False) -> np.ndarray:
        """(N, 4) xyxy float boxes of one image and category."""
        b = [p.box for p in self.select(image, category, negative) if p.box is not None]
        return np.asarray(b, dtype=np.float64).reshape(-1, 4)

    def points(self, image, category: str, negative: bool = False) -> np.ndarray:
        """(M, 2) xy float points of one image and category."""
        q = [p.point for p in self.select(image, category, negative) if p.point is not None]
        return np.asarray(q, dtype=np.float64).reshape(-1, 2)


def _resolve(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _numbers(v, n: int) -> np.ndarray | None:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return None
    a = np.asarray(v, dtype=np.float64)
    return a if np.all(np.isfinite(a)) else None


def _positive_int(v, what: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{what} must be a positive integer, got {v!r}")
    return v


def read_prompts(path: str | os.PathLike) -> PromptSet:
    """Read and validate a prompt file; image paths are resolved against its folder.

    Raises ValueError naming the file and the problem (bad JSON, missing keys, unknown
    image/category ids, an annotation with neither or both of bbox/point, non-finite or
    empty boxes, boxes or points outside the image, a non-boolean ``negative``, ...).
    A box partly outside its image (``width`` x ``height``) is clipped to it.
    """
    path = Path(path)
    data = read_json(path, "prompt file")
    src = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: prompt file must be a JSON object")
    for key in ("images", "categories", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{src}: prompt file needs a list '{key}'")
    folder = _resolve(path).parent

    sizes: dict[Path, tuple[int, int]] = {}
    img_by_id: dict[int, tuple[Path, int, int]] = {}
    for n, im in enumerate(data["images"]):
        where = f"{src}: images[{n}]"
        if not isinstance(im, dict):
            raise ValueError(f"{where}: must be an object")
        iid = im.get("id")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise ValueError(f"{where}: 'id' must be an integer")
        if iid in img_by_id:
            raise ValueError(f"{where}: duplicate image id {iid}")
        fn = im.get("file_name")
        if not isinstance(fn, str):
            raise ValueError(f"{where}: 'file_name' must be a string")
        fn = check_relative_posix(fn, allow_parent=True,
                                  what=f"{where} file_name (relative to the prompt file's folder)")
        w = _positive_int(im.get("width"), f"{where} width")
        h = _positive_int(im.get("height"), f"{where} height")
        abs_path = _resolve(folder / fn)
        if abs_path in sizes:
            raise ValueError(f"{where}: image {fn!r} is listed twice")
        sizes[abs_path] = (w, h)
        img_by_id[iid] = (abs_path, w, h)

    categories: list[PromptCategory] = []
    cat_by_id: dict[int, str] = {}
    for n, c in enumerate(data["categories"]):
        where = f"{src}: categories[{n}]"
        if not isinstance(c, dict):
            raise ValueError(f"{where}: must be an object")
        cid, name, text = c.get("id"), c.get("name"), c.get("text")
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise ValueError(f"{where}: 'id' must be an integer")
        if cid in cat_by_id:
            raise ValueError(f"{where}: duplicate category id {cid}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        if name in cat_by_id.values():
            raise ValueError(f"{where}: duplicate category name {name!r}")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise ValueError(f"{where}: 'text' must be a non-empty string when present")
        cat_by_id[cid] = name
        categories.append(PromptCategory(name, text))

    prompts: list[Prompt] = []
    for n, a in enumerate(data["annotations"]):
        where = f"{src}: annotations[{n}]"
        if not isinstance(a, dict):
            raise ValueError(f"{where}: must be an object")
        iid, cid = a.get("image_id"), a.get("category_id")
        if iid not in img_by_id or isinstance(iid, bool):
            raise ValueError(f"{where}: image_id {iid!r} is not in images")
        if cid not in cat_by_id or isinstance(cid, bool):
            raise ValueError(f"{where}: category_id {cid!r} is not in categories")
        has_box, has_point = "bbox" in a, "point" in a
        if has_box == has_point:
            raise ValueError(f"{where}: an annotation needs exactly one of 'bbox' or 'point' "
                             f"({'both' if has_box else 'neither'} given)")
        negative = a.get("negative", False)
        if not isinstance(negative, bool):
            raise ValueError(f"{where}: 'negative' must be true or false, got {negative!r}")
        image, w, h = img_by_id[iid]
        box = point = None
        if has_box:
            b = _numbers(a["bbox"], 4)
            if b is None:
                raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], "
                                 f"got {a['bbox']!r}")
            if b[2] <= 0 or b[3] <= 0:
                raise ValueError(f"{where}: bbox {a['bbox']} has width or height <= 0")
            clipped = clip_xyxy(xywh_to_xyxy(b), w, h)[0]
            if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                raise ValueError(f"{where}: bbox {a['bbox']} lies outside the {w}x{h} image")
            box = tuple(float(v) for v in clipped)   # a box partly outside: the part inside
        else:
            q = _numbers(a["point"], 2)
            if q is None:
                raise ValueError(f"{where}: point must be 2 finite numbers [x, y], "
                                 f"got {a['point']!r}")
            if not (0 <= q[0] <= w and 0 <= q[1] <= h):
                raise ValueError(f"{where}: point {a['point']} lies outside the {w}x{h} image")
            point = (float(q[0]), float(q[1]))
        extra = {k: v for k, v in a.items() if k not in _RESERVED_ANN_KEYS}
        prompts.append(Prompt(image, cat_by_id[cid], box, point, negative, extra))

    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    return PromptSet(categories, prompts, sizes, info, source=Path(path))


def write_prompts(path: str | os.PathLike, prompt_set: PromptSet,
                  info: dict | None = None) -> dict:
    """Write ``prompt_set`` atomically as a prompt file at ``path``; returns the dict written.

    file_names are written relative to ``path``'s folder. Image sizes come from
    ``prompt_set.image_sizes`` or, if missing, from the image header
    (trex2.image_io.image_size). Boxes are clipped to the image; a box empty after
    clipping, a point outside the image, or a prompt on an unknown category is a ValueError.
    """
    path = Path(path)
    folder = _resolve(path).parent
    names = [c.name for c in prompt_set.categories]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate category names in {names}")

    images, img_ids = [], {}
    for image in prompt_set.images():
        abs_img = _resolve(image)
        if abs_img in img_ids:
            continue
        size = prompt_set.image_sizes.get(abs_img)
        if size is None:
            from trex2.image_io import image_size
            size = image_size(abs_img)
        w = _positive_int(size[0], f"width of {abs_img}")
        h = _positive_int(size[1], f"height of {abs_img}")
        rel = Path(os.path.relpath(abs_img, folder)).as_posix()
        img_ids[abs_img] = (len(images) + 1, w, h)
        images.append({"id": len(images) + 1, "file_name": rel, "width": w, "height": h})

    categories = []
    for j, c in enumerate(prompt_set.categories, start=1):
        if not isinstance(c.name, str) or not c.name.strip():
            raise ValueError(f"category {j}: name must be a non-empty string, got {c.name!r}")
        entry = {"id": j, "name": c.name}
        if c.text:
            entry["text"] = c.text
        categories.append(entry)
    cat_ids = {name: j for j, name in enumerate(names, start=1)}

    annotations = []
    for k, p in enumerate(prompt_set.prompts, start=1):
        where = f"prompt {k} (image {p.image}, category {p.category!r})"
        if p.category not in cat_ids:
            raise ValueError(f"{where}: category is not in the prompt set's categories {names}")
        iid, w, h = img_ids[_resolve(p.image)]
        entry = {"id": k, "image_id": iid, "category_id": cat_ids[p.category]}
        if p.box is not None:
            b = np.asarray(p.box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not np.all(np.isfinite(b)):
                raise ValueError(f"{where}: box must be 4 finite numbers, got {p.box!r}")
            x, y, bw, bh = (round(float(v), _DECIMALS) for v in xyxy_to_xywh(clip_xyxy(b, w, h))[0])
            if bw <= 0 or bh <= 0:
                raise ValueError(f"{where}: box {p.box} is empty after clipping to {w}x{h}")
            entry.update(bbox=[x, y, bw, bh], area=round(bw * bh, 4), iscrowd=0)
        else:
            q = np.asarray(p.point, dtype=np.float64).reshape(-1)
            if q.shape != (2,) or not np.all(np.isfinite(q)):
                raise ValueError(f"{where}: point must be 2 finite numbers, got {p.point!r}")
            if not (0 <= q[0] <= w and 0 <= q[1] <= h):
                raise ValueError(f"{where}: point {p.point} lies outside the {w}x{h} image")
            entry["point"] = [round(float(q[0]), _DECIMALS), round(float(q[1]), _DECIMALS)]
        if p.negative:
            entry["negative"] = True
        for key, v in p.extra.items():
            if key not in _RESERVED_ANN_KEYS:
                entry[key] = v
        annotations.append(entry)

    info_out = {"description": "prompt file (DESIGN.md section 2); file_name is relative to "
                               "this file's folder",
                "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **prompt_set.info, **(info or {})}
    data = {"info": info_out, "licenses": [], "images": images, "categories": categories,
            "annotations": annotations}
    atomic_write_json(path, data)
    return data

