"""Headless batch labeling (DESIGN.md section 3).

    python app.py label IMAGE_DIR --prompts PROMPTS.json --out OUT.json
                        [--per-image] [--score-threshold T] [--resume]

Images are read, encoded, detected and recorded one at a time, so memory stays flat over a folder
of any size. Each finished image is appended (flushed and fsynced) to the sidecar
``OUT.json.partial.jsonl``; its first line records the prompts' and weights' SHA-256 and the
options, so ``--resume`` continues a killed run (even after SIGKILL) without losing or repeating an
image (images recorded as unreadable, or changed since, are done again), and refuses different
prompts or weights.
OUT.json is assembled from the sidecar at the end and written atomically; the sidecar is then
removed.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from exports import atomic_write_text, clip_xyxy
from trex2.image_io import ImageLoadError, image_size, is_image_file, list_images, load_image
from trex2.predictor import compete_classes, respect_exemplars

SIDECAR_SUFFIX = ".partial.jsonl"
SIDECAR_FORMAT = "trex2-label-partial/1"


HELP = """Label every image under IMAGE_DIR (recursively) with the prompts in PROMPTS; write a COCO file.

Default (cross-image): all exemplars of a category, on any image of the prompt file, are pooled
into one class that is detected on every image. --per-image: each image uses only the exemplars
drawn on that same image (others get no detections). Negative exemplars, point prompts and
category text prompts are honoured. Each image is also searched mirrored left-right and the two
sets of boxes fused (--no-flip: half the time, slightly worse boxes). In cross-image mode, an
image whose objects come out much larger or smaller than the exemplars is searched again at their
scale, and one where a class is not found at all is searched again at half the scale (--no-rescale:
never). All detections above a low
floor are written with their score; info.score_threshold is the recommended acceptance threshold.

Progress is saved after every image in OUT.json.partial.jsonl: if a run stops (Ctrl-C, crash,
kill), run the same command with --resume to continue (same prompts, mode, canvas and weights;
images that could not be read, or changed since, are done again). Unreadable images, and files whose names a COCO
file cannot hold (a backslash, bytes that are not UTF-8), are skipped with a warning. The prompt
file's width/height must be each prompt image's size as displayed (EXIF orientation applied).
Exit code 0 if any image was labeled, 1 if none could be read (OUT.json is then not written), 2 on
bad input."""


class LabelError(Exception):
    """Bad input or state for ``label``; the message is shown to the user as is."""


# --------------------------------------------------------------------------- labeling core
@dataclass
class ImageResult:
    """One image's outcome. ``size`` is (H, W); ``detections`` a supervision.Detections, or None
    with ``error`` set when the file could not be read."""
    file_name: str
    path: str
    size: tuple[int, int] | None
    detections: object | None
    error: str | None = None


def file_key(path: str) -> tuple:
    """Predictor cache key for an image file: real path, mtime and size (changes when the file does)."""
    st = os.stat(path)
    return ("file", os.path.realpath(path), st.st_mtime_ns, st.st_size)


def label_folder(predictor, image_dir: str, file_names: list[str], classes, *,
                 score_threshold: float | None = None,
                 canvas: Callable[[str, tuple[int, int]], int] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 exemplars: Callable[[str], tuple[dict, dict]] | None = None,
                 rescale: bool = True) -> Iterator[ImageResult]:
    """Detect ``classes`` on each image ``image_dir/file_name``, one at a time, in order.

    ``classes``: dict name -> trex2.ClassEmbedding applied to every image, or a callable
    ``(abs_path, image_embedding) -> dict`` giving the classes of one image (per-image prompts;
    an empty dict means no detections). Unreadable images yield a result with ``error`` set.
    ``on_progress(done, total)`` is called after each image; ``should_cancel()`` is polled
    before each image and stops the generator when it returns True. ``canvas(abs_path, (H, W))``
    gives the canvas long side to encode an image at (None or no ``canvas``: the model's), or
    {canvas: [class names]} (trex2.predictor.canvas_groups: each class at its own canvas, one
    encode per canvas); a callable ``classes`` then gets the names as a third argument.
    ``exemplars(abs_path)``: ({class name: (E, 4) xyxy exemplar boxes drawn on that image},
    {class name: (K, 4) xyxy negative boxes drawn on it}); its detections then respect them
    (trex2.predictor.respect_exemplars). ``rescale``: a class with no exemplar drawn on an image,
    whose confident boxes there are much larger or smaller than its exemplars, is detected there
    again at the canvas that gives them the exemplars' size (trex2.Predictor.rescale_classes).
    """
    total = len(file_names)
    for i, rel in enumerate(file_names):
        if should_cancel is not None and should_cancel():
            return
        path = os.path.join(image_dir, rel)
        try:
            yield _label_image(predictor, rel, path, classes, score_threshold, canvas, exemplars, rescale)
        except (ImageLoadError, OSError) as e:
            yield ImageResult(rel, path, None, None, str(e))
        if on_progress is not None:
            on_progress(i + 1, total)


def _label_image(predictor, rel: str, path: str, classes, score_threshold, canvas, exemplars,
                 rescale: bool) -> ImageResult:
    """label_folder's work on one image (its arguments); ImageLoadError / OSError if it cannot be read."""
    key, (w, h), where = file_key(path), image_size(path), os.path.abspath(path)
    groups = None if canvas is None else canvas(where, (h, w))
    if not isinstance(groups, dict):
        groups = {groups: None}
    pixels = []   # the decoded image, once one of its embeddings is not cached

    def encode(size):
        emb = predictor.cached(key, size)
        if emb is None:
            if not pixels:
                pixels.append(load_image(path))
            emb = predictor.encode_image(pixels[0], key=key, size=size)
        return emb

    embs = {size: encode(size) for size in groups}
    hw = tuple(pixels[0].shape[:2]) if pixels else (h, w)    # cached: not decoded again
    drawn = exemplars(where) if exemplars is not None else ({}, {})
    parts, order = [], [] if callable(classes) else list(classes)
    for size, names in groups.items():
        if callable(classes):
            cls = classes(where, embs[size], names)
            order += list(cls)
        else:
            cls = classes if names is None else {n: classes[n] for n in names if n in classes}
        if cls:   # classes compete once all canvases are merged
            dets = predictor.detect(embs[size], cls, score_threshold=score_threshold, compete=False)
            # a class prompted from other images whose objects here are not at its exemplars'
            # scale: a second look (exemplars drawn here set the scale already)
            away = {n: c for n, c in cls.items() if n not in drawn[0]}
            parts += (predictor.rescale_classes(dets, away, size, hw, encode, score_threshold)
                      if rescale and away else [dets])
    dets = merge_detections(parts, order)
    if exemplars is not None:   # before the competition: an exemplar's class wins its object
        dets = respect_exemplars(dets, *drawn, names=order)
    return ImageResult(rel, path, hw, compete_classes(dets, score_threshold))


def merge_detections(parts: list, names: list[str]):
    """supervision.Detections of disjoint sets of classes (one per canvas) -> one, class_id the
    index of data["class_name"] in ``names`` (each part's class_id indexes its own classes)."""
    import supervision as sv

    merged = sv.Detections.merge(parts)
    if len(merged):
        merged.class_id = np.array([names.index(n) for n in merged.data["class_name"]], dtype=int)
    return merged


def exemplar_sides(boxes) -> dict[str, float | None]:
    """(class, xyxy box or (K, 4) boxes) pairs of positive exemplars -> {class:
    trex2.predictor.object_side of all its boxes, None if it has none}, classes in first-seen order."""
    from trex2.predictor import object_side

    pooled: dict[str, list] = {}
    for cls, b in boxes:
        pooled.setdefault(cls, []).append(np.asarray(b, np.float64).reshape(-1, 4))
    return {cls: object_side(np.concatenate(b)) for cls, b in pooled.items()}


def result_record(res: ImageResult, cat_index: dict[str, int]) -> dict:
    """Sidecar line for one image: boxes clipped to the image, rounded (2 decimals px, 5 for scores).

    ``dets`` rows are [category index (0-based), x1, y1, x2, y2, score]; degenerate boxes dropped.
    """
    if res.error is not None:
        return {"file_name": res.file_name, "error": res.error}
    h, w = res.size
    d = res.detections
    rows = []
    if len(d):
        xyxy = clip_xyxy(d.xyxy, w, h)
        names = d.data["class_name"]
        for k in range(len(d)):
            x1, y1, x2, y2 = (round(float(v), 2) for v in xyxy[k])
            if x2 > x1 and y2 > y1:
                rows.append([cat_index[str(names[k])], x1, y1, x2, y2, round(float(d.confidence[k]), 5)])
    return {"file_name": res.file_name, "width": int(w), "height": int(h), "dets": rows}


# --------------------------------------------------------------------------- prompts
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(path: str) -> bool:
    """True if the file starts like a safetensors file (8-byte little-endian header size, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 30


class PromptSource:
    """What ``--prompts`` names: a prompt file (kind "prompts", exports.read_prompts) or a saved
    class-embedding file (kind "embeddings", trex2.save_class_embeddings). ``categories`` are
    names in file order (OUT.json ids 1..K); ``sha256`` is the file's hash."""

    def __init__(self, path: str, kind: str, sha256: str, categories: list[str], prompt_set=None,
                 embeddings: dict | None = None):
        self.path, self.kind, self.sha256, self.categories = path, kind, sha256, categories
        self.prompt_set, self.embeddings = prompt_set, embeddings

    @classmethod
    def load(cls, path: str, ignore_text: bool = False) -> "PromptSource":
        """Read and check ``path``; LabelError naming the file on any problem. ``ignore_text``: drop
        the categories' text prompts (exemplars only)."""
        if not os.path.isfile(path):
            raise LabelError(f"prompts file not found: {path}")
        sha256 = _sha256(path)
        if path.endswith(".safetensors") or _is_safetensors(path):
            from trex2 import load_class_embeddings
            try:
                emb = load_class_embeddings(path)
            except ValueError as e:
                raise LabelError(str(e)) from None
            if not emb:
                raise LabelError(f"{path}: the class-embedding file holds no class")
            return cls(path, "embeddings", sha256, list(emb), embeddings=emb)
        from exports.prompts import read_prompts
        try:
            ps = read_prompts(path)
        except (ValueError, OSError) as e:
            raise LabelError(f"bad prompt file: {e}") from None
        if ignore_text:
            ps.categories = [dataclasses.replace(c, text=None) for c in ps.categories]
        if not ps.categories:
            raise LabelError(f"{path}: the prompt file has no categories")
        for c in ps.categories:
            if not ps.select(category=c.name, negative=False) and not c.text:
                raise LabelError(f"{path}: category {c.name!r} has no positive exemplar (box or point) "
                                 + ("(its text prompt is ignored: --ignore-text)" if ignore_text
                                    else "and no text prompt"))
        return cls(path, "prompts", sha256, ps.category_names, prompt_set=ps)

    def check_image_sizes(self, images=None, skip_unreadable: bool = False) -> None:
        """LabelError unless each prompted image (of ``images``, real paths; None: all) can be read
        and has the width x height the prompt file records, as displayed (EXIF orientation
        applied): prompts drawn in another frame or on another version of the file would land
        on the wrong pixels. skip_unreadable: an image that cannot be read is passed over (per-image
        mode, where it is one of the images labelled, skipped with a warning like any other)."""
        if self.kind != "prompts":
            return
        ps = self.prompt_set
        for image in dict.fromkeys(p.image for p in ps.prompts):
            if images is not None and str(image) not in images:
                continue
            try:
                size = image_size(image)
            except ImageLoadError as e:
                if skip_unreadable:
                    continue
                raise LabelError(f"cannot read a prompt image of {self.path}: {e}") from None
            recorded = ps.image_sizes.get(image)
            if recorded is not None and tuple(recorded) != size:
                raise LabelError(
                    f"{self.path}: image {image} is {size[0]}x{size[1]} pixels as displayed (EXIF "
                    f"orientation applied), but the prompt file records {recorded[0]}x{recorded[1]}; "
                    f"its prompts must be drawn on this file, in the displayed frame")

    def _image_embedding(self, predictor, image, canvas, name: str, pixels: dict):
        """The prompt image ``image`` encoded at the canvas of category ``name`` (canvas(path, (H, W))
        -> px or canvas_groups' {px: names}; None: the model's); ``pixels`` memoises the decoding."""
        from trex2.predictor import canvas_of
        if image not in pixels:
            try:
                pixels[image] = load_image(image)
            except ImageLoadError as e:
                raise LabelError(f"cannot read a prompt image of {self.path}: {e}") from None
        size = canvas(os.path.abspath(image), pixels[image].shape[:2]) if canvas is not None else None
        if isinstance(size, dict):
            size = canvas_of(size, name)
        return predictor.encode_image(pixels[image], key=file_key(str(image)), size=size)

    def class_sides(self) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
        """Typical exemplar size of each category in px (exemplar_sides; None without boxes; for a
        class-embedding file, the one it recorded, ClassEmbedding.object_side) -> ({category: side}
        over the whole file, {real path of an image: {category: side} of the categories prompted
        there})."""
        if self.kind != "prompts":
            return {name: self.embeddings[name].object_side for name in self.categories}, {}
        boxes: dict[str | None, list] = {None: [(name, ()) for name in self.categories]}
        for p in self.prompt_set.prompts:        # image (None: all) -> [(category, box)]
            if not p.negative:
                for image in (None, str(p.image)):
                    boxes.setdefault(image, []).append((p.category, () if p.box is None else p.box))
        sides = {image: exemplar_sides(pairs) for image, pairs in boxes.items()}
        return sides.pop(None), sides

    def _embed(self, predictor, name: str, pos: list, neg: list):
        import trex2
        text = self.prompt_set.text_for(name)
        try:
            return predictor.embed_prompts(pos, negatives=neg or None, text=text)
        except trex2.TextEncoderUnavailable as e:
            raise self._text_error(name, e) from None

    def _text_error(self, name: str, e: Exception) -> LabelError:
        return LabelError(f"category {name!r} has the text prompt {self.prompt_set.text_for(name)!r}, "
                          f"but {e}; --ignore-text detects with the exemplars alone")

    def check_text(self, predictor) -> None:
        """LabelError now (before any image is labelled) if a category has a text prompt and the
        model cannot encode text (no CLIP checkpoint): --per-image embeds its classes image by image."""
        import trex2
        if self.kind != "prompts":
            return
        needs = [n for n in self.categories if self.prompt_set.text_for(n)]
        if needs and predictor.model.text_encoder is None:
            try:
                predictor.model.attach_text_encoder()
            except trex2.TextEncoderUnavailable as e:
                raise self._text_error(needs[0], e) from None

    @staticmethod
    def _prompts_on(ps, image, emb, name: str, negative: bool) -> list:
        """[(emb, boxes (N, 4), points (M, 2))] of one image and category, or [] if it has none."""
        b, q = ps.boxes(image, name, negative), ps.points(image, name, negative)
        return [(emb, b, q)] if len(b) or len(q) else []

    def cross_image_classes(self, predictor, canvas=None) -> dict:
        """{name: ClassEmbedding}: each category's exemplars on all prompt images (each image
        encoded at the category's canvas, see label_folder), its negatives and text pooled into one
        class embedding."""
        if self.kind == "embeddings":
            return dict(self.embeddings)
        ps, pixels, out = self.prompt_set, {}, {}
        for c in ps.categories:
            pos, neg = [], []
            for image in ps.images():
                if not ps.select(image, c.name):
                    continue
                emb = self._image_embedding(predictor, image, canvas, c.name, pixels)
                pos += self._prompts_on(ps, image, emb, c.name, False)
                neg += self._prompts_on(ps, image, emb, c.name, True)
            out[c.name] = self._embed(predictor, c.name, pos, neg)
        return out

    def per_image_classes(self, predictor) -> Callable:
        """Callable (abs_path, image_embedding, names=None) -> {name: ClassEmbedding} from the
        exemplars drawn on that same file (and the category's text), for the categories ``names``
        (None: all); a category without a positive there is left out."""
        from exports.prompts import PromptSet
        by_image: dict[str, list] = {}
        for p in self.prompt_set.prompts:
            by_image.setdefault(str(p.image), []).append(p)
        subsets = {k: PromptSet(self.prompt_set.categories, v) for k, v in by_image.items()}

        def classes(path: str, emb, names=None) -> dict:
            ps, out = subsets.get(os.path.realpath(path)), {}
            for c in (ps.categories if ps is not None else ()):
                if names is not None and c.name not in names:
                    continue
                pos = self._prompts_on(ps, path, emb, c.name, False)
                if pos:
                    out[c.name] = self._embed(predictor, c.name, pos, self._prompts_on(ps, path, emb, c.name, True))
            return out
        return classes

    def exemplar_boxes(self) -> Callable[[str], tuple[dict, dict]]:
        """Callable abs_path -> ({category: (E, 4) xyxy exemplar boxes drawn on that file},
        {category: (K, 4) xyxy negative boxes}), label_folder's ``exemplars`` in either mode;
        empty for other files and for class-embedding files."""
        drawn: dict[str, tuple[dict, dict]] = {}
        if self.kind != "embeddings":
            ps = self.prompt_set
            for image in ps.images():
                drawn[str(image)] = tuple(
                    {c.name: b for c in ps.categories if len(b := ps.boxes(image, c.name, negative))}
                    for negative in (False, True))
        return lambda path: drawn.get(os.path.realpath(path), ({}, {}))

    def check_per_image(self, image_dir: str, file_names: list[str], warn) -> None:
        """LabelError if no prompt image is one of the folder's images; warnings for the rest."""
        ps = self.prompt_set
        folder = {os.path.realpath(os.path.join(image_dir, r)) for r in file_names}
        prompted = {str(p.image) for p in ps.prompts if not p.negative}
        hit = prompted & folder
        if not hit:
            raise LabelError(f"--per-image: none of the {len(prompted)} prompted images of {self.path} is under "
                             f"{image_dir} (file_name in a prompt file is relative to the prompt file's folder)")
        self.check_image_sizes(hit, skip_unreadable=True)
        if len(hit) < len(prompted):
            warn(f"--per-image: {len(prompted) - len(hit)} prompted image(s) of {self.path} are not under "
                 f"{image_dir}; their exemplars are unused")
        for c in ps.categories:
            if not ps.select(category=c.name, negative=False):
                warn(f"--per-image: category {c.name!r} has only a text prompt, and is detected on no image")


# --------------------------------------------------------------------------- sidecar
def sidecar_path(out: str) -> str:
    return out + SIDECAR_SUFFIX


def read_sidecar(path: str) -> tuple[dict, dict[str, dict], int]:
    """(header, records by file_name, byte length of the valid prefix). A torn or unparsable last
    line is ignored (the caller truncates it away); a bad line before the last is an error. A file
    recorded twice (an unreadable image retried by --resume) keeps its last record."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # lines[-1] is the text after the last newline: empty, or a torn write
    good_end, header, records = 0, None, {}
    for n, line in enumerate(lines[:-1]):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if n == len(lines) - 2 and not lines[-1]:
                break  # a complete but garbled last line: treat as torn
            raise LabelError(f"progress file {path} is corrupt at line {n + 1}; delete it to start over") from None
        if header is None:
            if rec.get("format") != SIDECAR_FORMAT:
                raise LabelError(f"{path} is not a progress file of this tool; delete it to start over")
            header = rec
        else:
            records[rec.get("file_name")] = rec
        good_end += len(line) + 1
    if header is None:
        raise LabelError(f"progress file {path} has no header (killed while starting?); delete it to start over")
    return header, records, good_end


def create_sidecar(path: str, header: dict) -> None:
    """Write a new sidecar holding only ``header``, atomically (temp file + fsync + rename)."""
    atomic_write_text(path, json.dumps(header) + "\n")


def append_record(f, rec: dict) -> None:
    """Append one JSON line and make it durable before returning."""
    f.write((json.dumps(rec) + "\n").encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())


# --------------------------------------------------------------------------- run
def _options(image_dir: str, prompts: "PromptSource", per_image: bool, canvas: str = "auto",
             weights: str | None = None, flip: bool = True, rescale: bool = True,
             ignore_text: bool = False) -> dict:
    """What decides the detections; a resumed run must match it exactly. ``weights``: the
    model file (None: the shipped one), recorded by its SHA-256."""
    from trex2.model import DEFAULT_WEIGHTS
    weights = weights or DEFAULT_WEIGHTS
    return {"image_dir": os.path.realpath(image_dir), "prompts_sha256": prompts.sha256,
            "prompts_kind": prompts.kind, "mode": "per-image" if per_image else "cross-image",
            "canvas": str(canvas), "flip": bool(flip), "rescale": bool(rescale),
            "ignore_text": bool(ignore_text),
            "weights_sha256": _sha256(weights) if os.path.isfile(weights) else weights}


def canvas_policy(prompts: "PromptSource", per_image: bool, canvas: str, base: int,
                  warn: Callable[[str], None] | None = None) -> Callable:
    """canvas(abs_path, (H, W)) -> canvas long side, or {canvas: [categories]}. "auto": each
    category at the model's size, or larger and tiled (up to trex2.predictor.MAX_CANVAS) where its
    exemplars would be too small to see, or smaller where they would be too large
    (trex2.predictor.canvas_groups; with --per-image from that image's own exemplars); a number:
    that size for every image and category. `warn` is told once per category whose objects stay
    under trex2.predictor.MIN_OBJECT_PX even at MAX_CANVAS (too small for the model on images
    that large)."""
    from trex2.predictor import MAX_CANVAS, MIN_OBJECT_PX, canvas_groups
    if canvas != "auto":
        return lambda path, hw: int(canvas)
    pooled, by_image = prompts.class_sides()
    told: set[str] = set()

    def groups(path, hw):
        sides = by_image.get(os.path.realpath(path), {}) if per_image else pooled
        for name, side in sides.items():
            seen = side * MAX_CANVAS / max(hw) if side else None
            if warn is not None and seen is not None and seen < MIN_OBJECT_PX / 2 and name not in told:
                told.add(name)
                warn(f"category {name!r}: its exemplars (about {side:.0f} px) on {hw[1]}x{hw[0]} images "
                     f"are {seen:.0f} px even at the largest canvas ({MAX_CANVAS} px, tiled), under the "
                     f"{MIN_OBJECT_PX} px the model needs: expect misses; cut the images into smaller ones")
        return canvas_groups(hw, sides, base)
    return groups


def _check_progress(out: str, options: dict, resume: bool) -> dict[str, dict] | None:
    """Records of an unfinished run to resume (None: start afresh); LabelError if the sidecar is
    there without --resume, or was made with other prompts or options."""
    side = sidecar_path(out)
    if not os.path.exists(side):
        return None
    if not resume:
        raise LabelError(f"unfinished run found: {side}\n"
                         f"  pass --resume to continue it, or delete that file to start over")
    header, records, _ = read_sidecar(side)
    changed = [k for k in options if header.get("options", {}).get(k) != options[k]]
    if changed:
        raise LabelError(f"cannot --resume: {side} was made with a different {', '.join(changed)} "
                         f"(recorded {[header['options'].get(k) for k in changed]}, now "
                         f"{[options[k] for k in changed]}); delete it to start over")
    return records


def _open_progress(out: str, options: dict, resume_records: dict | None):
    """The sidecar opened for appending (created if new; a torn last line cut off), locked."""
    side = sidecar_path(out)
    if resume_records is None:
        create_sidecar(side, {"format": SIDECAR_FORMAT, "options": options})
    f = open(side, "r+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LabelError(f"another 'label' run is writing {side}") from None
    good_end = read_sidecar(side)[2]
    f.truncate(good_end)
    f.seek(good_end)
    return f


def _write_output(out: str, file_names: list[str], records: dict[str, dict], categories: list[str],
                  info: dict) -> tuple[int, int]:
    """Assemble OUT.json from the per-image records (in ``file_names`` order), atomically.
    Returns (images written, annotations written)."""
    from exports.coco import write_coco

    done = [records[r] for r in file_names if r in records and "error" not in records[r]]
    images = ((r["file_name"], r["width"], r["height"]) for r in done)
    anns = ((r["file_name"], categories[d[0]], tuple(d[1:5]), d[5]) for r in done for d in r["dets"])
    data = write_coco(out, images, categories, anns, info=info)
    return len(data["images"]), len(data["annotations"])


def _file_state(path: str) -> list | None:
    """[mtime_ns, size] of a file (None if it cannot be stat'ed): a resumed run redoes a file that
    changed since its record was written."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _redo(record: dict | None, path: str) -> bool:
    """Whether --resume must (re)label ``path``: no record, an unreadable one, or the file changed."""
    return record is None or "error" in record or record.get("file", _file_state(path)) != _file_state(path)


def _coco_name_problem(rel: str) -> str | None:
    """Why ``rel`` (a path from list_images) cannot be a COCO file_name, or None if it can."""
    if "\\" in rel:
        return "its name holds a backslash, which COCO readers take for a Windows folder separator"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8, so a JSON file cannot hold it"
    return None


def _check_out(out: str, prompts_path: str) -> None:
    """LabelError unless OUT.json can be written: its folder exists and takes new files, and it is
    not a folder, the prompt file or an image (checked before any work, so a bad --out neither
    wastes a run nor overwrites the user's files)."""
    from exports._io import output_file_problem
    if os.path.isdir(out):
        raise LabelError(f"--out {out} is a folder; give the name of the COCO file to write")
    if os.path.realpath(out) == os.path.realpath(prompts_path):
        raise LabelError(f"--out {out} would overwrite the prompt file; give another name for the COCO file")
    if is_image_file(out):
        raise LabelError(f"--out {out} has an image file's extension; the COCO file is JSON: give a .json name")
    problem = output_file_problem(out)
    if problem:
        raise LabelError(problem)


def run(image_dir: str, prompts_path: str, out: str, *, per_image: bool = False,
        score_threshold: float | None = None, resume: bool = False, predictor=None,
        weights: str | None = None, progress: bool = True, warn=None, canvas="auto",
        flip: bool = True, rescale: bool | None = None, ignore_text: bool = False) -> dict:
    """The ``label`` command as a function. Returns a summary dict ("out" None when no image could
    be read: OUT.json is then not written); raises LabelError on bad input.
    ``flip``: flip test-time augmentation (trex2.Predictor(flip=True)); a given ``predictor`` brings
    its own setting.
    ``canvas``: "auto", a canvas long side in px, or a callable (abs_path, (H, W)) -> px used for
    every image, prompt images included (benchmarks).
    ``rescale``: the second look at each image at its objects' own scale (label_folder); None: on
    with canvas "auto" or a callable, off with a fixed canvas.
    ``ignore_text``: the prompt file's text prompts are dropped (exemplars only)."""
    if warn is None:
        from tqdm import tqdm
        warn = lambda m: tqdm.write(f"app.py label: warning: {m}", file=sys.stderr)  # noqa: E731 (keeps the bar intact)
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise LabelError(f"a score threshold is a number from 0 to 1, got {score_threshold!r}")
    if not os.path.isdir(image_dir):
        raise LabelError(f"image folder not found: {image_dir}" if not os.path.exists(image_dir)
                         else f"IMAGE_DIR must be a folder: {image_dir}")
    file_names = []
    for rel in list_images(image_dir):
        problem = _coco_name_problem(rel)
        if problem:
            warn(f"skipped {os.path.join(image_dir, rel)!r}: {problem}; rename it to label it")
        else:
            file_names.append(rel)
    if not file_names:
        raise LabelError(f"no image files under {image_dir}")
    prompts = PromptSource.load(prompts_path, ignore_text)
    if per_image and prompts.kind == "embeddings":
        raise LabelError(f"--per-image needs a prompt file with exemplars on the images; "
                         f"{prompts_path} holds saved class embeddings")
    _check_out(out, prompts_path)
    policy = canvas if callable(canvas) else None
    canvas = "custom" if policy else str(canvas)
    if canvas not in ("auto", "custom"):
        from trex2.predictor import check_canvas_size
        try:
            check_canvas_size(int(canvas) if canvas.isdigit() else -1)
        except ValueError:
            raise LabelError(f"--canvas must be 'auto' or a multiple of 32 between 64 and 8192, "
                             f"got {canvas!r}") from None
    if predictor is not None:
        flip = predictor.flip
    rescale = canvas in ("auto", "custom") if rescale is None else bool(rescale)
    options = _options(image_dir, prompts, per_image, canvas, weights, flip, rescale, ignore_text)
    records = _check_progress(out, options, resume)
    if resume and records is None:
        warn(f"--resume: no progress file {sidecar_path(out)}; starting from the beginning")
    if per_image:
        prompts.check_per_image(image_dir, file_names, warn)
    else:
        prompts.check_image_sizes()
    if predictor is None:
        import trex2
        try:
            predictor = trex2.Predictor(trex2.load_model(weights), flip=flip)
        except Exception as e:  # noqa: BLE001 - safetensors' own error type for a damaged file, too
            raise LabelError(f"cannot load the model from {weights or 'the shipped weights'}: {e}") from None
    sizes = policy or canvas_policy(prompts, per_image, canvas, predictor.model.cfg.image_size, warn)
    prompts.check_text(predictor)
    classes = prompts.per_image_classes(predictor) if per_image else prompts.cross_image_classes(predictor, sizes)
    try:
        side_f = _open_progress(out, options, records)
    except OSError as e:
        raise LabelError(f"cannot write the progress file {sidecar_path(out)}: {e}") from None
    records = dict(records or {})
    try:
        todo = [r for r in file_names if _redo(records.get(r), os.path.join(image_dir, r))]
        cat_index = {name: i for i, name in enumerate(prompts.categories)}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(file_names), initial=len(file_names) - len(todo), unit="img",
                       file=sys.stderr, dynamic_ncols=True, desc="label")
        try:
            for res in label_folder(predictor, image_dir, todo, classes, canvas=sizes,
                                    exemplars=prompts.exemplar_boxes(), rescale=rescale):
                if res.error is not None:
                    warn(f"skipped {res.error}")
                rec = {**result_record(res, cat_index), "file": _file_state(res.path)}
                append_record(side_f, rec)
                records[rec["file_name"]] = rec
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        threshold = float(predictor.score_threshold if score_threshold is None else score_threshold)
        info = {"description": "app.py label: T-Rex2-style visual-prompt detections",
                "prompts": os.path.abspath(prompts_path), "image_dir": os.path.abspath(image_dir),
                "protocol": "per-image" if per_image else "cross-image", "score_threshold": threshold,
                "canvas": canvas, "flip": bool(flip), "rescale": rescale}
        bad = [r for r in file_names if "error" in records.get(r, {})]
        n_img = n_ann = 0
        try:
            if len(bad) < len(file_names):   # nothing read: no empty file over an older OUT.json
                n_img, n_ann = _write_output(out, file_names, records, prompts.categories, info)
        except (OSError, ValueError) as e:
            raise LabelError(f"cannot write {out}: {e}\n  the detections are kept in {sidecar_path(out)}; "
                             f"fix the problem and run again with --resume") from None
    finally:
        side_f.close()
    os.unlink(sidecar_path(out))
    return {"out": out if n_img else None, "images": n_img, "annotations": n_ann, "skipped": bad,
            "score_threshold": threshold, "above_threshold": sum(d[5] >= threshold for f in file_names for d in records.get(f, {}).get("dets", ()))}


def main(argv: list[str] | None = None) -> int:
    from app.evaluate import score_arg
    ap = argparse.ArgumentParser(prog="app.py label", description=HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_dir", metavar="IMAGE_DIR", help="folder of images (searched recursively)")
    ap.add_argument("--prompts", required=True, metavar="PROMPTS",
                    help="prompt file (COCO JSON of exemplars, DESIGN.md section 2) or a saved "
                         "class-embedding file (trex2.save_class_embeddings)")
    ap.add_argument("--out", required=True, metavar="OUT.json", help="COCO file to write")
    ap.add_argument("--per-image", action="store_true",
                    help="each image uses only the exemplars drawn on it (default: pool all exemplars "
                         "of a category and apply them to every image)")
    ap.add_argument("--score-threshold", type=score_arg, default=None, metavar="T",
                    help="recorded as info.score_threshold (default: the model's recommended threshold); "
                         "all detections above a low floor are written regardless")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run with the same prompts")
    ap.add_argument("--weights", metavar="PATH", default=None,
                    help="model weights (.safetensors; default: the shipped trex2/weights)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU threads for the model (default: torch's; 1 is much faster on a busy machine)")
    ap.add_argument("--canvas", default="auto", metavar="auto|PX",
                    help="long side the images are resized to for the model. auto (default): 640, or, "
                         "when the exemplars would be smaller than 44 px there, larger (up to 3200) with "
                         "the image cut into overlapping 640 px tiles (about one encode per tile); a "
                         "multiple of 32 fixes it")
    ap.add_argument("--no-flip", action="store_true",
                    help="no flip test-time augmentation: each image is seen once instead of also "
                         "mirrored, about twice as fast, boxes a little less accurate (README, 'Flip')")
    ap.add_argument("--no-rescale", action="store_true",
                    help="no second look: by default (with --canvas auto) a class with no exemplar on an "
                         "image, whose confident boxes there are over 1.3x larger or smaller than its "
                         "exemplars, is searched there again at the scale that gives them the exemplars' "
                         "size and both looks are fused; a class found nowhere on an image is looked "
                         "for again at half the canvas (README, 'Second look')")
    ap.add_argument("--ignore-text", action="store_true",
                    help="detect with the exemplars alone, ignoring the prompt file's text prompts (they "
                         "need a CLIP model and weights trained with it, README 'Text prompts')")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.threads is not None:
        if a.threads < 1:
            ap.error("--threads must be >= 1")
        import torch
        torch.set_num_threads(a.threads)
    try:
        s = run(a.image_dir, a.prompts, a.out, per_image=a.per_image, score_threshold=a.score_threshold,
                resume=a.resume, weights=a.weights, progress=not a.quiet, canvas=a.canvas,
                flip=not a.no_flip, rescale=False if a.no_rescale else None, ignore_text=a.ignore_text)
    except LabelError as e:
        print(f"app.py label: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        side = sidecar_path(a.out)
        print(f"\napp.py label: interrupted" + (f"; progress is kept in {side}, run again with --resume"
                                                 if os.path.exists(side) else ""), file=sys.stderr)
        return 130
    if s["skipped"]:
        print(f"app.py label: skipped {len(s['skipped'])} unreadable file(s): " + ", ".join(s["skipped"]),
              file=sys.stderr)
    if s["out"] is None:
        print(f"app.py label: error: no image could be read; {a.out} not written", file=sys.stderr)
        return 1
    print(f"wrote {s['out']}: {s['images']} images, {s['annotations']} detections "
          f"({s['above_threshold']} with score >= info.score_threshold {s['score_threshold']:g})",
          file=sys.stderr)
    return 0
