"""The labeling UI: a thin Gradio layer over app/project.py.

    python app.py [--images DIR] [--project FILE] [--host 127.0.0.1] [--port 7860]

Layout and event wiring only; the workflow logic (prompts, detection, review, undo, autosave,
export) lives in :mod:`app.project`. The canvas is a ``gr.HTML`` whose JavaScript
(app/static/canvas.js) draws the image, prompts and boxes and sends the user's edits back as
``op`` events. One model (and its image-embedding cache) is shared by the process; each
browser session has its own :class:`Session` (its own Project object) in a ``gr.State``.
Fully offline: no CDN, no web fonts, analytics off.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# Before gradio is imported: no analytics/version calls, no hub access.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")

import gradio as gr  # noqa: E402

from app.project import (Engine, Project, ProjectError, default_project_path,  # noqa: E402
                         detect_in_folder, detect_in_image, search_images)
from app.refiner_job import MAX_IMAGES as REFINER_MAX_IMAGES, MIN_IMAGES as REFINER_MIN_IMAGES  # noqa: E402
from app.refiner_job import RefinerJob, coco_subset, split_for_check  # noqa: E402
from app.refiner_job import read_check as read_refiner_check  # noqa: E402
from exports._io import atomic_write_json  # noqa: E402
from exports.prompts import PromptSet, write_prompts  # noqa: E402

STATIC = Path(__file__).resolve().parent / "static"
REPO = Path(__file__).resolve().parent.parent
DEMO_IMAGES = REPO / "demo" / "images"

#: (keys, action) shown in the UI and in the README (keyboard shortcuts).
SHORTCUTS = [
    ("B / P / M / V", "tool: box prompt / point prompt / draw a label box by hand / select"),
    ("N", "next prompts are negative (\"not this\"); with a prompt selected: toggle it"),
    ("1-9", "choose class (relabels the selected box or prompt)"),
    ("D", "detect in this image"),
    ("Shift+D", "detect in all images"),
    ("Tab / Shift+Tab", "select next / previous pending box (canvas focused)"),
    ("A", "accept the selected box (then jumps to the next)"),
    ("X or R", "reject the selected box (then jumps to the next)"),
    ("E / Shift+E", "the selected box becomes a box prompt of its class and is accepted / becomes "
                    "a negative prompt and is rejected"),
    ("Shift+A", "accept all boxes above the threshold on this image (marks it reviewed, "
                "also when it has nothing to label)"),
    ("Del / Backspace", "delete the selected prompt or box (a model box is rejected: detecting "
                        "again does not bring it back)"),
    ("Ctrl+Z / Ctrl+Shift+Z or Ctrl+Y", "undo / redo"),
    ("\u2192 or . / \u2190 or ,", "next / previous image"),
    ("U", "next image not reviewed yet"),
    ("Esc", "clear the selection"),
    ("mouse wheel / right-drag / 0", "zoom / pan / fit the image"),
]
#: How often a tab checks whether another tab or process saved its project (see on_sync_tick).
SYNC_SECONDS = 3.0
STATUS_ICON = {"untouched": "\u25cb", "predicted": "\u25d0", "reviewed": "\u25cf"}


@dataclass
class Work:
    """What the sessions on one project file share: the lock held while a handler changes the
    project (sessions on one file take turns, each syncing with the file first: see
    Project.sync), and the long run holding it, with its cancel flag."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: what the long run holding the lock does ("" when none), and the session running it
    long_job: str = ""
    owner: object = None
    cancel: bool = False
    #: the run was cancelled from another tab than its own
    cancelled_elsewhere: bool = False

    @contextlib.contextmanager
    def running(self, what: str, owner):
        """Mark a long run of session `owner` (under the lock) for its duration."""
        self.cancel = self.cancelled_elsewhere = False
        self.long_job, self.owner = what, owner
        try:
            yield
        finally:
            self.long_job, self.owner = "", None

    def doing(self, sess) -> str:
        """The long run, as seen from session `sess`: "this tab is ..." or "another tab is ..."."""
        owner, job = self.owner, self.long_job or "running a long job"   # (it may end meanwhile)
        return f"{'this tab is' if owner is sess else 'another tab is'} {job}"

    def busy_message(self, sess) -> str:
        """What an edit refused during the long run is answered."""
        return f"not applied: {self.doing(sess)}; wait for it to finish or press Cancel"

    def stop(self, sess) -> str | None:
        """Cancel the long run; a message when it is another tab's (None when nothing runs)."""
        if not self.long_job:
            return None
        self.cancel = True
        if self.owner is not sess:
            self.cancelled_elsewhere = True
            return f"stopped the run another tab started ({self.long_job})"
        return None


@dataclass
class AppConfig:
    """What every session needs: the folder, the project file, the shared engine, temp dir."""
    images_dir: Path
    project_path: Path | None
    engine: Engine
    tmp_dir: Path
    #: folders that typed-in file paths (prompt files) may be in; None: anywhere (the app
    #: is bound to this machine only, so its user is the machine's user)
    path_roots: list[Path] | None = None
    work: Work = field(default_factory=Work)
    #: the background fit of a box refiner to the accepted boxes (one per app: the model is shared)
    refiner: RefinerJob = field(default_factory=RefinerJob)


@dataclass
class Session:
    """One browser session's own state (kept in a gr.State)."""
    project: Project
    tmp_dir: Path
    selected: int | None = None
    seq: int = 0
    #: the gallery of the last search: (image file, score); by file, as indices shift
    #: when images are added
    search: list[tuple[str, float]] = field(default_factory=list)
    #: shared with the other sessions on the project file; a long run (detect in all images)
    #: makes their edits answer "busy" instead of interleaving with it
    work: Work = field(default_factory=Work)
    #: prompt files this session loaded or saved: the only existing files a save may replace
    prompt_files: set = field(default_factory=set)
    last_images_sig: tuple | None = None
    #: the Box refiner tab's status as last sent (its timer sends only changes)
    refiner_shown: str = ""
    last_classes_sig: tuple | None = None


def _acquire(sess: Session) -> bool:
    """Take the project lock: wait for short handlers, give up at once during a long run
    (detect in all images, search), so edits are refused with a message instead of hanging.
    Then bring the session's project up to date with the file (another tab may have saved)."""
    while True:
        if sess.work.lock.acquire(timeout=0.05):
            break
        if sess.work.long_job:
            return False
    try:
        if sess.project.sync():
            gr.Warning("this folder's project was changed in another tab or window: reloaded "
                       "it here first (undo history cleared)")
    except ProjectError as e:   # e.g. not a project file any more: this tab's state is kept
        gr.Warning(f"{e}; this tab's labels will be saved over it")
    except BaseException:
        sess.work.lock.release()
        raise
    return True


# ----------------------------------------------------------------------------- views
def _file_url(path: Path) -> str:
    # Relative URL: works behind a proxy root path too.
    return f"gradio_api/file={path.as_posix()}"


def build_view(sess: Session, engine: Engine, action: str | None = None,
               message: str | None = None) -> dict:
    """The canvas value (see app/static/canvas.js for its fields)."""
    p = sess.project
    sess.seq += 1
    classes = [{"name": c.name, "color": c.color} for c in p.classes]
    base = {"seq": sess.seq, "classes": classes, "active_class": p.active_class,
            "threshold": p.threshold, "action": action, "message": message or ""}
    if not p.images:
        return {**base, "image": None, "prompts": [], "boxes": [],
                "message": message or f"No images in {p.root}. Upload some in the 'Images' tab."}
    im = p.current
    if not message and not im.prompts and not im.boxes:
        message = ("drag a box around one example (or click one with the point tool), then D: "
                   "detect in this image, Shift+D: in all images")
        base["message"] = message
    try:
        preview, w, h = engine.preview(p.image_path())
    except (ValueError, OSError) as e:  # ImageLoadError is a ValueError
        return {**base, "image": None, "prompts": [], "boxes": [],
                "message": f"cannot show image {p.index + 1}/{len(p.images)}: {e} "
                           f"(Next / Prev to move on)"}
    im.size = (w, h)
    return {**base,
            "image": {"url": _file_url(preview), "width": w, "height": h, "file": im.file,
                      "index": p.index, "count": len(p.images), "status": im.status},
            "prompts": [{"id": q.id, "cls": q.cls, "kind": q.kind, "coords": q.coords,
                         "negative": q.negative} for q in im.prompts],
            "boxes": [{"id": b.id, "cls": b.cls, "xyxy": b.xyxy, "score": b.score,
                       "state": b.state, "source": b.source} for b in im.boxes]}


def stats_html(sess: Session) -> str:
    """Per-class counts on this image (above threshold) and over the folder (accepted)."""
    p = sess.project
    if not p.images:
        return "<div class='tx-counts'>no images</div>"
    here, folder = p.class_counts(), p.folder_counts()
    rows = "".join(
        f"<tr><td><span class='tx-swatch' style='background:{c.color}'></span>{_esc(c.name)}</td>"
        f"<td data-class='{_esc(c.name)}' class='tx-count-here'>{here.get(c.name, 0)}</td>"
        f"<td>{folder.get(c.name, 0)}</td></tr>" for c in p.classes)
    st = p.status_counts()
    status = " &middot; ".join(f"{STATUS_ICON[k]} {k} {v}" for k, v in st.items())
    im = p.current
    pending = sum(1 for b in p.visible_boxes() if b.state == "pending")
    return (f"<div class='tx-counts'><table><tr><th>class</th><th>this image</th>"
            f"<th>accepted (folder)</th></tr>{rows}</table>"
            f"<div>this image: <b>{im.status}</b>, {pending} pending above threshold</div>"
            f"<div>folder: {status}</div>"
            f"<div style='color:#888'>autosaved to {_esc(str(p.path))}</div></div>")


def _esc(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&#39;").replace('"', "&quot;"))


def _images_update(sess: Session, force: bool = False):
    p = sess.project
    sig = (p.index, tuple(im.status for im in p.images), len(p.images))
    if not force and sig == sess.last_images_sig:
        return gr.skip()
    sess.last_images_sig = sig
    choices = [(f"{STATUS_ICON[im.status]} {im.file}", i) for i, im in enumerate(p.images)]
    return gr.update(choices=choices, value=p.index if p.images else None)


def _classes_update(sess: Session, force: bool = False):
    p = sess.project
    sig = (tuple(p.class_names), p.active_class)
    if not force and sig == sess.last_classes_sig:
        return gr.skip()
    sess.last_classes_sig = sig
    return gr.update(choices=p.class_names, value=p.active_class)


# ----------------------------------------------------------------------------- app
def build_app(cfg: AppConfig) -> gr.Blocks:
    """The Gradio Blocks of the labeling app for one folder."""
    engine = cfg.engine
    js_on_load = (STATIC / "canvas.js").read_text(encoding="utf-8")
    template = (STATIC / "canvas.html").read_text(encoding="utf-8")

    def refresh(sess, action=None, message=None, force=False):
        """Outputs for MAIN: state, canvas, stats, class dropdown, image dropdown, threshold."""
        p = sess.project
        if action in ("load", "nav", "upload") and p.images:
            # at the canvas "detect in this image" (its own prompts) or "detect in all" will use
            sides = p.exemplar_sides([p.index]) if p.current.prompts else p.exemplar_sides()
            engine.prefetch(p.image_path(), sides)
        return (sess, build_view(sess, engine, action, message), stats_html(sess),
                _classes_update(sess, force), _images_update(sess, force),
                gr.skip() if not force else gr.update(value=sess.project.threshold))

    def locked(fail):
        """Decorator: run a handler under the project lock (see _acquire). A busy project, bad input
        (ProjectError / ValueError / OSError) or a bug (logged) is answered by fail(sess, status,
        message): `guarded` shows a warning toast and an unchanged view, `file_guard` a warning
        toast and the message in the handler's own message box, which stays until the next try
        (file handlers' outputs are (file, message), not the view)."""
        def decorate(fn):
            @functools.wraps(fn)  # keeps the signature: Gradio injects EventData / Progress by it
            def wrapper(sess, *args, **kwargs):
                if sess is None:
                    raise gr.Error("the session is not ready yet; reload the page")
                if not _acquire(sess):
                    return fail(sess, "busy", sess.work.busy_message(sess))
                try:
                    return fn(sess, *args, **kwargs)
                except (ProjectError, ValueError, OSError) as e:
                    return fail(sess, "error", str(e))
                except Exception as e:  # noqa: BLE001 - a model/bug error: tell the user, log it
                    traceback.print_exc()
                    return fail(sess, "error", f"{type(e).__name__}: {e}")
                finally:
                    sess.work.lock.release()
            return wrapper
        return decorate

    def _warn(sess, status, message):
        gr.Warning(message)
        return refresh(sess, status, message)

    def _file_error(sess, status, message):
        gr.Warning(message)
        return None, f"**Not done:** {message}"   # no download left beside the error

    guarded, file_guard = locked(_warn), locked(_file_error)

    def on_load(request: gr.Request):
        tmp = Path(tempfile.mkdtemp(prefix="session-", dir=cfg.tmp_dir))
        try:
            project = Project(cfg.images_dir, cfg.project_path)
        except ProjectError as e:
            raise gr.Error(str(e))
        if not project.path.exists():
            # a new project starts at the threshold the model recommends
            try:
                project.threshold = round(float(engine.predictor.score_threshold), 2)
            except Exception as e:  # noqa: BLE001 - model problems surface on detect
                gr.Warning(f"the model could not be loaded: {e}")
        sess = Session(project, tmp, work=cfg.work)
        msg = " ".join(project.warnings)
        for w in project.warnings:
            gr.Warning(w)
        return refresh(sess, "load", msg, force=True)

    # ------------------------------------------------------------------ canvas ops
    def on_op(sess, auto_detect, flip, evt: gr.EventData):
        """Canvas operations. While a long run holds the project (detect in all images), moving
        through the folder and selecting still work, read-only: the images can be looked at."""
        data = dict(evt._data or {})
        if sess is not None and sess.work.long_job and data.get("op") in ("goto", "select"):
            if data["op"] == "select":
                sess.selected = data.get("id")
                return (sess,) + (gr.skip(),) * 5
            return _browse(sess, lambda p: p.goto(int(data["index"]), save=False))
        return _canvas_op(sess, auto_detect, flip, evt)

    def _browse(sess, move):
        """Move through the folder (move(project), called with save=False) without the project
        lock, which a long run holds: read-only, and nothing is saved (this tab's copy may be
        older than the file, and the run may be changing it)."""
        try:
            move(sess.project)
        except ProjectError as e:
            gr.Warning(str(e))
            return (sess,) + (gr.skip(),) * 5
        sess.selected = None
        note = f"viewing only: {sess.work.doing(sess)}; edits are not applied until it finishes"
        return (sess, build_view(sess, engine, "nav", note), gr.skip(), gr.skip(), _images_update(sess),
                gr.skip())

    @guarded
    def _canvas_op(sess, auto_detect, flip, evt: gr.EventData):
        data = dict(evt._data or {})
        p = sess.project
        op = data.get("op")
        iid = data.get("id")
        prompt_op = op in ("add_prompt", "negative", "promote") or (
            op in ("move", "delete") and iid is not None
            and any(q.id == iid for q in p.current.prompts))
        if op == "select":
            sess.selected = iid
            return (sess,) + (gr.skip(),) * 5
        if op == "goto":    # → / ← (several presses add up in the page: canvas.js navigate)
            p.goto(int(data["index"]))
            sess.selected = None
            return refresh(sess, "nav")
        made_on = data.get("file")
        if (made_on and p.images and made_on != p.current.file
                and not (op == "set_class" and iid is None)):
            raise ProjectError(f"not applied: that edit was made on {made_on}, but "
                               f"{p.current.file} is shown now")
        if op == "add_prompt":
            p.add_prompt(data["kind"], data["coords"], negative=bool(data.get("negative")))
        elif op == "add_box":
            p.add_box(data["coords"])
        elif op == "move":
            p.move(int(iid), data["coords"])
        elif op == "delete":
            p.delete(int(iid))
            sess.selected = None
        elif op in ("accept", "reject"):
            p.set_state(int(iid), "accepted" if op == "accept" else "rejected")
        elif op == "negative":
            p.set_negative(int(iid), bool(data.get("value")))
        elif op == "promote":
            neg = bool(data.get("negative"))
            q = p.box_to_prompt(int(iid), negative=neg)
            sess.selected = None
            if not auto_detect:
                return refresh(sess, op, f"the {q.cls} box is now a {'negative ' if neg else ''}prompt"
                                         f"{' and rejected' if neg else ' and accepted'}: D detects "
                                         f"again with it (Ctrl+Z undoes)")
        elif op == "set_class":
            p.set_active_class(data["cls"])
            if iid is not None:
                kind, rec = p.find(int(iid))
                old = rec.cls
                p.relabel(int(iid), data["cls"])
                # the selection may be the box that A/X jumped to: say what changed
                return refresh(sess, op, f"relabelled the selected {kind} {old} -> {data['cls']}"
                                         f"{' and accepted it' if kind == 'box' else ''} "
                                         f"(Ctrl+Z undoes; Esc clears the selection)")
        else:
            raise ProjectError(f"unknown canvas operation {op!r}")
        if auto_detect and prompt_op and p.current.prompts:
            t = time.perf_counter()
            n = detect_in_image(p, engine, flip=bool(flip))
            ms = (time.perf_counter() - t) * 1000
            done = "the box is now a prompt (Ctrl+Z twice undoes it); " if op == "promote" else ""
            return refresh(sess, "detect", done + _detect_message(p, n, ms))
        return refresh(sess, op)

    def on_sync_tick(sess):
        """Every few seconds: show what another tab or process saved to this project since this
        tab last read or wrote it (Project.sync: a stat call when nothing changed). Skipped while
        a handler or long run holds the project; the page keeps a view arriving mid-drag for
        the drag's end."""
        skip = (gr.skip(),) * 6
        if sess is None or not sess.work.lock.acquire(blocking=False):
            return skip
        try:
            if not sess.project.sync():
                return skip
            return refresh(sess, "sync", "this folder's project was changed in another tab or "
                                         "window: reloaded it here (undo history cleared)", force=True)
        except ProjectError:
            return skip     # (the next action says so, and saves this tab's labels over it)
        finally:
            sess.work.lock.release()

    def browsable(move):
        """Decorator over a guarded navigation handler (sess, *args): while a long run holds the
        project, move(project, *args) browses read-only instead (_browse)."""
        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(sess, *args):
                if sess is not None and sess.work.long_job:
                    return _browse(sess, lambda p: move(p, *args))
                return fn(sess, *args)
            return wrapper
        return decorate

    @browsable(lambda p, delta: p.step(delta, save=False))
    @guarded
    def on_nav(sess, delta):
        sess.project.step(delta)
        sess.selected = None
        return refresh(sess, "nav")

    @browsable(lambda p: p.next_to_review(save=False))
    @guarded
    def on_next_to_review(sess):
        sess.project.next_to_review()
        sess.selected = None
        return refresh(sess, "nav")

    @browsable(lambda p, index: index is None or p.goto(int(index), save=False))
    @guarded
    def on_goto(sess, index):
        if index is None or index == sess.project.index:
            return (sess,) + (gr.skip(),) * 5
        sess.project.goto(int(index))
        sess.selected = None
        return refresh(sess, "nav")

    @guarded
    def on_detect_this(sess, flip):
        t = time.perf_counter()
        n = detect_in_image(sess.project, engine, flip=bool(flip))
        ms = (time.perf_counter() - t) * 1000
        return refresh(sess, "detect", _detect_message(sess.project, n, ms))

    @guarded
    def on_detect_all(sess, flip, progress=gr.Progress()):
        with sess.work.running("detecting in all images", sess):
            return _detect_all(sess, bool(flip), progress)

    def _detect_all(sess, flip, progress):
        p = sess.project
        t = time.perf_counter()
        progress((0, len(p.images)), desc="detecting in all images")
        done = 0
        failed = []
        for done, total, file, error in detect_in_folder(p, engine, flip=flip,
                                                         should_stop=lambda: sess.work.cancel):
            progress((done, total), desc=f"detecting: {file}")
            if error:
                failed.append(error)
                gr.Warning(f"skipped: {error}")
        secs = time.perf_counter() - t
        if sess.work.cancel and done < len(p.images):
            msg = (f"cancelled after {done}/{len(p.images)} images"
                   + (" (Cancel was pressed in another tab)" if sess.work.cancelled_elsewhere else ""))
        else:
            msg = f"detected in {done - len(failed)} images ({secs:.1f} s)"
        if failed:
            msg += f"; {len(failed)} unreadable image(s) skipped"
        return refresh(sess, "detect_all", msg)

    def on_cancel(sess):
        if sess is not None:
            note = sess.work.stop(sess)
            if note:
                gr.Warning(note)

    @guarded
    def on_accept_all(sess, t=None):
        # the threshold as the slider shows it: its own change event may not have run yet
        if t is not None:
            sess.project.set_threshold(t)
        n = sess.project.accept_all()
        return refresh(sess, "accept_all", f"accepted {n} boxes")

    @guarded
    def on_undo(sess):
        return refresh(sess, "undo", f"undone: {sess.project.undo()}")

    @guarded
    def on_redo(sess):
        return refresh(sess, "redo", f"redone: {sess.project.redo()}")

    @guarded
    def on_threshold(sess, t):
        sess.project.set_threshold(t)
        return refresh(sess, "threshold")

    @guarded
    def on_class_pick(sess, name):
        p = sess.project
        if not name or name == p.active_class:
            return (sess,) + (gr.skip(),) * 5
        p.set_active_class(name)
        return refresh(sess, "class")

    # ------------------------------------------------------------------ classes
    @guarded
    def on_class_add(sess, name, color, text):
        used = {c.color.lower() for c in sess.project.classes}
        # the editor still shows the picked class's colour: a new class gets its own
        color = None if not color or color.lower() in used else color
        sess.project.add_class(name, color, text)
        return refresh(sess, "class", f"added class {name.strip()}")

    @guarded
    def on_class_update(sess, new_name, color, text):
        p = sess.project
        if not p.active_class:
            raise ProjectError("pick the class to edit in the Class list first")
        old = p.active_class
        p.update_class(old, new_name or old, color or None, text)
        return refresh(sess, "class", f"updated class {old}")

    @guarded
    def on_class_delete(sess):
        p = sess.project
        if not p.active_class:
            raise ProjectError("no class selected")
        name = p.active_class
        return refresh(sess, "class", _deleted_class_message(name, p.delete_class(name)))

    # ------------------------------------------------------------------ files
    def _out_dir(sess, what):
        sess.tmp_dir.mkdir(parents=True, exist_ok=True)
        # a new folder each time: two exports within a second must not meet
        return Path(tempfile.mkdtemp(prefix=f"{what}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=sess.tmp_dir))

    @file_guard
    def on_export(sess, fmt, only_reviewed):
        p = sess.project
        only_reviewed = bool(only_reviewed)
        listed, skipped = p.export_images(only_reviewed)
        if not listed:
            raise ProjectError("no image to export" + (
                ": none is reviewed yet (untick 'only reviewed images')" if only_reviewed else ""))
        notes = ""
        reviewed = {im.file for im in p.images if im.reviewed}
        unreviewed = sum(f not in reviewed for f, _, _ in listed)
        if unreviewed:
            notes += (f"  \n{unreviewed} of the images are not reviewed yet: they are exported with "
                      f"only the boxes accepted on them (an image with none counts as having no "
                      f"objects); tick 'only reviewed images' to leave them out.")
        if skipped:
            notes += (f"  \nleft out {len(skipped)} missing or unreadable image(s): "
                      f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
        files = {f for f, _, _ in listed}
        n_boxes = sum(f in files for f, _, _ in p.accepted_annotations())
        if not n_boxes:
            gr.Warning("no accepted box in what is exported: every image counts as having no objects")
            notes += ("  \n**No accepted box yet**: only accepted boxes are exported (A accepts the "
                      "selected box, Shift+A all boxes above the threshold on an image).")
        if fmt == "COCO":
            out = _out_dir(sess, "coco") / "annotations.coco.json"
            data = p.export_coco(out, images=listed)
            msg = (f"COCO: {len(data['images'])} images, {len(data['annotations'])} accepted "
                   f"boxes, {len(data['categories'])} classes -> {out}")
            if len({a["image_id"] for a in data["annotations"]}) >= REFINER_MIN_IMAGES:
                notes += ("  \nBoxes sit loosely on your objects? Fit the box refiner to these labels "
                          "in the *Box refiner* tab, or from the command line: `python app.py train "
                          f"--refiner --labels {out.name} --images {shlex.quote(str(p.root))} --out "
                          "refiner.safetensors`, then `--weights refiner.safetensors` (README, step 7).")
            return str(out), msg + notes
        folder = _out_dir(sess, "yolo")
        p.export_yolo(folder / "yolo", images=listed)
        zpath = folder / "yolo.zip"
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted((folder / "yolo").rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(folder).as_posix())
        return str(zpath), (f"YOLO dataset: {len(listed)} images, {n_boxes} accepted boxes -> "
                            f"{zpath}" + notes)

    @file_guard
    def on_save_prompts(sess, path):
        p = sess.project
        path = (_prompt_save_path(cfg, sess, path.strip()) if path and path.strip()
                else _out_dir(sess, "prompts") / "prompts.json")
        p.save_prompts(path)
        sess.prompt_files.add(path)
        shown = path
        if not _is_under(path, cfg.tmp_dir):
            shown = _out_dir(sess, "prompts") / path.name
            shutil.copyfile(path, shown)
        return str(shown), f"prompt set saved to {path}"

    @guarded
    def on_load_prompts(sess, path):
        src = (path or "").strip()
        if not src:
            raise ProjectError("give the path of a prompt file")
        src = _check_user_path(cfg, src)
        n_in, n_ext = sess.project.load_prompts(src)
        sess.prompt_files.add(src)
        msg = (f"loaded {n_in} prompts on this folder's images and {n_ext} on other images from "
               f"{src}" if n_in + n_ext else f"every prompt of {src} is already loaded")
        return refresh(sess, "load_prompts", msg, force=True)

    @file_guard
    def on_save_embeddings(sess):
        import trex2
        # prompt images encoded at the canvas "detect in all images" uses, so that the saved
        # exemplar sizes (object_px, object_side) agree when a folder is labelled with them
        embs = engine.class_embeddings(sess.project, None, sides=sess.project.exemplar_sides())
        if not embs:
            raise ProjectError("no class has prompts yet: nothing to save")
        out = _out_dir(sess, "embeddings") / "classes.safetensors"
        trex2.save_class_embeddings(str(out), embs)
        return str(out), f"saved class embeddings of {', '.join(embs)} -> {out}"

    @guarded
    def on_load_embeddings(sess, upload):
        if not upload:
            raise ProjectError("choose a .safetensors class-embedding file first")
        names = sess.project.load_class_embeddings(upload)
        return refresh(sess, "load_embeddings", f"loaded class embeddings: {', '.join(names)}",
                       force=True)

    @guarded
    def on_import(sess, upload):
        if not upload:
            raise ProjectError("choose a COCO .json file first")
        r = sess.project.import_coco(upload, shown=Path(upload).name)
        msg = (f"imported {r['labels']} labels (accepted) and {r['detections']} detections (pending) "
               f"on {r['images']} images")
        for key, what in (("unmatched", "not in this folder"), ("size_mismatch", "of another size here"),
                          ("unreadable", "unreadable here")):
            if r[key]:
                msg += (f"; skipped {len(r[key])} image(s) {what}: {', '.join(r[key][:3])}"
                        f"{' ...' if len(r[key]) > 3 else ''}")
        if r["bad_boxes"]:
            msg += (f"; left out {len(r['bad_boxes'])} malformed annotation(s), e.g. {r['bad_boxes'][0]}")
            gr.Warning(f"left out {len(r['bad_boxes'])} malformed annotation(s) of the file")
        return refresh(sess, "import", msg, force=True)

    @guarded
    def on_upload(sess, files):
        if not files:
            return (sess,) + (gr.skip(),) * 5
        new, skipped = sess.project.add_uploaded([f if isinstance(f, str) else f.name for f in files])
        for why in skipped:
            gr.Warning(f"skipped: {why}")
        return refresh(sess, "upload", f"added {len(new)} image(s) to {sess.project.root / 'uploaded'}"
                       + (f"; skipped {len(skipped)}: {'; '.join(skipped[:3])}" if skipped else ""),
                       force=True)

    @file_guard
    def on_search(sess, cls, flip, progress=gr.Progress()):
        p = sess.project
        if not cls:
            raise ProjectError("pick a class to search for")
        progress(0, desc=f"ranking images by {cls}")
        items = []
        shown = []
        with sess.work.running(f"ranking images by {cls}", sess):   # (its gallery too: other tabs browse)
            ranked = search_images(p, engine, cls, should_stop=lambda: sess.work.cancel,
                                   on_progress=lambda d, n: progress((d, n), desc=f"ranking by {cls}"),
                                   flip=bool(flip))
            for i, score in ranked:
                try:
                    prev, _, _ = engine.preview(p.image_path(i))
                except (ValueError, OSError):
                    continue  # unreadable: it scored 0 and has nothing to show
                items.append((str(prev), f"{score:.2f}  {p.images[i].file}"))
                shown.append((p.images[i].file, score))
        sess.search = shown
        n = len(sess.project.images)
        if sess.work.cancel and len(ranked) < n:
            return items, f"cancelled: {len(ranked)} of {n} images ranked by the max score of {cls!r}"
        return items, f"{len(ranked)} images ranked by the max score of {cls!r}"

    @guarded
    def on_search_pick(sess, evt: gr.SelectData):
        if evt.index is None or evt.index >= len(sess.search):
            return (sess,) + (gr.skip(),) * 5
        sess.project.goto(sess.project.index_of(sess.search[evt.index][0]))
        return refresh(sess, "nav")

    # ------------------------------------------------------------------ box refiner
    def _msg_error(sess, status, message):
        gr.Warning(message)
        return refiner_reply(sess, f"**Not done:** {message}")

    msg_guard = locked(_msg_error)

    def refiner_text(sess) -> str:
        """The Box refiner tab's status: the fit running or last run, and which weights detect."""
        job, path = cfg.refiner, sess.project.refiner_path
        st = job.status()
        lines = []
        if st.state == "running":
            bar = "" if st.fraction is None else f" [{'#' * round(20 * st.fraction):-<20}]"
            lines.append(f"**Fitting:** {st.text}{bar}")
        elif st.state != "idle":
            lines.append(f"**Last fit {st.state}:** {st.text}")
        if engine.weights and Path(engine.weights) == path:
            newer = path.is_file() and path.stat().st_mtime_ns != engine.weights_stamp
            lines.append("Detection uses **an earlier fit of this folder's refiner**: *Use fitted refiner* "
                         "loads the new one." if newer else
                         "Detection uses **the refiner fitted to this folder** "
                         "(*Back to start-up weights* to go back).")
        elif path.is_file():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
            lines.append(f"A refiner fitted to this folder is saved ({when}): *Use fitted refiner* "
                         "to detect with it.")
        if path.is_file() and st.state != "done":   # a finished fit says it above
            check = read_refiner_check(path)
            lines.append(f"Its check: {check}" if check else
                         "It was not checked on labelled images kept out of its fit.")
        lines.append(f"Weights now: `{engine.weights or 'shipped (trex2/weights)'}`")
        return "  \n".join(lines)

    def refiner_reply(sess, head: str) -> str:
        """A button's answer above the status; the status timer leaves it until the status changes."""
        sess.refiner_shown = refiner_text(sess)
        return f"{head}  \n{sess.refiner_shown}"

    @msg_guard
    def on_fit_refiner(sess):
        p = sess.project
        if cfg.refiner.running():
            raise ProjectError("a box refiner is being fitted already: wait for it, or stop it first")
        listed, skipped = p.export_images(with_boxes=True)
        if len(listed) < REFINER_MIN_IMAGES:
            raise ProjectError(
                f"accepted boxes on {len(listed)} image(s): fit the refiner once {REFINER_MIN_IMAGES} or "
                "more images have accepted boxes (it learns how you box; on fewer it learns noise)")
        prompted = {c for c, g in p.prompts_by_class(None).items() if g["pos"]}
        fit, check = refiner_split(p, listed) if prompted else (listed, [])   # the check needs prompts
        # the job is the app's, not this tab's: its files outlive the session (cfg.tmp_dir)
        folder = Path(tempfile.mkdtemp(prefix=f"refiner-{time.strftime('%Y%m%d-%H%M%S')}-", dir=cfg.tmp_dir))
        note = f" (left out {len(skipped)} unreadable image(s))" if skipped else ""
        if check:   # the prompt file and the check's labels hold only classes with a positive prompt
            try:
                ps = p.prompt_set()
                write_prompts(folder / "prompts.json", PromptSet(
                    [c for c in ps.categories if c.name in prompted],
                    [q for q in ps.prompts if q.category in prompted], ps.image_sizes))
            except (OSError, ValueError) as e:   # e.g. a prompt on an image that is gone
                fit, check = listed, []
                note += f"; it cannot be checked: the prompts cannot be saved ({e})"
        if check:
            gt = p.export_coco(folder / "check.coco.json", images=check)
            atomic_write_json(folder / "check.coco.json", coco_subset(gt, categories=prompted))
            note += (f"; then it is checked on {len(check)} other labelled images without prompts "
                     "(with your prompts, before and after)")
        if len(fit) > REFINER_MAX_IMAGES:   # memory: a spread-out subset of them
            note += f"; {REFINER_MAX_IMAGES} of the {len(fit)} images spread over the folder are fitted on"
            fit = [fit[int((k + 0.5) * len(fit) / REFINER_MAX_IMAGES)] for k in range(REFINER_MAX_IMAGES)]
        data = p.export_coco(folder / "labels.coco.json", images=fit)
        cfg.refiner.start(folder / "labels.coco.json", p.root, p.refiner_path, folder / "fit.log",
                          init=engine.start_weights, check=folder / "check.coco.json" if check else None,
                          prompts=folder / "prompts.json" if check else None)
        return refiner_reply(sess, f"Started: fitting a box refiner to {len(data['annotations'])} accepted "
                                   f"boxes on {len(fit)} images{note}. In the background on one core.")

    def on_refiner_tick(sess):
        if sess is None:
            return gr.skip()
        text = refiner_text(sess)
        if text == sess.refiner_shown:
            return gr.skip()
        sess.refiner_shown = text
        return text

    def on_refiner_stop(sess):
        stopped = cfg.refiner.cancel()
        head = "Stopped the fit." if stopped else "No fit is running."
        return refiner_reply(sess, head) if sess else head

    @msg_guard
    def on_use_refiner(sess):
        path = sess.project.refiner_path
        if not path.is_file():
            raise ProjectError("no refiner has been fitted to this folder yet: press *Fit refiner*")
        engine.use_weights(path)
        return refiner_reply(sess, "Detection now uses the fitted refiner (in every tab of this app); boxes "
                                   "already detected keep their shape until you detect again (D / Shift+D).")

    @msg_guard
    def on_use_start_weights(sess):
        engine.use_weights(None)
        return refiner_reply(sess, "Detection uses the weights the app started with.")

    # ------------------------------------------------------------------ layout
    with gr.Blocks(title="T-Rex2 labeler", analytics_enabled=False) as demo:
        state = gr.State(None, delete_callback=_forget_session)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=480):
                canvas = gr.HTML(value=None, html_template=template, js_on_load=js_on_load,
                                 elem_id="tx-canvas", apply_default_css=False, padding=False)
                with gr.Row():
                    prev_btn = gr.Button("\u2190 Prev", elem_id="tx-prev", size="sm", min_width=60)
                    next_btn = gr.Button("Next \u2192", elem_id="tx-next", size="sm", min_width=60)
                    review_btn = gr.Button("Next to review (U)", elem_id="tx-next-review",
                                           size="sm", min_width=60)
                    det_btn = gr.Button("Detect in this image (D)", elem_id="tx-detect-this",
                                        variant="primary", size="sm")
                    det_all_btn = gr.Button("Detect in all images (Shift+D)", elem_id="tx-detect-all",
                                            variant="primary", size="sm")
                    cancel_btn = gr.Button("Cancel", elem_id="tx-cancel", size="sm", variant="stop",
                                           min_width=60)
                with gr.Row():
                    accept_btn = gr.Button("Accept all \u2265 threshold (Shift+A)",
                                           elem_id="tx-accept-all", size="sm")
                    undo_btn = gr.Button("Undo (Ctrl+Z)", elem_id="tx-undo", size="sm", min_width=60)
                    redo_btn = gr.Button("Redo (Ctrl+Y)", elem_id="tx-redo", size="sm", min_width=60)
                with gr.Row():
                    auto_cb = gr.Checkbox(label="Detect in this image after each prompt change",
                                          value=False, elem_id="tx-auto", scale=2)
                    flip_cb = gr.Checkbox(label="Mirror pass: also search each image mirrored "
                                                "(better boxes, detection takes twice as long)",
                                          value=True, elem_id="tx-flip", scale=2)
                    progress_box = gr.HTML("", elem_id="tx-progress", min_height=24, scale=3)
                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold",
                                      elem_id="tx-threshold")
            with gr.Column(scale=2, min_width=280):
                class_dd = gr.Dropdown(label="Class (keys 1-9)", choices=[], elem_id="tx-class",
                                       interactive=True)
                stats = gr.HTML(elem_id="tx-stats")
                image_dd = gr.Dropdown(label="Image (\u25cb untouched \u25d0 predicted \u25cf reviewed)",
                                       choices=[], elem_id="tx-image", interactive=True)
                with gr.Accordion("Classes: add, rename, colour, text phrase", open=True):
                    cls_name = gr.Textbox(label="Name", elem_id="tx-class-name", max_lines=1)
                    cls_color = gr.ColorPicker(label="Colour (empty: automatic)", value=None,
                                               elem_id="tx-class-color")
                    cls_text = gr.Textbox(label="Text phrase (optional; needs a CLIP checkpoint)",
                                          elem_id="tx-class-text", max_lines=1)
                    with gr.Row():
                        cls_add = gr.Button("Add class", elem_id="tx-class-add", size="sm")
                        cls_upd = gr.Button("Update picked class", elem_id="tx-class-update",
                                            size="sm")
                        cls_del = gr.Button("Delete picked class", elem_id="tx-class-delete",
                                            size="sm", variant="stop")
                with gr.Accordion("Keyboard shortcuts", open=False):
                    gr.HTML("<table class='tx-shortcuts'>" + "".join(
                        f"<tr><td><kbd>{_esc(k)}</kbd></td><td>{_esc(v)}</td></tr>"
                        for k, v in SHORTCUTS) + "</table>")
        with gr.Tabs():
            with gr.Tab("Export"):
                with gr.Row():
                    fmt = gr.Radio(["COCO", "YOLO"], value="COCO", label="Format", elem_id="tx-fmt")
                    only_rev = gr.Checkbox(label="only reviewed images", value=False)
                    export_btn = gr.Button("Export accepted boxes", elem_id="tx-export",
                                           variant="primary")
                export_file = gr.File(label="Download", elem_id="tx-export-file", interactive=False)
                export_msg = gr.Markdown(elem_id="tx-export-msg")
            with gr.Tab("Import"):
                coco_upload = gr.File(
                    label="Import a COCO file: boxes without a score (labels) come in accepted, boxes "
                          "with one (e.g. from 'python app.py label') as pending detections to review",
                    file_types=[".json"], type="filepath", elem_id="tx-import")
            with gr.Tab("Prompts & class embeddings"):
                with gr.Row():
                    prompt_path = gr.Textbox(
                        label="Prompt file path (save to / load from; empty on save: a download only)",
                        elem_id="tx-prompt-path", value=_demo_prompts(cfg.images_dir))
                    prompt_save = gr.Button("Save prompt set", size="sm")
                    prompt_load = gr.Button("Load prompt file", size="sm")
                with gr.Row():
                    emb_save = gr.Button("Save class embeddings", size="sm")
                    emb_upload = gr.File(label="Load class embeddings (.safetensors)",
                                         file_types=[".safetensors"], type="filepath")
                files_out = gr.File(label="Download", interactive=False)
                files_msg = gr.Markdown(elem_id="tx-files-msg")
            with gr.Tab("Search images") as search_tab:
                with gr.Row():
                    search_cls = gr.Dropdown(label="Class", choices=[], elem_id="tx-search-class")
                    search_btn = gr.Button("Rank images by this class", elem_id="tx-search",
                                           variant="primary")
                search_msg = gr.Markdown(elem_id="tx-search-msg")
                gallery = gr.Gallery(label="Images, strongest first (click to open)", columns=6,
                                     height=360, elem_id="tx-gallery", allow_preview=False)
            with gr.Tab("Box refiner") as refiner_tab:
                gr.Markdown(
                    "The detector finds objects but may box them looser or tighter than you do. Once "
                    f"{REFINER_MIN_IMAGES} or more images have accepted boxes, fit a small box refiner "
                    "to them: it learns how you box and then adjusts every detected box. It runs in "
                    "the background on one core (about 11 minutes; labeling goes on, a little slower) "
                    "and is saved beside this folder's project file. Measured (README, item 12 of "
                    "\"The shipped run\"): fitted to 20 labelled tomato images, AP75 on other tomato "
                    "images 0.11 -> 0.14; on blood cells it went both ways. So, with "
                    f"{REFINER_MIN_IMAGES + 2} or more labelled images, a fifth of those without prompts "
                    "are kept out of the fit and labelled with your prompts before and after it: the "
                    "result shows below when the fit ends. *Back to start-up weights* goes back.")
                with gr.Row():
                    fit_btn = gr.Button("Fit refiner to accepted boxes", elem_id="tx-fit-refiner",
                                        variant="primary", size="sm")
                    fit_stop = gr.Button("Stop fitting", elem_id="tx-fit-stop", size="sm", variant="stop")
                    use_fit = gr.Button("Use fitted refiner", elem_id="tx-use-refiner", size="sm")
                    use_start = gr.Button("Back to start-up weights", elem_id="tx-use-start", size="sm")
                refiner_msg = gr.Markdown(elem_id="tx-refiner-msg")
            with gr.Tab("Images"):
                upload = gr.File(label="Add images to the folder (copied into its 'uploaded/' "
                                       "subfolder)", file_count="multiple", file_types=["image"],
                                 type="filepath", elem_id="tx-upload")

        main = [state, canvas, stats, class_dd, image_dd, threshold]
        demo.load(on_load, None, main)
        gr.Timer(SYNC_SECONDS).tick(on_sync_tick, [state], main, show_progress="hidden")
        canvas.op(on_op, [state, auto_cb, flip_cb], main, trigger_mode="multiple",
                  show_progress="hidden", queue=True)
        # "multiple": quick clicks each count (in order: one queue, as they share on_nav)
        prev_btn.click(on_nav, [state, gr.State(-1)], main, show_progress="hidden",
                       trigger_mode="multiple")
        next_btn.click(on_nav, [state, gr.State(1)], main, show_progress="hidden",
                       trigger_mode="multiple")
        review_btn.click(on_next_to_review, [state], main, show_progress="hidden")
        image_dd.input(on_goto, [state, image_dd], main, show_progress="hidden")
        # no queue slot to wait in: the project lock orders these (Engine's lock the model), so
        # one pressed during a long run is answered "not applied" at once instead of running later
        det_btn.click(on_detect_this, [state, flip_cb], main, show_progress="hidden",
                      concurrency_limit=None)
        det_all_btn.click(on_detect_all, [state, flip_cb], main, show_progress="full",
                          show_progress_on=[progress_box], concurrency_limit=None)
        cancel_btn.click(on_cancel, [state], None, concurrency_limit=None)   # queued: its toast shows
        accept_btn.click(on_accept_all, [state, threshold], main, show_progress="hidden")
        undo_btn.click(on_undo, [state], main, show_progress="hidden")
        redo_btn.click(on_redo, [state], main, show_progress="hidden")
        threshold.change(on_threshold, [state, threshold], main, show_progress="hidden",
                         trigger_mode="always_last")
        class_dd.input(on_class_pick, [state, class_dd], main, show_progress="hidden")
        def class_fields(sess, name):
            """Fill the class editor with the picked class (name, colour, text phrase)."""
            if sess is None or not name or name not in sess.project.class_names:
                return gr.skip(), gr.skip(), gr.skip()
            c = sess.project.get_class(name)
            return c.name, c.color, c.text or ""

        class_dd.change(class_fields, [state, class_dd], [cls_name, cls_color, cls_text],
                        show_progress="hidden")
        cls_add.click(on_class_add, [state, cls_name, cls_color, cls_text], main)
        cls_upd.click(on_class_update, [state, cls_name, cls_color, cls_text], main)
        cls_del.click(on_class_delete, [state], main)
        export_btn.click(on_export, [state, fmt, only_rev], [export_file, export_msg])
        prompt_save.click(on_save_prompts, [state, prompt_path], [files_out, files_msg])
        # a load answers on the canvas line: the Files message of an earlier save must not stay
        prompt_load.click(on_load_prompts, [state, prompt_path], main).then(
            lambda: "", None, files_msg, show_progress="hidden")
        emb_save.click(on_save_embeddings, [state], [files_out, files_msg],
                       concurrency_id="model")
        # each upload box is emptied once read, so the next file (or the same again) can be dropped in
        for box, handler in ((emb_upload, on_load_embeddings), (upload, on_upload), (coco_upload, on_import)):
            box.upload(handler, [state, box], main).then(lambda: None, None, box, show_progress="hidden")
        def search_classes(sess):
            names = sess.project.class_names if sess else []
            return gr.update(choices=names, value=names[0] if names else None)

        search_tab.select(search_classes, [state], [search_cls], show_progress="hidden")
        search_btn.click(on_search, [state, search_cls, flip_cb], [gallery, search_msg],
                         concurrency_limit=None)
        gallery.select(on_search_pick, [state], main, show_progress="hidden")
        refiner_tab.select(on_refiner_tick, [state], [refiner_msg], show_progress="hidden")
        gr.Timer(2.0).tick(on_refiner_tick, [state], [refiner_msg], show_progress="hidden")
        fit_btn.click(on_fit_refiner, [state], [refiner_msg])
        fit_stop.click(on_refiner_stop, [state], [refiner_msg], queue=False)
        use_fit.click(on_use_refiner, [state], [refiner_msg], concurrency_id="model")
        use_start.click(on_use_start_weights, [state], [refiner_msg], concurrency_id="model")
    return demo


def refiner_split(p: Project, listed: list) -> tuple[list, list]:
    """Images with accepted boxes (export_images' (file, W, H)) -> (fitted on, checked on), see
    app.refiner_job.split_for_check: images with prompts are never kept out."""
    return split_for_check(listed, {im.file for im in p.images if im.prompts}, REFINER_MIN_IMAGES)


def _deleted_class_message(name: str, gone: dict[str, int]) -> str:
    """What 'Delete class' took with the class (Project.delete_class's counts)."""
    if not gone["boxes"] and not gone["prompts"]:
        return f"deleted class {name} (it had no boxes or prompts; Ctrl+Z brings it back)"
    n_img = gone["images"]
    return (f"deleted class {name} with its {gone['boxes']} boxes ({gone['accepted']} accepted) "
            f"on {n_img} image{'s' if n_img != 1 else ''} and its {gone['prompts']} prompts: "
            f"Ctrl+Z brings them back")


def _detect_message(p: Project, n_new: int, ms: float) -> str:
    shown = sum(1 for b in p.visible_boxes() if b.state == "pending" and b.score is not None)
    return (f"{shown} boxes at score \u2265 {p.threshold:.2f} ({n_new} candidates; the slider "
            f"shows more or fewer) ({ms:.0f} ms)")


def _forget_session(sess: Session | None) -> None:
    """Gradio calls this when a session's state expires: drop its temp files."""
    if sess is not None:
        shutil.rmtree(sess.tmp_dir, ignore_errors=True)


def _demo_prompts(images_dir: Path) -> str:
    """On the bundled demo folder, suggest its prompt file so a first user can try loading it."""
    candidate = DEMO_IMAGES.parent / "prompts-blood.json"
    return str(candidate) if Path(images_dir).resolve() == DEMO_IMAGES and candidate.exists() else ""


def _check_user_path(cfg: AppConfig, path: str) -> Path:
    """A file path typed into the UI, checked against cfg.path_roots when the app is
    reachable from other machines (a remote user must not read or write arbitrary files)."""
    p = Path(path).expanduser().resolve()
    if cfg.path_roots is not None and not any(_is_under(p, r) for r in cfg.path_roots):
        raise ProjectError(f"{path} is outside the folders this app may use: "
                           f"{', '.join(str(r) for r in cfg.path_roots)}")
    return p


def _prompt_save_path(cfg: AppConfig, sess: Session, typed: str) -> Path:
    """The checked path 'Save prompt set' writes to. An existing file is replaced only when this
    session loaded or saved it: the path box comes filled in (on the demo folder, with the
    shipped demo prompt file), and one click must not overwrite a file the user never opened."""
    path = _check_user_path(cfg, typed)
    if path.exists() and path not in sess.prompt_files:
        raise ProjectError(f"{path} already exists and was not loaded here: give another file "
                           f"name (or load it first to add your prompts to it)")
    return path


def _is_under(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- launch
THEME_FONTS = dict(font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                   font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def launch(images_dir, project_path=None, host="127.0.0.1", port=None, engine=None,
           prevent_thread_lock=False, quiet=False):
    """Build and start the app. Returns (demo, local_url). Binds ``host`` (default
    127.0.0.1 only); serves only the app's own temp folder (image previews, exports) and
    Gradio's upload folder, which is placed inside it."""
    images_dir = Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise SystemExit(f"error: image folder {images_dir} does not exist")
    tmp_dir = Path(tempfile.mkdtemp(prefix="trex2-app-"))
    atexit.register(shutil.rmtree, tmp_dir, True)
    if not os.environ.get("GRADIO_TEMP_DIR"):
        # uploads and Gradio's file cache go inside the app's own temp folder
        os.environ["GRADIO_TEMP_DIR"] = str(tmp_dir / "gradio")
    engine = engine or Engine()
    if engine.preview_dir is None:
        engine.preview_dir = tmp_dir / "previews"
    engine.preview_dir.mkdir(parents=True, exist_ok=True)
    project_path = Path(project_path).resolve() if project_path else None
    loopback = host in ("127.0.0.1", "localhost", "::1")
    roots = None if loopback else [images_dir.parent,
                                   (project_path or default_project_path(images_dir)).parent]
    if not loopback:
        print(f"warning: serving on {host}: anyone who can reach this address can view and "
              f"label {images_dir}; typed-in file paths are limited to "
              f"{', '.join(map(str, roots))}", file=sys.stderr)
    cfg = AppConfig(images_dir, project_path, engine, tmp_dir, roots)
    demo = build_app(cfg)
    engine.prefetch()  # load the model in the background while the page opens
    demo.queue(default_concurrency_limit=1)
    if port is None:
        port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    _, url, _ = demo.launch(
        server_name=host, server_port=int(port), prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(tmp_dir)], share=False, inbrowser=False, quiet=quiet,
        ssr_mode=False, footer_links=["settings"], pwa=False, mcp_server=False,
        enable_monitoring=False,
        theme=gr.themes.Default(**THEME_FONTS),
        css_paths=[str(STATIC / "canvas.css")])
    return demo, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="app.py ui", description="Label a folder of images with visual prompts.")
    parser.add_argument("--images", default=str(DEMO_IMAGES),
                        help="image folder (default: the bundled demo folder demo/images)")
    parser.add_argument("--project", default=None,
                        help="project file (default: ~/.cache/trex2/projects/<folder>-<hash>.json); "
                             "every decision is autosaved there and restored on restart")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="model weights (.safetensors; default: the shipped trex2/weights), e.g. "
                             "with a box refiner trained on your labels ('train --refiner')")
    args = parser.parse_args(argv)
    images = Path(args.images)
    if not images.is_dir():
        print(f"error: --images {images} is not a folder", file=sys.stderr)
        return 2
    if args.weights and not Path(args.weights).is_file():
        print(f"error: --weights {args.weights} is not a file", file=sys.stderr)
        return 2
    if args.port is not None and not 0 < args.port < 65536:
        print(f"error: --port {args.port} is not a port number (1-65535)", file=sys.stderr)
        return 2
    # `kill` (SIGTERM) ends the app as Ctrl+C does: the temp folder (previews, uploads,
    # exports) is removed and a running refiner fit stopped (atexit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    project = Path(args.project) if args.project else default_project_path(images)
    print(f"Labeling {images.resolve()}\nProject file (autosaved): {project.resolve()}", flush=True)
    launch(images, args.project, args.host, args.port, engine=Engine(weights=args.weights))
    return 0
