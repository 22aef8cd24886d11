"""YOLO (Ultralytics) detection export, and a reader for checking it.

Layout written under ``out_dir``::

    images/<file_name>        the original files, copied byte for byte (or symlinked);
                              subfolders are kept, so equal basenames never collide
    labels/<file_name stem>.txt   one line per box: "class cx cy w h", normalised to [0, 1]
                              by the EXIF-corrected image size; empty file = no objects
    data.yaml                 train/val: images, nc, names (no 'path' key, so Ultralytics
                              resolves the folders relative to data.yaml itself)

Class ids are 0-based in category order. supervision's DetectionDataset.as_yolo is not
used: it re-encodes every image and flattens subfolders (refusing duplicate basenames).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable

from ._io import atomic_write_text, check_relative_posix
from .coco import Annotation, CocoDataset, ImageRecord, check_annotations

__all__ = ["read_yolo", "write_yolo"]

_DECIMALS = 6


def _label_rel(file_name: str) -> str:
    return PurePosixPath(file_name).with_suffix(".txt").as_posix()


def write_yolo(out_dir: str | os.PathLike, image_root: str | os.PathLike,
               images: Iterable, categories: Iterable[str], annotations: Iterable,
               *, symlink: bool = False) -> Path:
    """Export a dataset to YOLO format in ``out_dir`` (must not exist or be empty).

    images: (file_name, width, height) with file_name relative to ``image_root``;
    categories: names (class id = position); annotations: (file_name, category, xyxy[, score]).
    Boxes are clipped to the image; a box empty after clipping is a ValueError.
    Returns the path of data.yaml.
    """
    out_dir, image_root = Path(out_dir), Path(image_root)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"YOLO export folder exists and is not empty: {out_dir}")
    images = [ImageRecord(*rec) for rec in images]
    categories = list(categories)
    if len(set(categories)) != len(categories):
        raise ValueError(f"duplicate category names in {categories}")
    class_id = {name: i for i, name in enumerate(categories)}

    lines: dict[str, list[str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    label_owner: dict[str, str] = {}
    for rec in images:
        fn = check_relative_posix(rec.file_name)
        if fn in sizes:
            raise ValueError(f"duplicate image file_name {fn!r}")
        lab = _label_rel(fn)
        if lab in label_owner:
            raise ValueError(f"images {label_owner[lab]!r} and {fn!r} would share the label "
                             f"file {lab!r}; rename one of them")
        if not (image_root / fn).is_file():
            raise FileNotFoundError(f"image not found: {image_root / fn}")
        label_owner[lab] = fn
        sizes[fn] = (int(rec.width), int(rec.height))
        lines[fn] = []

    for ann, (x1, y1, x2, y2), _ in check_annotations(annotations, sizes, class_id):
        w, h = sizes[ann.image]
        cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
        bw, bh = (x2 - x1) / w, (y2 - y1) / h
        lines[ann.image].append(f"{class_id[ann.category]} " + " ".join(
            f"{v:.{_DECIMALS}f}" for v in (cx, cy, bw, bh)))

    for fn, rows in lines.items():
        dst = out_dir / "images" / fn
        dst.parent.mkdir(parents=True, exist_ok=True)
        src = (image_root / fn).resolve()
        if symlink:
            os.symlink(src, dst)
        else:
            shutil.copy2(src, dst)
        lab = out_dir / "labels" / _label_rel(fn)
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text("".join(r + "\n" for r in rows), encoding="utf-8")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    (out_dir / "labels").mkdir(exist_ok=True)
    # JSON strings are valid YAML scalars, so names with ':' or quotes stay safe.
    yaml_lines = ["# YOLO detection dataset written by exports.yolo",
                  "train: images", "val: images", f"nc: {len(categories)}", "names:"]
    yaml_lines += [f"  {i}: {json.dumps(name, ensure_ascii=False)}"
                   for i, name in enumerate(categories)]
    return atomic_write_text(out_dir / "data.yaml", "\n".join(yaml_lines) + "\n")


def read_yolo(out_dir: str | os.PathLike) -> CocoDataset:
    """Read a YOLO export (data.yaml, images/, labels/) back into a :class:`CocoDataset`.

    file_names are relative to ``out_dir/images``; boxes are xyxy pixels computed with the
    EXIF-corrected image size. Malformed label lines raise ValueError naming the file.
    """
    import yaml

    from trex2.image_io import image_size, list_images

    out_dir = Path(out_dir)
    meta = yaml.safe_load((out_dir / "data.yaml").read_text(encoding="utf-8"))
    names = meta.get("names")
    if isinstance(names, dict):
        categories = [str(names[i]) for i in sorted(names)]
    elif isinstance(names, list):
        categories = [str(n) for n in names]
    else:
        raise ValueError(f"{out_dir / 'data.yaml'}: 'names' must be a list or mapping")

    images, annotations = [], []
    for fn in list_images(out_dir / "images"):
        w, h = image_size(out_dir / "images" / fn)
        images.append(ImageRecord(fn, w, h))
        lab = out_dir / "labels" / _label_rel(fn)
        if not lab.exists():
            continue
        for ln, line in enumerate(lab.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                cls = int(parts[0])
                cx, cy, bw, bh = (float(v) for v in parts[1:5])
                if len(parts) != 5 or not 0 <= cls < len(categories):
                    raise ValueError
            except (ValueError, IndexError):
                raise ValueError(f"{lab}:{ln}: expected 'class cx cy w h' with a class id "
                                 f"below {len(categories)}, got {line!r}") from None
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            annotations.append(Annotation(fn, categories[cls], box))
    return CocoDataset(images, categories, annotations)
