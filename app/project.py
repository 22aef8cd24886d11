"""Labeling-project state and workflow logic for the UI, in plain Python (no Gradio).

A :class:`Project` is one image folder being labelled: its classes, the prompts the user
drew on each image, the boxes (model detections and manual boxes) with their review state,
the per-image status, an undo/redo stack, and an atomic autosave to a JSON project file.
:class:`Engine` is the process-wide model side (one ``trex2.Predictor`` with its image
embedding cache, display previews); it is shared by every browser session, while each
session owns its own Project.

Conventions (DESIGN.md section 1): boxes are ``[x1, y1, x2, y2]`` float pixels and points
``[x, y]`` in the EXIF-corrected image frame; COCO/prompt-file/YOLO conversion happens only
in ``exports/``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from exports._io import atomic_write_json

PROJECT_FORMAT = "trex2-label-project"
PROJECT_VERSION = 1
#: Statuses of an image, in workflow order.
STATUSES = ("untouched", "predicted", "reviewed")
#: Boxes of the same class overlapping more than this (IoU) are duplicates on re-detection.
DUPLICATE_IOU = 0.7
#: Default colours given to new classes, in order (distinct on light and dark images).
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000",
           "#aaffc3", "#808000", "#ffd8b1", "#000075", "#a9a9a9", "#ffe119")
UNDO_LIMIT = 100
#: Detections kept per image and class (best first) and the lowest score kept: the
#: threshold slider can go this low without re-running the model.
KEEP_PER_CLASS = 1000  # dense scenes (crowds, cells, seeds) can hold hundreds
KEEP_MIN_SCORE = 0.01
#: Image embeddings the UI keeps in memory (about 6.5 MB each for a 640x480 image), so
#: going back to an image seen recently needs no new encoding.
EMBEDDING_CACHE_IMAGES = 64
#: Class created for the first prompt of a project that has no class yet.
DEFAULT_CLASS = "object"


class ProjectError(ValueError):
    """A user action that cannot be done (message is shown to the user as is)."""


# --------------------------------------------------------------------------- records
@dataclass
class ClassInfo:
    """A label class: ``name`` (unique key), ``color`` "#rrggbb", optional text ``text``."""
    name: str
    color: str
    text: str | None = None


@dataclass
class PromptRec:
    """A visual prompt on one image. kind "box": coords [x1, y1, x2, y2]; kind "point":
    coords [x, y]; pixels. negative: an example of what must NOT be detected."""
    id: int
    cls: str
    kind: str
    coords: list[float]
    negative: bool = False


@dataclass
class BoxRec:
    """A candidate label: xyxy pixels, score in [0, 1] (None for a box drawn by hand),
    state "pending" | "accepted" | "rejected", source "model" | "manual"."""
    id: int
    cls: str
    xyxy: list[float]
    score: float | None = None
    state: str = "pending"
    source: str = "model"


@dataclass
class ImageRec:
    """One image of the folder: ``file`` POSIX path relative to the project root,
    ``size`` (W, H) pixels once known, prompts, boxes, and review flags."""
    file: str
    size: tuple[int, int] | None = None
    prompts: list[PromptRec] = field(default_factory=list)
    boxes: list[BoxRec] = field(default_factory=list)
    predicted: bool = False
    reviewed: bool = False

    @property
    def status(self) -> str:
        """"reviewed" once the user decided on it, "predicted" once the model ran on it,
        else "untouched"."""
        if self.reviewed:
            return "reviewed"
        if self.predicted:
            return "predicted"
        return "untouched"

    def to_json(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ImageRec":
        return cls(file=d["file"], size=tuple(d["size"]) if d.get("size") else None,
                   prompts=[PromptRec(**p) for p in d.get("prompts", [])],
                   boxes=[BoxRec(**b) for b in d.get("boxes", [])],
                   predicted=bool(d.get("predicted")), reviewed=bool(d.get("reviewed")))


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _duplicates(boxes, cls: str | None, xyxy) -> bool:
    """Whether a box of class `cls` (None: of any class) among `boxes` (BoxRec) overlaps xyxy by
    IoU > DUPLICATE_IOU."""
    return any(cls in (None, b.cls) and _box_iou(b.xyxy, xyxy) > DUPLICATE_IOU for b in boxes)


def _norm_box(coords, size=None) -> list[float]:
    """4 numbers -> [x1, y1, x2, y2] ordered, finite, clipped to the image when size is known."""
    b = [float(v) for v in coords]
    if len(b) != 4 or not all(np.isfinite(b)):
        raise ProjectError(f"a box needs 4 finite numbers, got {coords!r}")
    x1, x2 = sorted((b[0], b[2]))
    y1, y2 = sorted((b[1], b[3]))
    if size:
        w, h = size
        x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
        y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ProjectError("the box is too small (under 1 pixel wide or high)")
    return [round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)]


def _norm_point(coords, size=None) -> list[float]:
    p = [float(v) for v in coords]
    if len(p) != 2 or not all(np.isfinite(p)):
        raise ProjectError(f"a point needs 2 finite numbers, got {coords!r}")
    if size:
        p = [min(max(p[0], 0.0), size[0]), min(max(p[1], 0.0), size[1])]
    return [round(p[0], 2), round(p[1], 2)]


#: what each tab keeps for itself: its image, class and score threshold (another tab's choice
#: of these never changes this tab's, and is no reason to reload the project)
VIEW_KEYS = ("current", "active_class", "threshold")


def _content(saved: dict) -> dict:
    """A saved project without the view settings each tab keeps for itself (VIEW_KEYS)."""
    return {k: v for k, v in saved.items() if k not in VIEW_KEYS}


def _relative_name(file_name: str) -> str:
    """A COCO file_name as a relative POSIX path: other tools write absolute or Windows paths
    ("/data/upload/1/a.jpg", "C:\\x\\a.jpg"), which import matches by their file name."""
    parts = [p for p in file_name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":   # a Windows drive
        parts = parts[1:]
    return "/".join(parts) or file_name


def _check_decodes(path: Path) -> None:
    """OSError if the file is gone, ImageLoadError if its pixel data cannot be decoded
    (trex2.image_io.check_decodes)."""
    from app.batch import file_key
    from trex2.image_io import ImageLoadError

    error = _decode_error(file_key(str(path)))
    if error is not None:
        raise ImageLoadError(error)


@functools.lru_cache(maxsize=1 << 16)
def _decode_error(key: tuple) -> str | None:
    """Why the file of app.batch.file_key ``key`` cannot be read (None: it can); decoded once per
    file version (path, mtime, size), so an export decodes only new or changed images."""
    from trex2.image_io import ImageLoadError, check_decodes

    try:
        check_decodes(key[1])
    except ImageLoadError as e:
        return str(e)
    return None


def default_project_path(images_dir: str | os.PathLike) -> Path:
    """Where the project of a folder lives unless --project is given:
    ``$XDG_CACHE_HOME/trex2/projects/<folder name>-<hash of its absolute path>.json``."""
    root = Path(images_dir).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return cache / "trex2" / "projects" / f"{root.name or 'root'}-{digest}.json"


# --------------------------------------------------------------------------- project
class Project:
    """State of one labelling session on one folder (see module doc).

    Every mutating method records an undo step and autosaves (atomically) when
    ``autosave`` is true. Raises :class:`ProjectError` for actions that cannot be done.
    """

    def __init__(self, root: str | os.PathLike, path: str | os.PathLike | None = None,
                 autosave: bool = True):
        from trex2.image_io import list_images

        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ProjectError(f"image folder {self.root} does not exist or is not a folder")
        self.path = Path(path).resolve() if path else default_project_path(self.root)
        self.autosave = autosave
        self.classes: list[ClassInfo] = []
        self.images: list[ImageRec] = []
        self.index = 0
        self.threshold = 0.3
        self.active_class: str | None = None
        self.next_id = 1
        #: prompts on images outside the folder (from a loaded prompt file): dicts with
        #: "image" (absolute path) + PromptRec fields; used by "detect in all images".
        self.external_prompts: list[dict] = []
        #: class embeddings loaded from a file: name -> trex2.ClassEmbedding (not undoable).
        self.loaded_embeddings: dict = {}
        self._undo: list[tuple[str, dict, dict]] = []
        self._redo: list[tuple[str, dict, dict]] = []
        self.last_saved: float | None = None
        self.warnings: list[str] = []

        #: (inode, mtime, size) of the project file as this object last read or wrote it, and
        #: its content but the current image (see sync)
        self._stamp: tuple | None = None
        self._state: dict | None = None
        #: saved records (JSON) of images no longer in the folder, written back unchanged
        self._absent: list[dict] = []
        self._load(list_images(self.root), self._read_saved() if self.path.exists() else None)
        self._load_embeddings()

    def _load_embeddings(self):
        """Class embeddings from the side file beside the project file, if there is one."""
        emb_path = self.embeddings_path
        if emb_path.exists():
            try:
                import trex2
                self.loaded_embeddings = trex2.load_class_embeddings(str(emb_path))
            except Exception as e:  # noqa: BLE001 - reported, project still opens
                self.warnings.append(f"could not load class embeddings {emb_path}: {e}")

    def _load(self, files: list[str], saved: dict | None):
        """Set the state from a saved project (None: a new one) over the folder's ``files``."""
        by_file = {}
        if saved:
            self.classes = [ClassInfo(**c) for c in saved.get("classes", [])]
            self.threshold = float(saved.get("threshold", self.threshold))
            self.active_class = saved.get("active_class")
            self.next_id = int(saved.get("next_id", 1))
            self.external_prompts = list(saved.get("external_prompts", []))
            by_file = {d["file"]: ImageRec.from_json(d) for d in saved.get("images", [])}
            listed = set(files)
            # kept as they are in the file (not shown): a folder not mounted or an image moved
            # away must not cost its labels at the next save
            self._absent = [d for d in saved.get("images", []) if d["file"] not in listed]
            missing = [d["file"] for d in self._absent]
            if missing:
                self.warnings.append(
                    f"{len(missing)} image(s) of the project are not in {self.root}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; their labels "
                    f"stay in the project file (not shown, not exported) and come back with them")
        self.images = [by_file.get(f) or ImageRec(f) for f in files]
        for cls in dict.fromkeys(x.cls for im in self.images for x in (*im.prompts, *im.boxes)):
            if cls not in self.class_names:   # e.g. an image back after its class was deleted
                self._append_class(cls)
        if saved and saved.get("current") in files:
            self.index = files.index(saved["current"])
        if self.active_class not in self.class_names:
            self.active_class = self.classes[0].name if self.classes else None

    # ----------------------------------------------------------------- persistence
    @property
    def embeddings_path(self) -> Path:
        """Side file holding class embeddings loaded into this project."""
        return self.path.with_name(self.path.stem + ".embeddings.safetensors")

    @property
    def refiner_path(self) -> Path:
        """Side file holding the weights with a box refiner fitted to this project's accepted boxes
        (app.refiner_job)."""
        return self.path.with_name(self.path.stem + ".refiner.safetensors")

    def _disk_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read_saved(self) -> dict:
        try:
            stamp = self._disk_stamp()
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ProjectError(f"project file {self.path} cannot be read: {e}") from e
        if not isinstance(data, dict) or data.get("format") != PROJECT_FORMAT:
            raise ProjectError(f"{self.path} is not a {PROJECT_FORMAT} file")
        self._stamp, self._state = stamp, _content(data)
        return data

    def to_json(self) -> dict:
        return {"format": PROJECT_FORMAT, "version": PROJECT_VERSION,
                "images_dir": str(self.root), "current": self.current.file if self.images else None,
                "threshold": self.threshold, "active_class": self.active_class,
                "next_id": self.next_id, "classes": [asdict(c) for c in self.classes],
                "external_prompts": self.external_prompts,
                "images": [im.to_json() for im in self.images
                           if im.prompts or im.boxes or im.predicted or im.reviewed]
                + self._absent}

    def save(self) -> Path:
        """Write the project file atomically (temp file + os.replace)."""
        data = self.to_json()
        atomic_write_json(self.path, data, indent=None)
        self._stamp, self._state = self._disk_stamp(), _content(data)
        self.last_saved = time.time()
        return self.path

    def sync(self) -> bool:
        """Reload the project file if another Project (another browser tab or process) saved it
        since this one last read or wrote it, so that a stale copy never overwrites newer work
        when it saves next. Keeps this object's view (current image, class and threshold:
        VIEW_KEYS); clears undo/redo (their snapshots predate the other's changes). Returns
        whether it reloaded (not when only the other's view changed)."""
        from trex2.image_io import list_images

        stamp = self._disk_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        before = self._state
        saved = self._read_saved()
        if _content(saved) == before:
            return False    # the other only changed its view (VIEW_KEYS): keep the undo history
        current = self.images[self.index].file if self.images else None
        active, threshold = self.active_class, self.threshold
        self.warnings = []   # (shown when a page opens; a reload must not pile them up)
        self._load(list_images(self.root), saved)
        self._load_embeddings()
        if current is not None:
            self.index = next((i for i, im in enumerate(self.images) if im.file == current),
                              min(self.index, max(len(self.images) - 1, 0)))
        self.threshold = threshold
        if active in self.class_names:
            self.active_class = active
        self._undo.clear()
        self._redo.clear()
        return True

    def _autosave(self):
        if self.autosave:
            self.save()

    # ----------------------------------------------------------------- undo / redo
    def _snapshot(self, scope) -> dict:
        """scope: list of image indices, or None for every image."""
        idx = range(len(self.images)) if scope is None else scope
        return {"classes": [asdict(c) for c in self.classes], "active": self.active_class,
                "next_id": self.next_id, "external": copy.deepcopy(self.external_prompts),
                "images": {i: self.images[i].to_json() for i in idx}}

    def _restore(self, snap: dict):
        self.classes = [ClassInfo(**c) for c in snap["classes"]]
        self.active_class = snap["active"]
        self.next_id = max(self.next_id, snap["next_id"])
        self.external_prompts = copy.deepcopy(snap["external"])
        for i, d in snap["images"].items():
            self.images[i] = ImageRec.from_json(d)

    def _edit(self, label: str, scope=None, keep_partial: bool = False):
        """Context manager recording one undo step (scope as in :meth:`_snapshot`). On an
        exception the change is rolled back, or, with keep_partial (long runs), what was done
        so far is kept as the undo step and saved before the exception propagates."""
        project = self
        if scope and not self.images:
            self._at()

        class _Ctx:
            def __enter__(self):
                self.before = project._snapshot(scope)
                return self

            def __exit__(self, exc_type, exc, tb):
                if exc_type is not None and not keep_partial:
                    project._restore(self.before)
                    return False
                project._undo.append((label, self.before, project._snapshot(scope)))
                del project._undo[:-UNDO_LIMIT]
                project._redo.clear()
                project._autosave()
                return False

        return _Ctx()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> str:
        """Revert the last change; returns its label. ProjectError if nothing to undo."""
        if not self._undo:
            raise ProjectError("nothing to undo")
        label, before, after = self._undo.pop()
        self._restore(before)
        self._redo.append((label, before, after))
        self._goto_changed(before)
        self._autosave()
        return label

    def redo(self) -> str:
        """Re-apply the last undone change; returns its label."""
        if not self._redo:
            raise ProjectError("nothing to redo")
        label, before, after = self._redo.pop()
        self._restore(after)
        self._undo.append((label, before, after))
        self._goto_changed(after)
        self._autosave()
        return label

    def _goto_changed(self, snap):
        if len(snap["images"]) == 1:
            self.index = next(iter(snap["images"]))

    # ----------------------------------------------------------------- navigation
    def _at(self, i: int | None = None) -> int:
        """Index of image i (default: the current one); ProjectError when the folder has none."""
        if not self.images:
            raise ProjectError(f"no images in {self.root}: upload some or open another folder")
        return self.index if i is None else i

    @property
    def current(self) -> ImageRec:
        return self.images[self._at()]

    def goto(self, index: int, save: bool = True) -> ImageRec:
        """Show image ``index`` (clamped to the folder); saved so a restart resumes here (not with
        ``save`` False: browsing without the project lock must never write the file)."""
        if not self.images:
            raise ProjectError(f"no images in {self.root}")
        self.index = int(min(max(index, 0), len(self.images) - 1))
        if save:
            self._autosave()
        return self.current

    def step(self, delta: int, save: bool = True) -> ImageRec:
        """Next (+1) / previous (-1) image, wrapping around the folder (``save``: see goto)."""
        if not self.images:
            raise ProjectError(f"no images in {self.root}")
        return self.goto((self.index + delta) % len(self.images), save)

    def next_to_review(self, save: bool = True) -> ImageRec:
        """Go to the next image (after the current one, wrapping) that is not reviewed yet
        (``save``: see goto)."""
        n = len(self.images)
        self._at()
        for k in range(1, n + 1):
            i = (self.index + k) % n
            if self.images[i].status != "reviewed":
                return self.goto(i, save)
        raise ProjectError("every image is reviewed: export when ready")

    def index_of(self, file: str) -> int:
        for i, im in enumerate(self.images):
            if im.file == file:
                return i
        raise ProjectError(f"{file} is not an image of {self.root}")

    def image_path(self, i: int | None = None) -> Path:
        return self.root / self.images[self._at(i)].file

    def image_size(self, i: int | None = None) -> tuple[int, int]:
        """(W, H) of image i (EXIF-corrected), read from the header once and remembered."""
        im = self.images[self._at(i)]
        if im.size is None:
            from trex2.image_io import image_size
            im.size = tuple(int(v) for v in image_size(self.root / im.file))
        return im.size

    # ----------------------------------------------------------------- classes
    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def get_class(self, name: str) -> ClassInfo:
        for c in self.classes:
            if c.name == name:
                return c
        raise ProjectError(f"no class named {name!r}; classes are {self.class_names}")

    def add_class(self, name: str, color: str | None = None, text: str | None = None) -> ClassInfo:
        name = (name or "").strip()
        if not name:
            raise ProjectError("a class needs a name")
        if name in self.class_names:
            raise ProjectError(f"class {name!r} already exists")
        color = color or self._free_color()
        with self._edit(f"add class {name}", scope=[]):
            info = ClassInfo(name, color, (text or "").strip() or None)
            self.classes.append(info)
            self.active_class = name
        return info

    def _free_color(self) -> str:
        """The first palette colour no class uses (the palette again when all are taken)."""
        used = {c.color for c in self.classes}
        return next((c for c in PALETTE if c not in used), PALETTE[len(used) % len(PALETTE)])

    def _append_class(self, name: str, text: str | None = None) -> None:
        """Add class `name` with a free palette colour (inside a caller's undo step)."""
        self.classes.append(ClassInfo(name, self._free_color(), text))

    def ensure_class(self, name: str) -> ClassInfo:
        return self.get_class(name) if name in self.class_names else self.add_class(name)

    def update_class(self, name: str, new_name: str | None = None, color: str | None = None,
                     text: str | None = None) -> ClassInfo:
        """Rename / recolour / set the text phrase of a class (text "" clears it)."""
        info = self.get_class(name)
        new_name = (new_name or name).strip()
        if new_name != name and new_name in self.class_names:
            raise ProjectError(f"class {new_name!r} already exists")
        with self._edit(f"edit class {name}", scope=None if new_name != name else []):
            info = self.get_class(name)
            if color:
                info.color = color
            if text is not None:
                info.text = text.strip() or None
            if new_name != name:
                info.name = new_name
                for im in self.images:
                    for item in (*im.prompts, *im.boxes):
                        if item.cls == name:
                            item.cls = new_name
                for p in self.external_prompts:
                    if p["cls"] == name:
                        p["cls"] = new_name
                if self.active_class == name:
                    self.active_class = new_name
                if name in self.loaded_embeddings:
                    self.loaded_embeddings[new_name] = self.loaded_embeddings.pop(name)
        return info

    def delete_class(self, name: str) -> dict[str, int]:
        """Delete a class with its prompts and boxes (one undo step). Returns what went with it:
        {"boxes", "accepted" (of those boxes), "images" (holding them), "prompts" (external
        prompts included)}."""
        self.get_class(name)
        gone = {"boxes": 0, "accepted": 0, "images": 0, "prompts": 0}
        with self._edit(f"delete class {name}", scope=None):
            self.classes = [c for c in self.classes if c.name != name]
            for im in self.images:
                boxes = [b for b in im.boxes if b.cls == name]
                gone["boxes"] += len(boxes)
                gone["accepted"] += sum(b.state == "accepted" for b in boxes)
                gone["images"] += bool(boxes)
                gone["prompts"] += sum(p.cls == name for p in im.prompts)
                im.prompts = [p for p in im.prompts if p.cls != name]
                im.boxes = [b for b in im.boxes if b.cls != name]
            gone["prompts"] += sum(p["cls"] == name for p in self.external_prompts)
            self.external_prompts = [p for p in self.external_prompts if p["cls"] != name]
            self.loaded_embeddings.pop(name, None)
            if self.active_class == name:
                self.active_class = self.classes[0].name if self.classes else None
        return gone

    def set_active_class(self, name: str | None):
        if name is not None:
            self.get_class(name)
        self.active_class = name

    # ----------------------------------------------------------------- prompts and boxes
    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _cls(self, cls: str | None) -> str:
        """The class for a new prompt/box: given, else the active one; a project with no
        class yet gets DEFAULT_CLASS (rename it in the Classes panel)."""
        if not cls and not self.classes:
            self.classes.append(ClassInfo(DEFAULT_CLASS, PALETTE[0]))
            self.active_class = DEFAULT_CLASS
        cls = cls or self.active_class
        if not cls:
            raise ProjectError("pick a class first (Class list), then draw")
        self.get_class(cls)
        return cls

    def add_prompt(self, kind: str, coords, cls: str | None = None, negative: bool = False,
                   image: int | None = None) -> PromptRec:
        """Add a box ([x1,y1,x2,y2]) or point ([x,y]) prompt to an image (default: current)."""
        i = self.index if image is None else image
        size = self.image_size(i)
        if kind == "box":
            coords = _norm_box(coords, size)
        elif kind == "point":
            coords = _norm_point(coords, size)
        else:
            raise ProjectError(f"unknown prompt kind {kind!r} (box or point)")
        with self._edit(f"add {'negative ' if negative else ''}{kind} prompt", scope=[i]):
            cls = self._cls(cls)
            rec = PromptRec(self._new_id(), cls, kind, coords, bool(negative))
            self.images[i].prompts.append(rec)
        return rec

    def add_box(self, xyxy, cls: str | None = None) -> BoxRec:
        """A box drawn by hand: accepted at once (it is the user's own label), and the image is
        reviewed unless boxes above the threshold are still pending (as after accepting one)."""
        xyxy = _norm_box(xyxy, self.image_size())
        with self._edit("add box", scope=[self.index]):
            cls = self._cls(cls)
            rec = BoxRec(self._new_id(), cls, xyxy, None, "accepted", "manual")
            self.current.boxes.append(rec)
            self._after_review()
        return rec

    def box_to_prompt(self, item_id: int, negative: bool = False) -> PromptRec:
        """A box of the current image becomes a box prompt of its class, in one undo step: an
        exemplar ("more like this"; the box is accepted, it is a label) or, `negative`, a "not
        this" example (the box is rejected). More exemplars help: 3 more labelled ones on an
        image raised AP50 / AP75 of its other objects 0.756 / 0.397 -> 0.786 / 0.430 (the train
        sets' held-out images, README "Labeling a folder in 5 minutes")."""
        with self._edit(f"box to {'negative ' if negative else ''}prompt", scope=[self.index]):
            kind, rec = self.find(item_id)
            if kind != "box":
                raise ProjectError("select a box (not a prompt) to turn it into a prompt")
            # a box prompt of the class already on it (E pressed twice, or E then Shift+E) is
            # reused, with the sign asked for: one prompt per object, never two that contradict
            prompt = next((q for q in self.current.prompts if q.cls == rec.cls and q.kind == "box"
                           and _box_iou(q.coords, rec.xyxy) > DUPLICATE_IOU), None)
            if prompt is None:
                prompt = PromptRec(self._new_id(), rec.cls, "box", list(rec.xyxy), bool(negative))
                self.current.prompts.append(prompt)
            prompt.negative = bool(negative)
            rec.state = "rejected" if negative else "accepted"
            self._after_review()
        return prompt

    def find(self, item_id: int, image: int | None = None):
        """-> ("prompt" | "box", record) on the image (default: current)."""
        im = self.images[self._at(image)]
        for p in im.prompts:
            if p.id == item_id:
                return "prompt", p
        for b in im.boxes:
            if b.id == item_id:
                return "box", b
        raise ProjectError(f"item {item_id} is not on {im.file} (was it undone?)")

    def move(self, item_id: int, coords):
        """Move / resize a prompt or box of the current image to new coordinates."""
        kind, rec = self.find(item_id)
        size = self.image_size()
        with self._edit(f"move {kind}", scope=[self.index]):
            kind, rec = self.find(item_id)
            if kind == "prompt" and rec.kind == "point":
                rec.coords = _norm_point(coords, size)
            elif kind == "prompt":
                rec.coords = _norm_box(coords, size)
            else:
                rec.xyxy = _norm_box(coords, size)
                if rec.state != "rejected":
                    rec.state = "accepted"
                self._after_review()

    def relabel(self, item_id: int, cls: str):
        self.get_class(cls)
        with self._edit(f"relabel as {cls}", scope=[self.index]):
            kind, rec = self.find(item_id)
            rec.cls = cls
            if kind == "box":
                if rec.state != "rejected":
                    rec.state = "accepted"
                self._after_review()

    def set_negative(self, item_id: int, negative: bool):
        with self._edit("toggle negative", scope=[self.index]):
            kind, rec = self.find(item_id)
            if kind != "prompt":
                raise ProjectError("only prompts can be negative")
            rec.negative = bool(negative)

    def delete(self, item_id: int):
        """Remove a prompt or a hand-drawn box; a model box is rejected instead (kept hidden),
        so that detecting again does not bring the deleted box back."""
        with self._edit("delete", scope=[self.index]):
            kind, rec = self.find(item_id)
            im = self.current
            if kind == "box" and rec.source == "model":
                rec.state = "rejected"
                self._after_review()
                return
            im.prompts = [p for p in im.prompts if p.id != item_id]
            im.boxes = [b for b in im.boxes if b.id != item_id]

    def set_state(self, item_id: int, state: str):
        """Accept / reject / reset ("pending") one box of the current image."""
        if state not in ("accepted", "rejected", "pending"):
            raise ProjectError(f"unknown box state {state!r}")
        with self._edit(state.rstrip("ed") if state != "pending" else "reset", scope=[self.index]):
            kind, rec = self.find(item_id)
            if kind != "box":
                raise ProjectError("prompts are not accepted or rejected; delete them instead")
            rec.state = state
            self._after_review()

    def _after_review(self, i: int | None = None):
        """An image (default: the current one) is reviewed once no box above the threshold is
        still pending."""
        im = self.images[self._at(i)]
        if not any(b.state == "pending" and (b.score or 0) >= self.threshold for b in im.boxes):
            im.reviewed = True

    def accept_all(self, image: int | None = None) -> int:
        """Accept every pending box scoring >= threshold on the image; the image becomes
        reviewed. Returns how many boxes were accepted."""
        i = self.index if image is None else image
        n = 0
        with self._edit("accept all above threshold", scope=[i]):
            im = self.images[i]
            for b in im.boxes:
                if b.state == "pending" and (b.score is None or b.score >= self.threshold):
                    b.state = "accepted"
                    n += 1
            im.reviewed = True
        return n

    def mark_reviewed(self, reviewed: bool = True):
        with self._edit("mark reviewed", scope=[self.index]):
            self.current.reviewed = bool(reviewed)

    def set_threshold(self, t: float):
        """Display / accept threshold in [0, 1]; a view setting (not undoable)."""
        t = float(t)
        if not 0.0 <= t <= 1.0:
            raise ProjectError(f"threshold must be in [0, 1], got {t}")
        if t != self.threshold:
            self.threshold = t
            self._autosave()

    def visible_boxes(self, i: int | None = None) -> list[BoxRec]:
        """Boxes shown for image i: accepted ones and pending ones scoring >= threshold."""
        im = self.images[self.index if i is None else i]
        return [b for b in im.boxes if b.state == "accepted"
                or (b.state == "pending" and (b.score is None or b.score >= self.threshold))]

    def class_counts(self, i: int | None = None) -> dict[str, int]:
        """Visible boxes per class on image i (all classes, zeros included)."""
        counts = dict.fromkeys(self.class_names, 0)
        for b in self.visible_boxes(i):
            counts[b.cls] = counts.get(b.cls, 0) + 1
        return counts

    def folder_counts(self) -> dict[str, int]:
        """Accepted boxes per class over the folder."""
        counts = dict.fromkeys(self.class_names, 0)
        for im in self.images:
            for b in im.boxes:
                if b.state == "accepted":
                    counts[b.cls] = counts.get(b.cls, 0) + 1
        return counts

    def status_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for im in self.images:
            counts[im.status] += 1
        return counts

    # ----------------------------------------------------------------- detections
    def apply_detections(self, i: int, boxes: list[tuple[str, list[float], float]]) -> int:
        """Merge model detections (class, xyxy, score) into image i (no undo step: callers
        wrap this in one). Boxes are clipped to the image; per class, the KEEP_PER_CLASS best
        scoring >= KEEP_MIN_SCORE are kept. Pending model boxes are replaced; boxes the user accepted,
        rejected or drew are kept, and new detections duplicating them (same class,
        IoU > DUPLICATE_IOU) are dropped, as are those duplicating an accepted box of another class
        (an object the user labelled, e.g. a box relabelled from the detection's class). Returns
        how many new boxes were added."""
        im = self.images[i]
        w, h = self.image_size(i)
        kept = [b for b in im.boxes if b.state != "pending" or b.source == "manual"]
        decided = list(kept)
        accepted = [b for b in kept if b.state == "accepted"]
        added = 0
        per_class: dict[str, int] = {}
        for cls, xyxy, score in sorted(boxes, key=lambda d: -d[2]):
            if score < KEEP_MIN_SCORE or per_class.get(cls, 0) >= KEEP_PER_CLASS:
                continue  # too weak to ever be wanted: keeps the project file small
            per_class[cls] = per_class.get(cls, 0) + 1
            x1, y1, x2, y2 = (float(v) for v in xyxy)
            xyxy = [min(max(x1, 0.0), w), min(max(y1, 0.0), h),
                    min(max(x2, 0.0), w), min(max(y2, 0.0), h)]
            if xyxy[2] - xyxy[0] < 1 or xyxy[3] - xyxy[1] < 1:
                continue  # nothing left inside the image
            if _duplicates(decided, cls, xyxy) or _duplicates(accepted, None, xyxy):
                continue
            kept.append(BoxRec(self._new_id(), cls, [round(float(v), 2) for v in xyxy],
                               round(float(score), 4)))
            added += 1
        im.boxes = kept
        im.predicted = True
        if any(b.state == "pending" and b.score is not None and b.score >= self.threshold
               for b in im.boxes):
            im.reviewed = False
        return added

    def prompts_by_class(self, images: list[int] | None = None):
        """{class: {"pos": [(image_path, boxes (N,4), points (M,2))], "neg": [...]}} from the
        prompts on the given images (default: all, plus prompts on images outside the folder)."""
        out: dict[str, dict[str, list]] = {}
        groups: dict[tuple, dict[str, list]] = {}

        def add(path, cls, kind, coords, negative):
            g = groups.setdefault((cls, negative, str(path)), {"box": [], "point": []})
            g[kind].append(coords)

        for i in (range(len(self.images)) if images is None else images):
            for p in self.images[i].prompts:
                add(self.root / self.images[i].file, p.cls, p.kind, p.coords, p.negative)
        if images is None:
            for p in self.external_prompts:
                add(Path(p["image"]), p["cls"], p["kind"], p["coords"], p.get("negative", False))
        for (cls, negative, path), g in groups.items():
            entry = out.setdefault(cls, {"pos": [], "neg": []})
            entry["neg" if negative else "pos"].append(
                (Path(path), np.asarray(g["box"], dtype=np.float32).reshape(-1, 4),
                 np.asarray(g["point"], dtype=np.float32).reshape(-1, 2)))
        return out

    def exemplar_boxes(self, images: list[int] | None = None) -> Callable[[str], tuple[dict, dict]]:
        """app.batch.label_folder's ``exemplars`` from prompts_by_class(images): absolute path of
        an image -> ({class: (E, 4) xyxy box prompts drawn on it}, {class: (K, 4) xyxy negative
        box prompts}); ({}, {}) for an image without any."""
        drawn: dict[str, tuple[dict, dict]] = {}
        for cls, g in self.prompts_by_class(images).items():
            for negative, kind in enumerate(("pos", "neg")):
                for path, boxes, _ in g[kind]:
                    if len(boxes):
                        drawn.setdefault(os.path.abspath(path), ({}, {}))[negative][cls] = boxes
        return lambda path: drawn.get(os.path.abspath(path), ({}, {}))

    def exemplar_sides(self, images: list[int] | None = None,
                       classes: list[str] | None = None) -> dict[str, float]:
        """{class: typical positive exemplar box size in px} (trex2.predictor.object_side) over the
        prompts of prompts_by_class(images), for the classes with a positive box there; with
        images None, also the recorded size (ClassEmbedding.object_side) of a class that only
        has a loaded class embedding (what Engine.class_embeddings then uses). Decides the
        canvas each class is detected at (small objects: larger and tiled, Engine.canvas)."""
        from app.batch import exemplar_sides

        groups = self.prompts_by_class(images)
        sides = exemplar_sides((c, b) for c, g in groups.items()
                               if classes is None or c in classes for _, b, _ in g["pos"])
        if images is None:
            for c in self.classes:
                ce = self.stand_in_embedding(c, groups)
                if ce is not None and (classes is None or c.name in classes):
                    sides.setdefault(c.name, ce.object_side)
        return {c: s for c, s in sides.items() if s is not None}   # points only: no size

    def stand_in_embedding(self, c: ClassInfo, groups: dict):
        """The loaded class embedding that stands in for class `c`'s prompts (it has no positive
        prompt in `groups`, prompts_by_class(None), and no text phrase), or None."""
        if groups.get(c.name, {}).get("pos") or c.text:
            return None
        return self.loaded_embeddings.get(c.name)

    # ----------------------------------------------------------------- export
    def accepted_annotations(self) -> list[tuple[str, str, list[float]]]:
        """(file, class, xyxy) of every accepted box in the folder, folder order."""
        return [(im.file, b.cls, b.xyxy) for im in self.images for b in im.boxes
                if b.state == "accepted"]

    def export_images(self, only_reviewed: bool = False, with_boxes: bool = False
                      ) -> tuple[list[tuple[str, int, int]], list[str]]:
        """(file, W, H) of the images an export lists (every image, only reviewed ones, or
        with_boxes: only those with an accepted box), and
        the files left out because they are gone or unreadable (trex2.image_io.check_decodes
        fails, as for a JPEG cut short whose header still reads: the app cannot show or detect on
        it either): one bad file must not block the export of the rest."""
        images, skipped = [], []
        for i, im in enumerate(self.images):
            if (only_reviewed and not im.reviewed) or (with_boxes and not any(
                    b.state == "accepted" for b in im.boxes)):
                continue
            try:
                _check_decodes(self.image_path(i))
                images.append((im.file, *self.image_size(i)))
            except (OSError, ValueError):   # ImageLoadError is a ValueError
                skipped.append(im.file)
        return images, skipped

    def _exported(self, only_reviewed: bool, images: list | None) -> tuple[list, list]:
        """(images, accepted annotations on them) of an export; ``images``: export_images' list,
        when the caller has it already."""
        if images is None:
            images, _ = self.export_images(only_reviewed)
        listed = {f for f, _, _ in images}
        return images, [a for a in self.accepted_annotations() if a[0] in listed]

    def export_coco(self, out_path: str | os.PathLike, only_reviewed: bool = False,
                    images: list[tuple[str, int, int]] | None = None) -> dict:
        """Write a COCO file (exports.coco) of the accepted boxes. Every image of the folder
        is listed (or only reviewed ones; see export_images, whose list ``images`` may be given);
        file_name relative to the folder."""
        from exports.coco import write_coco

        images, anns = self._exported(only_reviewed, images)
        return write_coco(out_path, images, self.class_names, anns,
                          info={"description": f"labelled with trex2 app from {self.root}"})

    def export_yolo(self, out_dir: str | os.PathLike, only_reviewed: bool = False,
                    images: list[tuple[str, int, int]] | None = None) -> Path:
        """Write a YOLO dataset (exports.write_yolo: data.yaml, images/, labels/) of the
        accepted boxes into out_dir (must not exist or be empty); images as for export_coco.
        Returns data.yaml's path."""
        from exports import write_yolo

        images, anns = self._exported(only_reviewed, images)
        return write_yolo(out_dir, self.root, images, self.class_names, anns)

    def prompt_set(self):
        """All prompts (folder and external) as an exports.prompts.PromptSet."""
        from exports.prompts import Prompt, PromptCategory, PromptSet

        cats = [PromptCategory(c.name, c.text) for c in self.classes]
        prompts, sizes = [], {}
        for i, im in enumerate(self.images):
            if im.prompts:
                sizes[self.root / im.file] = self.image_size(i)
            for p in im.prompts:
                prompts.append(Prompt(self.root / im.file, p.cls,
                                      box=tuple(p.coords) if p.kind == "box" else None,
                                      point=tuple(p.coords) if p.kind == "point" else None,
                                      negative=p.negative))
        for p in self.external_prompts:
            prompts.append(Prompt(Path(p["image"]), p["cls"],
                                  box=tuple(p["coords"]) if p["kind"] == "box" else None,
                                  point=tuple(p["coords"]) if p["kind"] == "point" else None,
                                  negative=bool(p.get("negative"))))
        return PromptSet(cats, prompts, sizes)

    def save_prompts(self, path: str | os.PathLike) -> Path:
        """Write every prompt as a prompt file (DESIGN.md section 2) via exports.prompts."""
        from exports.prompts import write_prompts

        ps = self.prompt_set()
        if not ps.prompts:
            raise ProjectError("there are no prompts to save: draw some boxes or points first")
        write_prompts(path, ps)
        return Path(path)

    def load_prompts(self, path: str | os.PathLike) -> tuple[int, int]:
        """Add the prompts of a prompt file: those on images of this folder go on the images,
        the others are kept as external prompts (used by "detect in all images"). A prompt the
        project already has (same image, class, kind, place and sign: the file loaded twice) is
        skipped, so it does not count twice in the class average. Missing classes are created.
        Returns (added on folder images, added external)."""
        from exports.prompts import read_prompts

        ps = read_prompts(path)
        by_path = {(self.root / im.file).resolve(): i for i, im in enumerate(self.images)}

        def key(image, cls, kind, coords, negative):
            return (str(Path(image).resolve()), cls, kind,
                    tuple(round(float(v), 2) for v in coords), bool(negative))

        have = {key(self.root / im.file, q.cls, q.kind, q.coords, q.negative)
                for im in self.images for q in im.prompts}
        have |= {key(q["image"], q["cls"], q["kind"], q["coords"], q.get("negative", False))
                 for q in self.external_prompts}
        n_in = n_ext = 0
        with self._edit("load prompts", scope=None):
            for c in ps.categories:
                if c.name not in self.class_names:
                    self._append_class(c.name, c.text)
                elif c.text and not self.get_class(c.name).text:
                    self.get_class(c.name).text = c.text
            for p in ps.prompts:
                kind = "box" if p.box is not None else "point"
                coords = [float(v) for v in (p.box if p.box is not None else p.point)]
                k = key(p.image, p.category, kind, coords, p.negative)
                if k in have:
                    continue
                have.add(k)
                i = by_path.get(Path(p.image).resolve())
                if i is not None:
                    self.images[i].prompts.append(
                        PromptRec(self._new_id(), p.category, kind, coords, p.negative))
                    n_in += 1
                else:
                    self.external_prompts.append({"image": str(p.image), "id": self._new_id(),
                                                  "cls": p.category, "kind": kind,
                                                  "coords": coords, "negative": p.negative})
                    n_ext += 1
            if self.active_class is None and self.classes:
                self.active_class = self.classes[0].name
        return n_in, n_ext

    def import_coco(self, path: str | os.PathLike, shown: str | None = None) -> dict:
        """Add the boxes of a COCO file to this folder's images (one undo step). Boxes with a score
        (the output of `python app.py label`) become pending model boxes, merged as
        apply_detections merges a detection run; boxes without one (existing labels) become
        accepted boxes unless an accepted or hand-drawn box of the class already covers them
        (IoU > DUPLICATE_IOU); an image given labels is reviewed unless boxes above the threshold
        are still pending on it (the rule of a box drawn or accepted here). An image is matched as
        `app.py eval` matches (app.evaluate.ImageMatcher): by its file_name relative to the folder,
        else by the one path of the folder its file_name ends with, else by a file name that occurs
        once in the folder; an image whose size differs from the file's record is skipped (its
        boxes would be in another frame). Missing classes are created. Returns {"images", "labels", "detections": counts added, "unmatched",
        "size_mismatch", "unreadable": file_names skipped, "bad_boxes": why each annotation that
        fails its checks was left out (the rest is imported)}. `shown`: the name errors give the file
        (an upload's own name rather than its temporary path)."""
        from app.evaluate import ImageMatcher
        from exports._io import read_json
        from exports.coco import parse_coco

        try:
            raw = read_json(path, "COCO file")
            for rec in raw.get("images", []) if isinstance(raw, dict) else []:
                if isinstance(rec, dict) and isinstance(rec.get("file_name"), str):
                    rec["file_name"] = _relative_name(rec["file_name"])
            bad_boxes: list[str] = []
            data = parse_coco(raw, source=shown or str(path), skipped=bad_boxes)
        except (OSError, ValueError) as e:
            name = shown or str(path)
            msg = str(e).replace(str(path), name)
            raise ProjectError(f"cannot import {msg}" if msg.startswith(name)
                               else f"cannot import {name}: {msg}") from e
        match = ImageMatcher([{"file_name": im.file, "id": i} for i, im in enumerate(self.images)])
        where, unmatched, mismatch, unreadable = {}, [], [], []
        for rec in data.images:
            i = match(rec.file_name)
            if i is None:
                unmatched.append(rec.file_name)
                continue
            try:
                size = self.image_size(i)
            except (OSError, ValueError):   # ImageLoadError is a ValueError
                unreadable.append(rec.file_name)
                continue
            if size != (rec.width, rec.height):
                mismatch.append(rec.file_name)
            else:
                where[rec.file_name] = i
        counts = {"images": 0, "labels": 0, "detections": 0}
        with self._edit("import COCO", scope=None):
            for name in data.categories:
                if name not in self.class_names:
                    self._append_class(name)
            if self.active_class is None and self.classes:
                self.active_class = self.classes[0].name
            for file_name, i in where.items():
                anns = data.annotations_for(file_name)
                dets = [(a.category, list(a.box), float(a.score)) for a in anns if a.score is not None]
                if dets:
                    counts["detections"] += self.apply_detections(i, dets)
                im = self.images[i]
                for a in anns:
                    if a.score is not None:
                        continue
                    try:
                        box = _norm_box(a.box, self.image_size(i))
                    except ProjectError:
                        continue   # nothing of it inside the image
                    if _duplicates([b for b in im.boxes if b.state == "accepted" or b.source == "manual"],
                                   a.category, box):
                        continue
                    im.boxes.append(BoxRec(self._new_id(), a.category, box, None, "accepted", "manual"))
                    counts["labels"] += 1
                if any(a.score is None for a in anns):
                    self._after_review(i)   # labels are decisions, as a box drawn here is
                counts["images"] += bool(anns)
        return {**counts, "unmatched": unmatched, "size_mismatch": mismatch,
                "unreadable": unreadable, "bad_boxes": bad_boxes}

    def load_class_embeddings(self, path: str | os.PathLike) -> list[str]:
        """Load a class-embedding file (trex2.save_class_embeddings format): its classes are
        created if missing and used by "detect in all images" for classes without prompts.
        A copy is kept beside the project file so a restart keeps them. Returns the names."""
        import trex2

        try:
            loaded = trex2.load_class_embeddings(str(path))
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise ProjectError(f"cannot read class embeddings from {path}: {e}") from e
        with self._edit("load class embeddings", scope=[]):
            for name in loaded:
                if name not in self.class_names:
                    self._append_class(name)
            if self.active_class is None and self.classes:
                self.active_class = self.classes[0].name
        self.loaded_embeddings.update(loaded)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trex2.save_class_embeddings(str(self.embeddings_path), self.loaded_embeddings)
        return list(loaded)

    def add_uploaded(self, files: list[str | os.PathLike], subdir: str = "uploaded"
                     ) -> tuple[list[int], list[str]]:
        """Copy uploaded image files into ``root/subdir`` (unique names) and add them to the
        project. Each file is checked with trex2.image_io.load_image first; files that fail are
        skipped. Returns (the new image indices, a message per skipped file); ProjectError
        naming every file when none could be added."""
        from trex2.image_io import is_image_file, load_image

        dest_dir = self.root / subdir
        good, skipped = [], []
        for f in map(Path, files):
            try:
                if not is_image_file(f.name):
                    raise ProjectError(f"{f.name} is not an image file (by its extension)")
                load_image(f)
                good.append(f)
            except (ProjectError, OSError, ValueError) as e:   # ImageLoadError is a ValueError
                skipped.append(str(e).replace(str(f), f.name))   # an upload's name, not its temp path
        if skipped and not good:
            raise ProjectError("; ".join(skipped))
        added = []
        for f in good:
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / f.name
            k = 1
            absent = {d["file"] for d in self._absent}   # a name that still holds labels
            while dest.exists() or dest.relative_to(self.root).as_posix() in absent:
                dest = dest_dir / f"{f.stem}-{k}{f.suffix}"
                k += 1
            shutil.copyfile(f, dest)
            added.append(dest.relative_to(self.root).as_posix())
        if not added:
            return [], skipped
        self.images = sorted(self.images + [ImageRec(r) for r in added], key=lambda im: im.file)
        self._undo.clear()  # image indices changed: old undo steps no longer line up
        self._redo.clear()
        self.index = self.index_of(added[0])
        self._autosave()
        return [self.index_of(r) for r in added], skipped


# --------------------------------------------------------------------------- engine
class Engine:
    """Process-wide model side, shared by all sessions: one trex2 model + Predictor (its
    image-embedding cache included), a lock serialising model calls, and display previews.

    ``predictor`` may be injected (tests); otherwise the model loads on first use, from
    ``weights`` (a .safetensors file; None: the shipped weights).
    """

    def __init__(self, predictor=None, preview_dir: str | os.PathLike | None = None,
                 preview_max_side: int = 1600, weights: str | os.PathLike | None = None):
        self._predictor = predictor
        # absolute: a fit in the background (app.refiner_job) runs in the repository's folder
        self.weights = str(Path(weights).resolve()) if weights else None
        self.start_weights = self.weights   # what the app was started with (use_weights(None))
        self.weights_stamp: int | None = None   # modification time (ns) of the weights file loaded
        self._lock = threading.RLock()
        self.preview_dir = Path(preview_dir) if preview_dir else None
        self.preview_max_side = preview_max_side
        self._previews: dict[tuple, tuple[Path, int, int]] = {}
        self._pool = None
        self._queued = None   # the latest image prefetch (Future)
        self._hw: dict[tuple, tuple[int, int]] = {}  # image (H, W) by file key
        self._decoded: tuple | None = None  # (file key, pixels) of the last image_hw decode
        self._last_flip: bool | None = None  # flip of the last detection call: embedding() (and
                                             # with it the prefetch) encodes for it

    @property
    def predictor(self):
        with self._lock:
            if self._predictor is None:
                self._predictor, self.weights_stamp = self._load(self.weights)
            return self._predictor

    @staticmethod
    def _load(path: str | None):
        """(trex2.Predictor of the weights file `path` (None: shipped), the file's mtime in ns); the
        time is read before loading, as a fit in the background may replace the file."""
        import trex2
        stamp = os.stat(path).st_mtime_ns if path else None
        return trex2.Predictor(trex2.load_model(path), flip=True, cache_size=EMBEDDING_CACHE_IMAGES), stamp

    def use_weights(self, path: str | os.PathLike | None) -> None:
        """Switch every session to other weights (e.g. a box refiner fitted in the app; None: the
        ones the app started with). The new model is loaded before the old one is let go, so a
        file that does not load leaves the app as it was; cached image encodes are dropped."""
        path = str(Path(path).resolve()) if path else self.start_weights
        predictor, stamp = self._load(path)
        with self._lock:
            self._predictor, self.weights, self.weights_stamp = predictor, path, stamp

    @property
    def recommended_threshold(self) -> float | None:
        p = self._predictor
        return float(p.score_threshold) if p is not None and hasattr(p, "score_threshold") else None

    @staticmethod
    def _key(path: Path) -> tuple:
        """Cache key of an image file, the same as `app.batch`'s (path, mtime, size)."""
        from app.batch import file_key
        return file_key(str(path))

    @property
    def lock(self):
        """Re-entrant lock serialising every use of the shared predictor."""
        return self._lock

    @contextlib.contextmanager
    def flipped(self, on: bool | None):
        """Hold the lock with the predictor's flip test-time augmentation (trex2.Predictor.flip:
        each image also searched mirrored) set to ``on`` (None: as it is; the app's own predictor
        has it on, as `label`); restored on exit. Yields the predictor."""
        with self._lock:
            p = self.predictor
            before = p.flip
            if on is not None:
                p.flip = self._last_flip = bool(on)
            try:
                yield p
            finally:
                p.flip = before

    def preview(self, path: str | os.PathLike) -> tuple[Path, int, int]:
        """JPEG of the image for display (EXIF-corrected, long side <= preview_max_side),
        written once into preview_dir. Returns (jpeg path, original W, original H)."""
        from PIL import Image

        from trex2.image_io import load_image

        path = Path(path)
        key = self._key(path)
        hit = self._previews.get(key)
        if hit and hit[0].exists():
            return hit
        if self.preview_dir is None:
            raise RuntimeError("Engine.preview needs a preview_dir")
        rgb = load_image(path)
        h, w = rgb.shape[:2]
        im = Image.fromarray(rgb)
        scale = self.preview_max_side / max(w, h)
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        self.preview_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(repr(key).encode()).hexdigest()[:16] + ".jpg"
        out = self.preview_dir / name
        fd, tmp = tempfile.mkstemp(prefix=name, suffix=".tmp", dir=self.preview_dir)   # tabs may race
        try:
            with os.fdopen(fd, "wb") as f:
                im.save(f, "JPEG", quality=90)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._previews[key] = (out, w, h)
        return self._previews[key]

    def prefetch(self, path: str | os.PathLike | None = None, sides: dict[str, float] | None = None):
        """In a background thread (one job at a time): load the model if needed and encode
        the image at ``path`` at every canvas its classes need (exemplar sizes ``sides``, see
        ``canvas``), so the first "detect" on the image the user is looking at does not wait for
        the encoder. An encode still waiting to start is dropped for the newer one: paging fast
        through the folder must not pile up encodes that "detect" would then wait behind.
        Returns a Future."""
        import concurrent.futures

        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")

        def run():
            try:
                if path is None:
                    return self.predictor
                groups = self.canvas(self.image_hw(path), sides) or {None: None}
                return [self.embedding(path, size) for size in groups]
            except Exception as e:  # noqa: BLE001 - reported; detect raises it again
                warnings.warn(f"background {'encode of ' + str(path) if path else 'model load'} "
                              f"failed: {e}")
        future = self._pool.submit(run)
        if path is not None:
            if self._queued is not None:
                self._queued.cancel()        # no effect once it runs
            self._queued = future
        return future

    def canvas(self, hw: tuple[int, int], sides: dict[str, float | None] | None,
               classes: list[str] | None = None) -> dict | None:
        """{canvas long side: [classes]} to detect each class at on an (H, W) px image, from its
        exemplars' size in px (trex2.predictor.canvas_groups: larger and tiled only for small
        objects); None: the model's default canvas for every class (no sizes, or a predictor
        without a model config, as in tests). ``classes``: the classes to place (default those of
        ``sides``); one without a size goes to the model's canvas."""
        from trex2.predictor import canvas_groups

        cfg = getattr(getattr(self.predictor, "model", None), "cfg", None)
        if not sides or cfg is None:
            return None
        if classes is not None:
            sides = {n: sides.get(n) for n in classes}
        return canvas_groups(hw, sides, int(cfg.image_size))

    def image_hw(self, path: str | os.PathLike) -> tuple[int, int]:
        """(H, W) of an image file as loaded (EXIF-rotated); decodes it only the first time."""
        key = self._key(Path(path))
        with self._lock:
            if key not in self._hw:
                self._decode(key, Path(path))    # embedding() reuses the pixels
            return self._hw[key]

    def _decode(self, key: tuple, path: Path):
        """Pixels of the image file ``path`` (file key ``key``): the last decode is kept, its
        (H, W) remembered."""
        from trex2.image_io import load_image

        if self._decoded is None or self._decoded[0] != key:
            image = load_image(path)
            self._hw[key], self._decoded = image.shape[:2], (key, image)
        return self._decoded[1]

    def class_canvas(self, path: str | os.PathLike, sides: dict | None, cls: str) -> int | None:
        """The canvas class ``cls`` is detected at on the image at ``path`` (see ``canvas``)."""
        from trex2.predictor import canvas_of

        if not sides or cls not in sides:
            return None
        groups = self.canvas(self.image_hw(path), sides)
        return canvas_of(groups, cls) if groups else None

    def embedding(self, path: str | os.PathLike, size: int | None = None):
        """Cached trex2.ImageEmbedding of an image file (key: path, mtime, size) at canvas long
        side ``size`` px (None: the model's), with or without its mirror as the last detection
        asked (Engine.flipped); decodes the file only on a cache miss."""
        path = Path(path)
        key = self._key(path)
        with self.flipped(self._last_flip) as pred:
            hit = pred.cached(key, size)
            if hit is not None:
                return hit
            return pred.encode_image(self._decode(key, path), key=key, size=size)

    def class_embeddings(self, project: Project, images: list[int] | None,
                         classes: list[str] | None = None, sides: dict | None = None) -> dict:
        """{class: trex2.ClassEmbedding} from the prompts on ``images`` (None: all images
        and external prompts, each class averaged over all its exemplars), the class text
        phrases, and class embeddings loaded from a file (used when a class has no prompt
        of its own). Classes with nothing to go on are left out. Raises ProjectError with
        the text-encoder message when a phrase needs the missing CLIP checkpoint. ``sides``:
        exemplar sizes for the canvas of each class's prompt images (Project.exemplar_sides)."""
        import trex2

        groups = project.prompts_by_class(images)
        out = {}
        for c in project.classes:
            if classes is not None and c.name not in classes:
                continue
            g = groups.get(c.name, {"pos": [], "neg": []})
            if not g["pos"] and not c.text:
                loaded = project.stand_in_embedding(c, groups) if images is None else None
                if loaded is not None:
                    out[c.name] = loaded
                continue
            with self._lock:
                at = lambda p: self.embedding(p, self.class_canvas(p, sides, c.name))  # noqa: E731
                pos = [(at(p), b, q) for p, b, q in g["pos"]]
                neg = [(at(p), b, q) for p, b, q in g["neg"]] or None
                try:
                    out[c.name] = self.predictor.embed_prompts(pos, negatives=neg, text=c.text)
                except trex2.TextEncoderUnavailable as e:
                    raise ProjectError(f"class {c.name!r} has the text phrase {c.text!r}, "
                                       f"but: {e}") from e
        return out

    def detect(self, project: Project, i: int, class_embs: dict, sides: dict | None = None,
               flip: bool | None = None) -> list[tuple[str, list, float]]:
        """Run the model on image i with the class embeddings, each class at its canvas (exemplar
        sizes ``sides``, see ``canvas``; ``flip``: see ``flipped``) -> [(class, xyxy, score)]."""
        from app.batch import label_folder
        from trex2.image_io import ImageLoadError

        if not class_embs:
            return []
        with self.flipped(flip) as pred:   # the same per-canvas loop as "detect in all images" and `label`
            res = next(label_folder(pred, str(project.root), [project.images[i].file], class_embs,
                                    canvas=lambda path, hw: self.canvas(hw, sides, list(class_embs)),
                                    exemplars=project.exemplar_boxes([i])))
        if res.error is not None:
            raise ImageLoadError(res.error)
        return detections_to_list(res.detections, list(class_embs))


def detections_to_list(dets, names: list[str]) -> list[tuple[str, list, float]]:
    """supervision.Detections -> [(class name, [x1, y1, x2, y2], score)]."""
    out = []
    for k in range(len(dets)):
        name = (str(dets.data["class_name"][k]) if "class_name" in dets.data
                else names[int(dets.class_id[k])])
        out.append((name, [float(v) for v in dets.xyxy[k]], float(dets.confidence[k])))
    return out


# --------------------------------------------------------------------------- workflows
def detect_in_image(project: Project, engine: Engine, i: int | None = None, flip: bool | None = None) -> int:
    """"Detect in this image": each class from the prompts drawn on this image only (``flip``:
    see Engine.flipped). One undo step. Returns the number of new boxes."""
    i = project._at(i)
    if not project.images[i].prompts:
        raise ProjectError("draw a box or point on this image first (or use "
                           "'Detect in all images' to apply prompts from other images)")
    sides = project.exemplar_sides([i])
    with engine.flipped(flip):   # the prompt image is encoded as the detection will need it
        embs = engine.class_embeddings(project, [i], sides=sides)
    if not embs:
        raise ProjectError("no class has a positive prompt on this image")
    dets = engine.detect(project, i, embs, sides, flip)
    with project._edit("detect in this image", scope=[i]):
        return project.apply_detections(i, dets)


def detect_in_folder(project: Project, engine: Engine,
                     should_stop: Callable[[], bool] = lambda: False,
                     classes: list[str] | None = None, flip: bool | None = None
                     ) -> Iterator[tuple[int, int, str, str | None]]:
    """"Detect in all images": each class's prompts from every image (and loaded class
    embeddings / text phrases) averaged into one class embedding, applied to every image
    (through app.batch.label_folder, the same loop as the headless ``label`` command);
    ``flip``: each image also searched mirrored or not (Engine.flipped; None: the predictor's own
    setting, on in the app as in ``label``).

    A generator yielding (done, total, file, error) after each image, error being the
    message for an unreadable image (skipped) or None; stops early when ``should_stop()``
    is true (results so far are kept). The whole run is one undo step, autosaved at the end
    and every 20 images.
    """
    from app.batch import label_folder

    sides = project.exemplar_sides(None, classes)
    with engine.flipped(flip):   # prompt images encoded as the detection will need them
        embs = engine.class_embeddings(project, None, classes, sides)
    if not embs:
        raise ProjectError("no class has any prompt, text phrase or loaded embedding yet: "
                           "draw a box or point on an image first")
    files = [im.file for im in project.images]
    n = len(files)
    with project._edit("detect in all images", scope=None, keep_partial=True), engine.flipped(flip) as pred:
        results = label_folder(pred, str(project.root), files, embs,
                               canvas=lambda path, hw: engine.canvas(hw, sides, list(embs)),
                               should_cancel=should_stop, exemplars=project.exemplar_boxes())
        for i, res in enumerate(results):
            assert res.file_name == files[i]
            if res.error is None:
                project.apply_detections(i, detections_to_list(res.detections, list(embs)))
            if (i + 1) % 20 == 0:
                project._autosave()
            yield i + 1, n, res.file_name, res.error


def search_images(project: Project, engine: Engine, cls: str,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_progress: Callable[[int, int], None] | None = None,
                  flip: bool | None = None) -> list[tuple[int, float]]:
    """Rank the folder's images by how strongly class ``cls`` appears: the max detection
    score of that class per image (0 if none or unreadable), highest first ->
    [(image index, score)]; ``flip``: as detect_in_folder. Does not change the project."""
    from app.batch import label_folder

    project.get_class(cls)
    sides = project.exemplar_sides(None, [cls])
    with engine.flipped(flip):   # prompt images encoded as the search will need them
        embs = engine.class_embeddings(project, None, [cls], sides)
    if not embs:
        raise ProjectError(f"class {cls!r} has no prompt, text phrase or loaded embedding yet")
    scores = []
    files = [im.file for im in project.images]
    with engine.flipped(flip) as pred:
        for i, res in enumerate(label_folder(pred, str(project.root), files, embs,
                                             canvas=lambda path, hw: engine.canvas(hw, sides, list(embs)),
                                             should_cancel=should_stop,
                                             on_progress=on_progress)):
            dets = [] if res.error else detections_to_list(res.detections, [cls])
            scores.append((i, max((s for c, _, s in dets if c == cls), default=0.0)))
    scores.sort(key=lambda t: -t[1])
    return scores
