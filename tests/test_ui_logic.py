"""Workflow logic of the labeling app without a browser: prompt -> detect -> review ->
export, undo/redo, statuses, autosave/resume, classes, prompt files, search (app/project.py).

The model is a small fake that honours the trex2 Predictor contract (COMMON.md) so the
tests are fast and exact; the real model runs in tests/test_ui_browser.py.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import supervision as sv
import torch
from PIL import Image

import trex2
from app.project import (DEFAULT_CLASS, Engine, Project, ProjectError, detect_in_folder,
                         detect_in_image, search_images)

W, H = 80, 60


class FakePredictor:
    """Contract-following stand-in. Each class embedding is the mean exemplar box size
    (w, h); detect() returns, per class, boxes of that size at 3 fixed places with scores
    0.9, 0.5, 0.1 (times a per-image factor, to test ranking)."""

    score_threshold = 0.3

    def __init__(self):
        self.cache = {}
        self.encode_count = 0
        self.embed_calls = []
        self.detect_calls = 0
        self.flip = False        # trex2.Predictor.flip: recorded by detect() in flips_seen
        self.flips_seen = []

    def encode_image(self, image, key=None, size=None):
        assert image.dtype == np.uint8 and image.ndim == 3
        key = (key if key is not None else image.tobytes(), size)
        if key not in self.cache:
            self.encode_count += 1
            self.cache[key] = SimpleNamespace(image_size=image.shape[:2],
                                              brightness=float(image.mean()) / 255.0)
        return self.cache[key]

    def cached(self, key, size=None):
        return self.cache.get((key, size))

    def embed_prompts(self, prompts, negatives=None, text=None):
        if text:
            raise trex2.TextEncoderUnavailable("no CLIP checkpoint configured (fake)")
        self.embed_calls.append((prompts, negatives))
        sizes = [(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for _, b, *_ in prompts if len(b)]
        if not sizes and not any(len(p[2]) for p in prompts if len(p) > 2):
            raise ValueError("no prompt")
        w = float(np.mean(np.concatenate([s[0] for s in sizes]))) if sizes else 10.0
        h = float(np.mean(np.concatenate([s[1] for s in sizes]))) if sizes else 10.0
        return trex2.ClassEmbedding(torch.tensor([w, h]), torch.zeros(0, 2))

    def rescale_classes(self, dets, classes, size, image_hw, encode, score_threshold=None):
        return [dets]   # its class embeddings carry no exemplar size (object_px): never a second look

    def detect(self, emb, classes, score_threshold=None, compete=True):
        self.detect_calls += 1
        self.flips_seen.append(self.flip)
        xyxy, conf, ids = [], [], []
        for c, (name, ce) in enumerate(classes.items()):
            w, h = ce.embedding.tolist()
            for k, s in enumerate((0.9, 0.5, 0.1)):
                x, y = 5 + 20 * k, 5 + 10 * k
                xyxy.append([x, y, x + w, y + h])
                conf.append(s * emb.brightness)
                ids.append(c)
        names = np.array(list(classes), dtype=object)
        ids = np.array(ids, dtype=int)
        return sv.Detections(xyxy=np.array(xyxy, np.float32).reshape(-1, 4),
                             confidence=np.array(conf, np.float32), class_id=ids,
                             data={"class_name": names[ids]})


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    # brightness 255, 200, 150 -> score factors 1.0, 0.78, 0.59 (detect ranks them)
    for name, v in (("a.jpg", 255), ("b.png", 200), ("sub/c.jpg", 150)):
        Image.fromarray(np.full((H, W, 3), v, np.uint8)).save(d / name)
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture
def fake():
    return FakePredictor()


@pytest.fixture
def engine(fake, tmp_path):
    return Engine(predictor=fake, preview_dir=tmp_path / "previews")


@pytest.fixture
def project(folder, tmp_path):
    p = Project(folder, tmp_path / "proj" / "project.json")
    p.add_class("cell")
    return p


def test_opens_folder_images_only_sorted(project):
    assert [im.file for im in project.images] == ["a.jpg", "b.png", "sub/c.jpg"]
    assert all(im.status == "untouched" for im in project.images)
    assert project.current.file == "a.jpg"


def test_prompt_detect_accept_export_coco(project, engine, fake, tmp_path):
    from pycocotools.coco import COCO

    project.add_prompt("box", [5, 5, 25, 15])            # 20 x 10 exemplar
    n = detect_in_image(project, engine)
    assert n == 3 and project.current.status == "predicted"
    # the fake scores 0.9, 0.5, 0.1: two are above the 0.3 threshold; the first, on the exemplar,
    # becomes it (score 1: prompts are labels, trex2.predictor.respect_exemplars)
    assert [b.score for b in project.visible_boxes()] == [1.0, 0.5]
    assert project.class_counts() == {"cell": 2}
    assert project.accept_all() == 2
    assert project.current.status == "reviewed"
    out = tmp_path / "export" / "coco.json"
    project.export_coco(out)
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == 2
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cell"]
    assert sorted(a["bbox"] for a in anns) == [[5.0, 5.0, 20.0, 10.0], [25.0, 15.0, 20.0, 10.0]]
    assert {im["file_name"] for im in coco.dataset["images"]} == {"a.jpg", "b.png", "sub/c.jpg"}
    assert fake.encode_count == 1


def test_the_exemplar_object_gets_the_drawn_box(project, engine):
    """A detection on an object the user boxed as an exemplar takes the drawn box (IoU 0.75 here),
    on that image only, and one on a negative box goes (trex2.predictor.respect_exemplars,
    through app.batch.label_folder)."""
    project.add_prompt("box", [6, 6, 26, 16])              # the fake's first box is [5, 5, 25, 15]
    detect_in_image(project, engine)
    assert [b.xyxy for b in project.images[0].boxes][0] == [6.0, 6.0, 26.0, 16.0]
    list(detect_in_folder(project, engine))
    assert [b.xyxy for b in project.images[0].boxes][0] == [6.0, 6.0, 26.0, 16.0]
    assert [b.xyxy for b in project.images[1].boxes][0] == [5.0, 5.0, 25.0, 15.0]
    # a box drawn as "not a cell" on an object: the cell detection on it goes, on that image
    project.add_prompt("box", [25, 15, 45, 25], negative=True, image=0)
    detect_in_image(project, engine, 0)
    assert [b.xyxy for b in project.images[0].boxes if b.state == "pending"] == [
        [6.0, 6.0, 26.0, 16.0], [45.0, 25.0, 65.0, 35.0]]


def test_rejected_and_pending_boxes_are_not_exported(project, engine, tmp_path):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    first, second = project.visible_boxes()
    project.set_state(first.id, "rejected")
    data = project.export_coco(tmp_path / "e.json")
    assert data["annotations"] == []
    assert project.current.status == "predicted"       # 'second' still pending
    project.set_state(second.id, "accepted")
    assert project.current.status == "reviewed"
    data = project.export_coco(tmp_path / "e.json")
    assert [a["bbox"] for a in data["annotations"]] == [[25.0, 15.0, 20.0, 10.0]]


def test_embedding_cache_makes_reprompt_skip_encoding(project, engine, fake):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    project.add_prompt("point", [50, 40])
    detect_in_image(project, engine)
    assert fake.encode_count == 1 and fake.detect_calls == 2


def test_detect_in_this_image_uses_only_its_prompts(project, engine, fake):
    project.goto(1)
    with pytest.raises(ProjectError, match="draw a box or point on this image first"):
        detect_in_image(project, engine)
    project.goto(0)
    project.add_prompt("box", [0, 0, 10, 10])
    project.goto(1)
    project.add_prompt("box", [0, 0, 40, 30])
    detect_in_image(project, engine)
    (prompts, _), = fake.embed_calls
    assert len(prompts) == 1
    np.testing.assert_allclose(prompts[0][1], [[0, 0, 40, 30]])
    assert project.images[0].status == "untouched"


def test_detect_in_all_images_averages_prompts_per_class(project, engine, fake):
    project.add_class("dot")
    project.add_prompt("box", [0, 0, 10, 10], cls="cell", image=0)
    project.add_prompt("box", [0, 0, 30, 10], cls="cell", image=1)
    project.add_prompt("box", [0, 0, 8, 8], cls="dot", negative=True, image=1)
    project.add_prompt("point", [5, 5], cls="dot", image=2)
    steps = list(detect_in_folder(project, engine))
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(im.status == "predicted" for im in project.images)
    by_cls = {}
    for prompts, negatives in fake.embed_calls:
        by_cls[len(by_cls)] = (prompts, negatives)
    cell_prompts, cell_neg = by_cls[0]
    assert len(cell_prompts) == 2 and cell_neg is None           # two images, one class
    dot_prompts, dot_neg = by_cls[1]
    assert len(dot_prompts) == 1 and len(dot_neg) == 1
    # cell embedding = mean exemplar size (20, 10): boxes of that size on every image
    b = project.images[2].boxes[0]
    assert b.cls == "cell" and b.xyxy == [5.0, 5.0, 25.0, 15.0]
    assert fake.encode_count == 3


def test_detect_in_all_images_with_flip_sets_it_for_the_run_only(project, engine, fake):
    project.add_prompt("box", [0, 0, 10, 10], cls="cell", image=0)
    list(detect_in_folder(project, engine))
    assert fake.flips_seen == [False] * 3
    list(detect_in_folder(project, engine, flip=True))
    assert fake.flips_seen[3:] == [True] * 3 and fake.flip is False
    stop = detect_in_folder(project, engine, flip=True, should_stop=lambda: True)
    assert list(stop) == [] and fake.flip is False       # restored however the run ends
    detect_in_image(project, engine, 0, flip=True)
    detect_in_image(project, engine, 0)                  # None: the predictor's own setting
    assert fake.flips_seen[6:] == [True, False] and fake.flip is False
    # the prefetch encodes for the setting of the last detection call, so that call's next
    # detection finds the image encoded
    seen = []
    fake.cached = lambda key, size=None: None
    fake.encode_image = lambda image, key=None, size=None: seen.append(fake.flip)
    engine.embedding(project.image_path(1))
    assert seen == [True]


def test_detect_in_all_images_cancel_keeps_done_images_and_undo_restores(project, engine):
    project.add_prompt("box", [5, 5, 25, 15])
    done = []
    for step in detect_in_folder(project, engine, should_stop=lambda: len(done) >= 1):
        done.append(step)
    assert len(done) == 1
    assert [im.status for im in project.images] == ["predicted", "untouched", "untouched"]
    assert project.undo() == "detect in all images"
    assert all(not im.boxes for im in project.images)
    assert len(project.images[0].prompts) == 1


def test_threshold_changes_view_without_model(project, engine, fake):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    calls = fake.detect_calls
    project.set_threshold(0.05)
    assert len(project.visible_boxes()) == 3
    project.set_threshold(0.95)
    assert [b.score for b in project.visible_boxes()] == [1.0]      # the exemplar's own box
    assert fake.detect_calls == calls
    with pytest.raises(ProjectError):
        project.set_threshold(1.5)


def test_review_edit_move_resize_relabel(project, engine):
    project.add_class("other")
    project.set_active_class("cell")
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    b = project.visible_boxes()[0]
    project.move(b.id, [40, 30, 12, 8])                  # corners in any order, normalised
    kind, rec = project.find(b.id)
    assert rec.xyxy == [12.0, 8.0, 40.0, 30.0] and rec.state == "accepted"
    project.relabel(b.id, "other")
    assert project.find(b.id)[1].cls == "other"
    project.move(b.id, [-10, -10, 500, 500])              # clipped to the 80 x 60 image
    assert project.find(b.id)[1].xyxy == [0.0, 0.0, 80.0, 60.0]
    with pytest.raises(ProjectError, match="too small"):
        project.move(b.id, [5, 5, 5.5, 9])


def test_a_box_becomes_an_exemplar_or_a_negative_prompt_in_one_undo_step(project, engine):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    mine, good = project.visible_boxes()[:2]
    bad = project.current.boxes[-1]
    assert mine.score == 1.0 and project.box_to_prompt(mine.id).id == project.current.prompts[0].id
    project.undo()                                        # the exemplar's own box: already a prompt
    q = project.box_to_prompt(good.id)
    assert (q.cls, q.kind, q.coords, q.negative) == ("cell", "box", good.xyxy, False)
    assert project.box_to_prompt(good.id) is q and len(project.current.prompts) == 2   # pressed twice
    project.undo()
    assert project.find(good.id)[1].state == "accepted"
    n = project.box_to_prompt(bad.id, negative=True)
    assert n.negative and n.coords == bad.xyxy and project.find(bad.id)[1].state == "rejected"
    positives, negatives = project.exemplar_boxes()(str(project.image_path()))
    assert len(positives["cell"]) == 2 and negatives["cell"].tolist() == [bad.xyxy]
    assert project.undo() == "box to negative prompt"
    assert len(project.current.prompts) == 2 and project.find(bad.id)[1].state == "pending"
    assert project.undo() == "box to prompt"
    assert len(project.current.prompts) == 1 and project.find(good.id)[1].state == "pending"
    with pytest.raises(ProjectError, match="select a box"):
        project.box_to_prompt(project.current.prompts[0].id)
    # E then Shift+E on one box: one prompt, now negative (never two that contradict each other)
    e = project.box_to_prompt(good.id)
    assert project.box_to_prompt(good.id, negative=True) is e and e.negative
    assert [q.coords for q in project.current.prompts].count(good.xyxy) == 1
    assert project.find(good.id)[1].state == "rejected"


def test_a_relabelled_box_is_not_detected_again_under_its_old_class(project, engine):
    project.add_class("other")
    project.set_active_class("cell")
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    b = next(x for x in project.visible_boxes() if x.score < 1)
    project.relabel(b.id, "other")
    detect_in_image(project, engine)
    same_spot = [x for x in project.current.boxes if x.xyxy == b.xyxy]
    assert [(x.cls, x.state) for x in same_spot] == [("other", "accepted")]


def test_redetect_keeps_decisions_and_drops_duplicates(project, engine):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    b0, b1 = project.visible_boxes()
    project.set_state(b0.id, "accepted")
    project.set_state(b1.id, "rejected")
    detect_in_image(project, engine)
    boxes = project.current.boxes
    assert len(boxes) == 3                                # 2 decided + the 0.1 one again
    assert sorted(b.state for b in boxes) == ["accepted", "pending", "rejected"]


def test_manual_box_is_accepted_and_exported(project, tmp_path):
    project.add_box([1, 2, 11, 12])
    data = project.export_coco(tmp_path / "m.json")
    assert [a["bbox"] for a in data["annotations"]] == [[1.0, 2.0, 10.0, 10.0]]


def test_undo_redo(project):
    p = project.add_prompt("box", [10, 10, 30, 20])
    project.move(p.id, [0, 0, 20, 20])
    project.delete(p.id)
    assert project.current.prompts == []
    assert project.undo() == "delete"
    assert project.current.prompts[0].coords == [0.0, 0.0, 20.0, 20.0]
    assert project.undo() == "move prompt"
    assert project.current.prompts[0].coords == [10.0, 10.0, 30.0, 20.0]
    assert project.redo() == "move prompt"
    assert project.current.prompts[0].coords == [0.0, 0.0, 20.0, 20.0]
    project.undo()
    project.undo()
    assert project.current.prompts == []
    assert project.undo() == "add class cell"             # the fixture's add_class
    with pytest.raises(ProjectError, match="nothing to undo"):
        project.undo()
    project.redo()
    project.redo()
    project.add_prompt("point", [1, 1])                   # a new edit clears the redo stack
    with pytest.raises(ProjectError, match="nothing to redo"):
        project.redo()


def test_undo_goes_back_to_the_edited_image(project):
    project.add_prompt("box", [5, 5, 25, 15], image=1)
    project.goto(2)
    project.undo()
    assert project.index == 1 and project.images[1].prompts == []


def test_autosave_is_atomic_and_restart_resumes(project, engine, folder, tmp_path):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    b = project.visible_boxes()[0]
    project.set_state(b.id, "accepted")
    project.set_threshold(0.42)
    project.goto(2)
    files = sorted(p.name for p in project.path.parent.iterdir())
    assert files == ["project.json"]                      # no temp file left behind
    again = Project(folder, project.path)
    assert again.current.file == "sub/c.jpg"
    assert again.threshold == 0.42
    assert again.class_names == ["cell"]
    assert again.images[0].to_json() == project.images[0].to_json()
    assert again.images[0].status == "predicted"
    assert again.accepted_annotations() == project.accepted_annotations()
    # ids keep increasing after a restart (no clash with saved ones)
    p2 = again.add_prompt("point", [3, 3])
    assert p2.id > max(x.id for im in project.images for x in (*im.prompts, *im.boxes))


def test_project_file_not_ours_is_a_clear_error(folder, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ProjectError, match="bad.json"):
        Project(folder, bad)


def test_removed_images_are_hidden_with_a_warning_and_keep_their_labels(project, folder, tmp_path):
    project.add_prompt("box", [5, 5, 25, 15], image=1)
    project.goto(1)
    project.add_box([5, 5, 25, 25])
    (folder / "b.png").rename(tmp_path / "b.png")          # e.g. moved away, a drive unmounted
    again = Project(folder, project.path)
    assert [im.file for im in again.images] == ["a.jpg", "sub/c.jpg"]
    assert "b.png" in again.warnings[0]
    again.add_box([1, 1, 9, 9])                            # a save while b.png is away
    again.delete_class("cell")                             # even its class goes
    assert again.export_images()[0] == [("a.jpg", W, H), ("sub/c.jpg", W, H)]
    (tmp_path / "b.png").rename(folder / "b.png")
    back = Project(folder, project.path)
    assert [b.state for b in back.images[1].boxes] == ["accepted"]
    assert len(back.images[1].prompts) == 1 and back.class_names == ["cell"]
    back.export_coco(tmp_path / "out.json")                # its class came back with it


def test_classes_add_rename_delete(project):
    assert project.add_class("dot").color != project.get_class("cell").color
    with pytest.raises(ProjectError, match="already exists"):
        project.add_class("cell")
    project.set_active_class("cell")
    p = project.add_prompt("box", [5, 5, 25, 15])
    project.update_class("cell", "blood cell", "#123456", "a red blood cell")
    c = project.get_class("blood cell")
    assert (c.color, c.text) == ("#123456", "a red blood cell")
    assert project.find(p.id)[1].cls == "blood cell"
    assert project.active_class == "blood cell"
    assert project.delete_class("blood cell") == {"boxes": 0, "accepted": 0, "images": 0,
                                                  "prompts": 1}
    assert project.current.prompts == [] and project.class_names == ["dot"]
    project.undo()
    assert project.class_names == ["blood cell", "dot"]
    assert len(project.current.prompts) == 1


def test_first_prompt_without_class_creates_default(folder, tmp_path):
    p = Project(folder, tmp_path / "p.json")
    p.add_prompt("point", [4, 4])
    assert p.class_names == [DEFAULT_CLASS] and p.current.prompts[0].cls == DEFAULT_CLASS


def test_text_phrase_without_clip_is_a_clear_error(project, engine):
    project.update_class("cell", text="a red blood cell")
    project.add_prompt("box", [5, 5, 25, 15])
    with pytest.raises(ProjectError, match="CLIP"):
        detect_in_image(project, engine)


def test_prompt_file_roundtrip_and_external_prompts(project, folder, tmp_path, engine, fake):
    from exports import read_prompts

    project.add_prompt("box", [5, 5, 25, 15], image=0)
    project.add_prompt("point", [40, 30], negative=True, image=2)
    out = project.save_prompts(tmp_path / "sets" / "prompts.json")
    ps = read_prompts(out)
    assert len(ps.prompts) == 2 and ps.category_names == ["cell"]
    # load into a fresh project of a copy of the folder: prompts on other images are external
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(other / "z.jpg")
    q = Project(other, tmp_path / "q.json")
    assert q.load_prompts(out) == (0, 2)
    assert q.class_names == ["cell"]
    list(detect_in_folder(q, engine))
    prompts, negatives = fake.embed_calls[-1]
    assert len(prompts) == 1 and len(negatives) == 1
    # same folder: prompts land on the images
    r = Project(folder, tmp_path / "r.json")
    assert r.load_prompts(out) == (2, 0)
    assert r.images[2].prompts[0].negative is True
    # loading a file again adds nothing (a prompt twice would count twice in the class average)
    assert r.load_prompts(out) == (0, 0) and q.load_prompts(out) == (0, 0)
    assert sum(len(im.prompts) for im in r.images) == 2 and len(q.external_prompts) == 2


def test_export_yolo(project, engine, tmp_path):
    from exports import read_yolo

    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    project.accept_all()
    data_yaml = project.export_yolo(tmp_path / "yolo")
    ds = read_yolo(Path(data_yaml).parent)
    assert len(ds.annotations) == 2 and ds.categories == ["cell"]


def test_detect_in_all_images_skips_unreadable_files(project, engine, folder):
    project.add_prompt("box", [5, 5, 25, 15])
    (folder / "b.png").write_bytes(b"truncated")
    steps = list(detect_in_folder(project, engine))
    assert [s[3] is not None for s in steps] == [False, True, False]
    assert "b.png" in steps[1][3]
    assert [im.status for im in project.images] == ["predicted", "untouched", "predicted"]


def test_search_ranks_images_by_class_strength(project, engine):
    project.add_prompt("box", [5, 5, 25, 15], image=1)
    ranked = search_images(project, engine, "cell")
    assert [i for i, _ in ranked] == [0, 1, 2]            # brightness 255 > 200 > 150
    assert ranked[0][1] == pytest.approx(0.9, abs=1e-3)
    assert all(not im.boxes for im in project.images)     # search does not label
    search_images(project, engine, "cell", flip=True)     # the Mirror pass checkbox, for this run
    assert engine.predictor.flips_seen[-3:] == [True] * 3 and engine.predictor.flip is False


def test_a_cancelled_search_says_so(project, engine, tmp_path, monkeypatch):
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    on_search = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "on_search")
    sess = Session(project, tmp_path)
    project.add_prompt("box", [5, 5, 25, 15])

    def stopped_after_one(p, e, cls, should_stop, **kw):
        sess.work.cancel = True                           # Cancel pressed after the first image
        return [(0, 0.9)]
    monkeypatch.setattr("app.ui.search_images", stopped_after_one)
    items, msg = on_search(sess, "cell", False, progress=lambda *a, **k: None)
    assert len(items) == 1 and msg.startswith("cancelled: 1 of 3 images ranked")


def test_upload_copies_into_folder_and_rejects_bad_files(project, tmp_path):
    src = tmp_path / "new.jpg"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(src)
    idx, skipped = project.add_uploaded([src])
    assert project.images[idx[0]].file == "uploaded/new.jpg" and skipped == []
    assert (project.root / "uploaded" / "new.jpg").exists()
    assert project.current.file == "uploaded/new.jpg"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ProjectError, match="broken.jpg"):
        project.add_uploaded([bad])
    # an upload does not take the name of an image that is away but still holds labels
    project.add_box([2, 2, 12, 12])
    (project.root / "uploaded" / "new.jpg").rename(tmp_path / "away.jpg")
    again = Project(project.root, project.path)
    new, _ = again.add_uploaded([src])
    assert again.images[new[0]].file == "uploaded/new-1.jpg"
    (tmp_path / "away.jpg").rename(project.root / "uploaded" / "new.jpg")
    back = Project(project.root, project.path)
    assert len(back.images[back.index_of("uploaded/new.jpg")].boxes) == 1
    # a bad file beside a good one: the good one is added, the bad one named
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(other)
    idx, skipped = back.add_uploaded([bad, other])
    assert [back.images[i].file for i in idx] == ["uploaded/other.png"]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0] and str(tmp_path) not in skipped[0]
    assert not (back.root / "uploaded" / "broken.jpg").exists()


def test_class_embeddings_save_load(project, engine, folder, tmp_path):
    project.add_prompt("box", [5, 5, 25, 15])
    embs = engine.class_embeddings(project, None)
    path = tmp_path / "cls.safetensors"
    trex2.save_class_embeddings(str(path), embs)
    q = Project(folder, tmp_path / "q.json")
    assert q.load_class_embeddings(path) == ["cell"]
    list(detect_in_folder(q, engine))                     # no prompt: the loaded embedding
    assert all(len(im.boxes) == 3 for im in q.images)
    assert q.embeddings_path.exists()
    assert "cell" in Project(folder, tmp_path / "q.json").loaded_embeddings
    # the Save button encodes the prompt images at the canvas detect-in-all uses
    from app.ui import AppConfig, Session, build_app
    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    seen = []
    real = engine.class_embeddings
    engine.class_embeddings = lambda *a, **k: seen.append(k.get("sides")) or real(*a, **k)
    path_out, _ = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "on_save_embeddings")(
        Session(project, tmp_path))
    assert seen == [project.exemplar_sides()] and seen[0] and Path(path_out).exists()
    # a loaded class's recorded exemplar size picks its canvas, until it has prompts of its own
    q.loaded_embeddings["cell"].object_side = 12.0
    assert q.exemplar_sides() == {"cell": 12.0} and q.exemplar_sides([0]) == {}
    q.add_prompt("box", [5, 5, 25, 25], cls="cell")
    assert q.exemplar_sides() == {"cell": 20.0}


def test_preview_is_exif_frame_and_downscaled(engine, tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.zeros((100, 3000, 3), np.uint8)).save(big)
    engine.preview_max_side = 1000
    path, w, h = engine.preview(big)
    assert (w, h) == (3000, 100)
    assert Image.open(path).size == (1000, 33)
    assert engine.preview(big)[0] == path                 # made once


def test_views_are_per_session(project, engine, folder, tmp_path):
    from app.ui import Session, build_view, stats_html

    s1 = Session(project, tmp_path)
    s2 = Session(Project(folder, tmp_path / "other.json"), tmp_path)
    project.add_prompt("box", [5, 5, 25, 15])
    v1, v2 = build_view(s1, engine), build_view(s2, engine)
    assert len(v1["prompts"]) == 1 and v2["prompts"] == []
    assert v1["image"]["width"] == W and v1["image"]["url"].startswith("gradio_api/file=")
    assert "cell" in stats_html(s1)


def test_typed_paths_are_limited_when_served_on_the_network(tmp_path):
    from app.ui import AppConfig, _check_user_path

    net = AppConfig(tmp_path / "imgs", None, None, tmp_path, path_roots=[tmp_path / "data"])
    ok = tmp_path / "data" / "p.json"
    assert _check_user_path(net, str(ok)) == ok.resolve()
    for bad in ("/etc/passwd", str(tmp_path / "data" / ".." / "x.json"), str(tmp_path)):
        with pytest.raises(ProjectError, match="outside the folders"):
            _check_user_path(net, bad)
    local = AppConfig(tmp_path / "imgs", None, None, tmp_path, path_roots=None)
    assert _check_user_path(local, "/etc/hosts") == Path("/etc/hosts").resolve()


def test_next_to_review_skips_reviewed_images(project):
    project.accept_all(image=1)                          # nothing to label: reviewed anyway
    assert project.images[1].status == "reviewed"
    assert project.next_to_review().file == "sub/c.jpg"
    assert project.next_to_review().file == "a.jpg"
    project.accept_all(image=0)
    project.accept_all(image=2)
    with pytest.raises(ProjectError, match="every image is reviewed"):
        project.next_to_review()


def test_workflow_with_the_real_predictor_class(project, tmp_path, monkeypatch):
    """The same workflow through trex2.Predictor itself (untrained weights: this checks the
    integration, not accuracy), and the text-encoder message when a phrase has no CLIP."""
    model = trex2.TRex2(trex2.ModelConfig()).eval()
    engine = Engine(predictor=trex2.Predictor(model), preview_dir=tmp_path / "pv")
    project.add_prompt("box", [10, 10, 40, 30])
    detect_in_image(project, engine)
    assert project.current.status == "predicted"
    for b in project.current.boxes:
        assert 0 <= b.score <= 1 and b.cls == "cell"
        x1, y1, x2, y2 = b.xyxy
        assert 0 <= x1 < x2 <= W + 1e-3 and 0 <= y1 < y2 <= H + 1e-3
    steps = list(detect_in_folder(project, engine))
    # each image once, plus at most one blind look at half the canvas on each of the two images
    # without exemplars where nothing was found (trex2.predictor.BLIND_LOOK_SCALE)
    n = engine.predictor.encode_count
    assert len(steps) == 3 and 3 <= n <= 5
    list(detect_in_folder(project, engine))               # again: every embedding is cached
    assert engine.predictor.encode_count == n
    project.update_class("cell", text="a red blood cell")
    monkeypatch.delenv("TREX2_CLIP_DIR", raising=False)
    with pytest.raises(ProjectError, match="a red blood cell"):
        detect_in_image(project, engine)


def test_small_exemplars_tile_the_image_in_the_app(tmp_path):
    """Exemplars too small for the 640 px canvas: the app encodes the image larger, in tiles
    (as `label --canvas auto` does), for this image and for the whole folder alike."""
    from trex2.predictor import ImageEmbedding, TiledEmbedding

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8)).save(d / "big.png")
    engine = Engine(predictor=trex2.Predictor(trex2.TRex2(trex2.ModelConfig()).eval()),
                    preview_dir=tmp_path / "pv")
    project = Project(d, tmp_path / "proj" / "project.json")
    project.add_class("dot")
    project.add_prompt("box", [100, 100, 120, 120], cls="dot")      # 20 px: 13 px at 640
    assert project.exemplar_sides() == {"dot": pytest.approx(20.0)}
    project.add_class("speck")                                       # negatives only: no size
    project.add_prompt("box", [300, 300, 304, 304], cls="speck", negative=True)
    assert project.exemplar_sides() == {"dot": pytest.approx(20.0)}
    engine.prefetch(project.image_path(0), project.exemplar_sides([0])).result()
    encodes = engine.predictor.encode_count
    detect_in_image(project, engine)                              # prefetched at the right canvas
    assert engine.predictor.encode_count == encodes
    size = engine.class_canvas(project.image_path(0), project.exemplar_sides(), "dot")
    emb = engine.embedding(project.image_path(0), size)
    assert isinstance(emb, TiledEmbedding) and len(emb.tiles) > 1
    encodes = engine.predictor.encode_count
    list(detect_in_folder(project, engine))                        # same canvas: cached
    assert engine.predictor.encode_count == encodes
    # a large class beside it is detected at the model's 640 px, in one piece (one more encode)
    project.add_class("slab")
    project.add_prompt("box", [500, 200, 650, 350], cls="slab")      # 150 px: 96 px at 640
    assert engine.class_canvas(project.image_path(0), project.exemplar_sides(), "slab") == 640
    list(detect_in_folder(project, engine))
    assert engine.predictor.encode_count == encodes + 1
    assert isinstance(engine.embedding(project.image_path(0), 640), ImageEmbedding)


def test_cli_rejects_a_missing_folder(tmp_path, capsys):
    from app.ui import main

    assert main(["--images", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["--images", str(tmp_path), "--port", "99999"]) == 2
    assert "not a port number" in capsys.readouterr().err


def test_kill_ends_the_app_and_removes_its_temp_folder(folder, tmp_path):
    """SIGTERM (`kill`) cleans up as Ctrl+C does: previews, uploads and exports go with the app."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, str(repo / "app.py"), "--images", str(folder), "--project",
                             str(tmp_path / "p.json"), "--port", str(port)], cwd=repo,
                            env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:                          # the app prints its URL once it serves
            if "Running on" in line:
                break
        assert list(tmp.glob("trex2-app-*")), "the app made no temp folder"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    time.sleep(0.1)
    assert not list(tmp.glob("trex2-app-*"))


def test_detect_in_all_images_keeps_done_images_when_the_model_fails(project, engine, fake):
    project.add_prompt("box", [5, 5, 25, 15])
    real = fake.detect

    def flaky(emb, classes, score_threshold=None, compete=True):
        if fake.detect_calls >= 2:
            raise RuntimeError("model failed")
        return real(emb, classes, score_threshold, compete)

    fake.detect = flaky
    with pytest.raises(RuntimeError, match="model failed"):
        list(detect_in_folder(project, engine))
    assert [im.status for im in project.images] == ["predicted", "predicted", "untouched"]
    saved = Project(project.root, project.path)           # what was done is on disk too
    assert [im.status for im in saved.images] == ["predicted", "predicted", "untouched"]
    project.undo()
    assert all(not im.boxes for im in project.images)


def test_app_builds_offline_with_analytics_off(folder, tmp_path, engine):
    from app.ui import AppConfig, build_app

    demo = build_app(AppConfig(folder, tmp_path / "p.json", engine, tmp_path))
    assert demo.analytics_enabled is False
    config = json.dumps(demo.get_config_file(), default=str)
    assert "fonts.googleapis" not in config and "cdn.jsdelivr" not in config


def test_detections_are_clipped_to_the_image(project):
    project.apply_detections(0, [("cell", [-5, 10, 30, 70], 0.9), ("cell", [79.5, 0, 99, 9], 0.8)])
    assert [b.xyxy for b in project.images[0].boxes] == [[0.0, 10.0, 30.0, 60.0]]


def test_only_the_best_detections_per_class_are_kept(project, monkeypatch):
    import app.project as ap

    monkeypatch.setattr(ap, "KEEP_PER_CLASS", 2)
    dets = [("cell", [0, 0, 10 + k, 10], s) for k, s in enumerate((0.2, 0.9, 0.005, 0.5, 0.7))]
    project.apply_detections(0, dets)
    assert [b.score for b in project.images[0].boxes] == [0.9, 0.7]


def test_view_of_an_unreadable_image_names_it_and_keeps_the_session_usable(project, engine,
                                                                           folder, tmp_path):
    from app.ui import Session, build_view, stats_html

    (folder / "b.png").write_bytes(b"broken")
    s = Session(project, tmp_path)
    project.goto(1)
    v = build_view(s, engine)
    assert v["image"] is None and "b.png" in v["message"]
    assert "cell" in stats_html(s)
    project.step(1)
    assert build_view(s, engine)["image"]["file"] == "sub/c.jpg"


def test_an_image_is_decoded_once_for_its_size_and_its_encode(tmp_path, monkeypatch):
    """Detecting on a new image reads its size and encodes it from one decode of the file."""
    import trex2.image_io

    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(d / "a.png")
    engine = Engine(predictor=trex2.Predictor(trex2.TRex2(trex2.ModelConfig()).eval()),
                    preview_dir=tmp_path / "pv")
    project = Project(d, tmp_path / "proj" / "project.json")
    project.add_class("dot")
    project.add_prompt("box", [100, 100, 160, 160], cls="dot")      # 60 px: one plain encode
    calls = []
    real = trex2.image_io.load_image
    monkeypatch.setattr(trex2.image_io, "load_image", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    detect_in_image(project, engine)
    assert len(calls) == 1 and engine.predictor.encode_count == 1


def test_import_coco_labels_and_detections_then_undo(project, tmp_path):
    from exports import write_coco

    project.add_box([0, 0, 20, 20], cls="cell")          # the user's own label on a.jpg
    src = tmp_path / "in.coco.json"
    write_coco(src, [("a.jpg", W, H), ("c.jpg", W, H), ("b.png", W + 1, H), ("gone.jpg", W, H)],
               ["cell", "nucleus"],
               [("a.jpg", "cell", (0, 0, 20, 21)),           # duplicates the user's box: dropped
                ("a.jpg", "nucleus", (30, 30, 50, 50)),      # a label: accepted
                ("a.jpg", "cell", (40, 10, 60, 30), 0.8),    # a detection: pending, scored
                ("c.jpg", "cell", (60, 40, 200, 200)),       # by unique file name (sub/c.jpg), clipped
                ("b.png", "cell", (1, 1, 9, 9)),             # size differs from b.png: skipped
                ("gone.jpg", "cell", (1, 1, 9, 9))])
    raw = json.loads(src.read_text())                     # one malformed box: left out, and said
    raw["annotations"].append({"id": 99, "image_id": raw["images"][0]["id"], "category_id": 1,
                               "bbox": [5, 5, -3, 4], "area": 0, "iscrowd": 0})
    src.write_text(json.dumps(raw))
    r = project.import_coco(src)
    bad = r.pop("bad_boxes")
    assert len(bad) == 1 and "annotations[6]" in bad[0] and "negative width" in bad[0]
    assert r == {"images": 2, "labels": 2, "detections": 1, "unmatched": ["gone.jpg"],
                 "size_mismatch": ["b.png"], "unreadable": []}
    assert project.class_names == ["cell", "nucleus"]
    a, b, c = project.images
    assert sorted((x.cls, x.state, x.score, x.source) for x in a.boxes) == [
        ("cell", "accepted", None, "manual"), ("cell", "pending", 0.8, "model"),
        ("nucleus", "accepted", None, "manual")]
    assert a.status == "predicted" and not b.boxes
    assert [(x.xyxy, x.state) for x in c.boxes] == [([60.0, 40.0, 80.0, 60.0], "accepted")]
    assert len(project.accepted_annotations()) == 3
    assert project.undo() == "import COCO"
    assert [len(im.boxes) for im in project.images] == [1, 0, 0] and project.class_names == ["cell"]


def test_import_coco_rejects_a_bad_file(project, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"bbox": [0, 0, 1]}]}')
    with pytest.raises(ProjectError, match="bad.json"):
        project.import_coco(bad)
    # an upload is named by its own name, not by its temporary path
    with pytest.raises(ProjectError) as e:
        project.import_coco(bad, shown="mine.json")
    assert str(e.value).startswith("cannot import mine.json: ") and str(tmp_path) not in str(e.value)
    with pytest.raises(ProjectError) as e:
        project.import_coco(tmp_path / "gone.json", shown="gone.json")
    assert str(tmp_path) not in str(e.value) and "not found" in str(e.value)


def test_two_sessions_on_one_project_file_never_overwrite_each_other(folder, tmp_path):
    """A second tab's stale copy of the project must not overwrite the first tab's work when
    it saves (here: by navigating); each handler syncs with the file under the shared lock."""
    from app.ui import Session, Work, _acquire

    def act(sess, fn):                                   # what every guarded handler does
        assert _acquire(sess)
        try:
            return fn()
        finally:
            work.lock.release()

    path = tmp_path / "proj" / "project.json"
    work = Work()
    a = Session(Project(folder, path), tmp_path, work=work)
    act(a, lambda: a.project.add_class("cell"))
    b = Session(Project(folder, path), tmp_path, work=work)            # a second tab opens
    act(b, lambda: b.project.add_prompt("point", [5, 5], image=1))
    act(a, lambda: a.project.add_box([10, 10, 40, 30]))               # tab A labels image 0
    act(a, lambda: a.project.goto(2))
    act(b, lambda: b.project.step(1))                    # B saves (navigation), synced first
    saved = Project(folder, path)
    assert [x.state for x in saved.images[0].boxes] == ["accepted"]
    assert len(saved.images[1].prompts) == 1
    assert b.project.index == 1 and saved.current.file == "b.png"   # B kept its own image
    assert not b.project.can_undo                        # B's undo steps predate A's box
    act(a, lambda: None)                                 # A picks up B's state in turn
    assert a.project.index == 2 and len(a.project.images[1].prompts) == 1
    assert not a.project.sync()                          # nothing new: no reload
    act(a, lambda: a.project.add_box([20, 20, 30, 30]))
    act(b, lambda: b.project.goto(0))                    # B only moves on (and saves that)
    assert not a.project.sync() and a.project.can_undo   # A keeps its undo history
    act(a, lambda: a.project.undo())
    assert len(Project(folder, path).images[2].boxes) == 0


def test_each_tab_keeps_its_own_class_and_threshold(folder, tmp_path):
    """Another tab's class pick or threshold never changes this tab's (nor clears its undo);
    its real edits still reach this tab."""
    path = tmp_path / "proj" / "project.json"
    a = Project(folder, path)
    a.add_class("cell")
    a.add_class("dust")
    a.set_active_class("cell")
    a.set_threshold(0.3)
    b = Project(folder, path)
    b.set_active_class("dust")
    b.set_threshold(0.6)
    assert not a.sync() and a.can_undo                    # view settings only: no reload
    assert (a.active_class, a.threshold) == ("cell", 0.3)
    b.add_class("spore")
    assert a.sync() and "spore" in a.class_names          # an edit: reloaded ...
    assert (a.active_class, a.threshold) == ("cell", 0.3)  # ... keeping this tab's view
    assert a.add_prompt("point", [5, 5]).cls == "cell"


def test_a_run_says_whose_it_is_and_who_stopped_it(tmp_path):
    from app.ui import Work

    work, mine, other = Work(), object(), object()
    assert work.stop(other) is None and not work.cancel   # nothing runs: nothing to stop
    with work.running("detecting in all images", mine):
        assert work.busy_message(mine).startswith("not applied: this tab is detecting")
        assert work.busy_message(other).startswith("not applied: another tab is detecting")
        assert work.stop(mine) is None and work.cancel and not work.cancelled_elsewhere
    with work.running("detecting in all images", mine):
        assert not work.cancel                            # a new run starts uncancelled
        assert "another tab started" in work.stop(other) and work.cancelled_elsewhere
    assert work.long_job == "" and work.owner is None


def test_during_a_run_the_folder_can_be_browsed_but_not_edited(project, engine, tmp_path):
    """While 'detect in all images' holds the project, moving through the folder still answers
    (read-only, and says so); an edit is refused with a message saying whose run it is."""
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    on_op = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "on_op")
    sess = Session(project, tmp_path)
    box = project.add_box([10, 10, 30, 30])
    op = lambda **d: on_op(sess, False, False, SimpleNamespace(_data=d))  # noqa: E731
    fn = {f.fn.__name__: f.fn for f in demo.fns.values()}
    saved = project.path.read_bytes()
    with sess.work.lock, sess.work.running("detecting in all images", object()):   # another tab's run
        out = op(op="goto", index=2)
        assert project.index == 2 and out[1]["action"] == "nav" and out[1]["image"]["index"] == 2
        assert out[1]["message"].startswith("viewing only: another tab is detecting in all images")
        out = op(op="select", id=box.id)
        assert sess.selected == box.id and "action" not in out[1]      # kept, without a ("busy") view
        assert fn["on_goto"](sess, 1)[1]["image"]["index"] == 1                 # the Image list,
        assert fn["on_nav"](sess, 1)[1]["image"]["index"] == 2                  # Prev / Next
        assert fn["on_next_to_review"](sess)[1]["image"]["index"] == 1          # and U (a.jpg is reviewed)
        # browsing saves nothing: this tab's copy may be older than the file (another tab's
        # edits would be lost), and the run may be changing it
        assert project.path.read_bytes() == saved
        project.goto(0, save=False)
    with sess.work.lock, sess.work.running("detecting in all images", sess):        # this tab's own run
        assert fn["on_nav"](sess, 1)[1]["message"].startswith("viewing only: this tab is detecting")
        project.goto(0, save=False)
    with sess.work.lock, sess.work.running("detecting in all images", object()):
        out = op(op="reject", id=box.id, file=project.current.file)
        assert out[1]["action"] == "busy" and "not applied: another tab is detecting" in out[1]["message"]
        assert project.find(box.id)[1].state == "accepted"
    op(op="reject", id=box.id, file=project.current.file)   # the run is over: edits apply again
    assert project.find(box.id)[1].state == "rejected"


def test_opening_a_session_does_not_rewrite_the_project_file(project):
    """Setting the threshold to its current value (what the slider does when a page opens)
    must not save: a stale tab would otherwise write on open."""
    project.set_threshold(0.4)
    stamp = project.path.stat().st_mtime_ns, project.path.stat().st_ino
    project.set_threshold(0.4)
    assert (project.path.stat().st_mtime_ns, project.path.stat().st_ino) == stamp


def test_an_empty_folder_answers_with_a_message_not_a_crash(tmp_path, engine):
    (tmp_path / "empty").mkdir()
    p = Project(tmp_path / "empty", tmp_path / "p.json")
    for action in (lambda: detect_in_image(p, engine), p.accept_all, p.next_to_review,
                   lambda: p.add_prompt("box", [0, 0, 5, 5]), lambda: p.add_box([0, 0, 5, 5]),
                   p.mark_reviewed, lambda: p.set_state(1, "accepted"), lambda: p.delete(1),
                   lambda: p.move(1, [0, 0, 3, 3])):
        with pytest.raises(ProjectError, match="no images in"):
            action()


def test_an_unreadable_image_does_not_block_export_or_import(project, folder, tmp_path):
    from pycocotools.coco import COCO

    from exports import read_coco, write_coco

    project.add_box([10, 10, 40, 30])
    project.accept_all()
    (folder / "z_broken.jpg").write_bytes(b"not a jpeg")
    p = Project(folder, project.path)                    # reopened with the broken file in it
    assert p.export_images() == ([("a.jpg", W, H), ("b.png", W, H), ("sub/c.jpg", W, H)],
                                 ["z_broken.jpg"])
    p.export_coco(tmp_path / "out.json")
    coco = COCO(str(tmp_path / "out.json"))
    assert len(coco.imgs) == 3 and len(coco.anns) == 1
    p.export_yolo(tmp_path / "yolo")
    assert (tmp_path / "yolo" / "labels" / "a.txt").read_text().count("\n") == 1
    write_coco(tmp_path / "in.json", [("z_broken.jpg", W, H), ("b.png", W, H)], ["cell"],
               [("z_broken.jpg", "cell", (1, 1, 9, 9)), ("b.png", "cell", (2, 2, 20, 20))])
    r = p.import_coco(tmp_path / "in.json")
    assert r["unreadable"] == ["z_broken.jpg"] and r["labels"] == 1
    assert read_coco(tmp_path / "out.json").images


def test_a_truncated_jpeg_is_left_out_of_exports(project, folder, tmp_path):
    """A JPEG cut short keeps a readable header (its size reads) but cannot be decoded, so the app
    can neither show nor detect on it: exports leave it out and name it, until it is mended."""
    from trex2.image_io import image_size

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / "t.jpg")
    whole = (folder / "t.jpg").read_bytes()
    (folder / "t.jpg").write_bytes(whole[: len(whole) // 2])
    assert image_size(folder / "t.jpg") == (W, H)
    p = Project(folder, project.path)
    expected = [("a.jpg", W, H), ("b.png", W, H), ("sub/c.jpg", W, H)]
    assert p.export_images() == (expected, ["t.jpg"])
    assert [im["file_name"] for im in p.export_coco(tmp_path / "out.json")["images"]] == \
        ["a.jpg", "b.png", "sub/c.jpg"]
    p.export_yolo(tmp_path / "yolo")
    assert not list((tmp_path / "yolo").rglob("t.*"))
    (folder / "t.jpg").write_bytes(whole)                # mended: listed again
    assert p.export_images() == (sorted(expected + [("t.jpg", W, H)]), [])


def test_yolo_export_can_leave_out_images_not_reviewed(project, tmp_path):
    project.add_box([10, 10, 40, 30])                    # a.jpg: accepted box, reviewed
    project.accept_all()
    project.goto(1)
    project.add_box([5, 5, 20, 20])                      # b.png: accepted, not marked reviewed
    project.images[1].reviewed = False
    project.export_yolo(tmp_path / "yolo", only_reviewed=True)
    labels = sorted(p.name for p in (tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert labels == ["a.txt"]
    assert sorted(p.name for p in (tmp_path / "yolo" / "images").rglob("*.*")) == ["a.jpg"]


def test_save_prompt_set_never_replaces_a_file_it_did_not_open(project, tmp_path):
    """The prompt path box comes filled in (the demo's own prompt file on the demo folder):
    saving must not overwrite an existing file this session did not load or save."""
    from app.ui import AppConfig, Session, _prompt_save_path

    cfg = AppConfig(project.root, project.path, None, tmp_path)
    sess = Session(project, tmp_path)
    theirs = tmp_path / "shipped.json"
    theirs.write_text("{}")
    with pytest.raises(ProjectError, match="already exists"):
        _prompt_save_path(cfg, sess, str(theirs))
    new = tmp_path / "mine.json"
    assert _prompt_save_path(cfg, sess, str(new)) == new.resolve()
    sess.prompt_files.add(theirs.resolve())              # loaded here: saving back is allowed
    assert _prompt_save_path(cfg, sess, str(theirs)) == theirs.resolve()


def test_a_deleted_model_box_does_not_come_back_on_detecting_again(project, engine):
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)
    best = project.visible_boxes()[0]
    project.delete(best.id)                              # Del on a false positive
    assert best.id not in [b.id for b in project.visible_boxes()]
    detect_in_image(project, engine)                     # the model finds it again
    assert all(b.score != best.score for b in project.visible_boxes())
    project.add_box([40, 30, 60, 50])
    manual = project.current.boxes[-1].id
    project.delete(manual)                               # a hand-drawn box is removed outright
    assert manual not in [b.id for b in project.current.boxes]


def test_paging_fast_drops_prefetch_encodes_not_started(project, tmp_path):
    """Each image shown starts a background encode; those still queued when the user has
    already moved on are dropped, so 'detect' does not wait behind a pile of them."""
    import time as _time

    class Slow(FakePredictor):
        def encode_image(self, image, key=None, size=None):
            _time.sleep(0.3)
            return super().encode_image(image, key, size)

    slow = Slow()
    engine = Engine(predictor=slow, preview_dir=tmp_path / "previews")
    futures = [engine.prefetch(project.image_path(i % 3)) for i in range(5)]
    futures[-1].result(timeout=10)
    assert slow.encode_count == 2                        # the one running, and the last
    assert sum(f.cancelled() for f in futures) == 3


def test_import_coco_with_absolute_or_windows_paths_matches_by_file_name(project, tmp_path):
    """COCO files from other tools may name images by absolute or Windows paths."""
    from exports import write_coco

    src = tmp_path / "other-tool.json"
    write_coco(src, [("a.jpg", W, H), ("c.jpg", W, H)], ["cell"],
               [("a.jpg", "cell", (1, 1, 20, 20)), ("c.jpg", "cell", (2, 2, 30, 30))])
    data = json.loads(src.read_text())
    data["images"][0]["file_name"] = "/data/upload/1/a.jpg"
    data["images"][1]["file_name"] = "C:\\labels\\sub\\c.jpg"
    src.write_text(json.dumps(data))
    r = project.import_coco(src)
    assert r["labels"] == 2 and r["unmatched"] == [] and r["images"] == 2
    assert [len(im.boxes) for im in project.images] == [1, 0, 1]


def test_import_coco_matches_a_path_ending_but_never_an_ambiguous_file_name(project, folder, tmp_path):
    """Two images share the name c.jpg: a path that ends with one of their paths picks it (as
    `app.py eval` does); a path that fits neither matches nothing."""
    from exports import write_coco

    (folder / "other").mkdir()
    Image.fromarray(np.full((H, W, 3), 99, np.uint8)).save(folder / "other" / "c.jpg")
    p = Project(folder, project.path)
    src = tmp_path / "other-tool.json"
    write_coco(src, [("sub/c.jpg", W, H), ("elsewhere/c.jpg", W, H)], ["cell"],
               [("sub/c.jpg", "cell", (1, 1, 20, 20)), ("elsewhere/c.jpg", "cell", (2, 2, 30, 30))])
    data = json.loads(src.read_text())
    data["images"][0]["file_name"] = "/mnt/export/imgs/sub/c.jpg"
    src.write_text(json.dumps(data))
    r = p.import_coco(src)
    assert r["unmatched"] == ["elsewhere/c.jpg"] and r["labels"] == 1
    assert {im.file: len(im.boxes) for im in p.images} == {"a.jpg": 0, "b.png": 0, "other/c.jpg": 0,
                                                           "sub/c.jpg": 1}


def test_accept_all_uses_the_threshold_the_slider_shows(project, engine, tmp_path):
    """'Accept all' gets the slider's value with the click: the slider's own change event may
    be handled after it, and the boxes shown are those at the slider's value."""
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    fn = next(f for f in demo.fns.values() if f.fn.__name__ == "on_accept_all")
    assert [getattr(c, "elem_id", None) for c in fn.inputs][1:] == ["tx-threshold"]
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)                     # scores 1 (on the exemplar), 0.5, 0.1
    project.set_threshold(0.3)
    fn.fn(Session(project, tmp_path), 0.6)               # the slider already shows 0.6
    assert [b.score for b in project.current.boxes if b.state == "accepted"] == [1.0]
    assert project.threshold == 0.6


def test_export_lists_the_images_once(project, engine, tmp_path, monkeypatch):
    """The Export button's message and file come from one listing of the folder."""
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    on_export = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "on_export")
    project.add_box([10, 10, 40, 30])
    calls = []
    listing = Project.export_images
    monkeypatch.setattr(Project, "export_images", lambda self, *a: calls.append(a) or listing(self, *a))
    for fmt in ("COCO", "YOLO"):
        calls.clear()
        _, msg = on_export(Session(project, tmp_path), fmt, False)
        assert "3 images, 1 accepted boxes" in msg and len(calls) == 1
        assert "--refiner" not in msg                     # boxes on 1 image: too few to fit the refiner
        assert "No accepted box yet" not in msg
    monkeypatch.setattr("app.ui.REFINER_MIN_IMAGES", 1)
    path, msg = on_export(Session(project, tmp_path), "COCO", False)
    assert f"--labels {Path(path).name} --images {project.root}" in msg
    project.undo()                                        # nothing accepted: the export says so
    for fmt in ("COCO", "YOLO"):
        assert "No accepted box yet" in on_export(Session(project, tmp_path), fmt, False)[1]


def test_search_gallery_opens_the_image_shown_after_images_were_added(project, engine, tmp_path):
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    fns = {f.fn.__name__: f.fn for f in demo.fns.values()}
    sess = Session(project, tmp_path)
    project.add_prompt("box", [5, 5, 25, 15])
    items, _ = fns["on_search"](sess, "cell", True)
    first = items[0][1].split()[-1]                      # caption "score  file"
    src = tmp_path / "0_new.jpg"                         # sorts first: every index shifts
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(src)
    project.add_uploaded([src], subdir="0")
    fns["on_search_pick"](sess, SimpleNamespace(index=0))
    assert project.current.file == first


def test_a_project_file_spoilt_by_another_program_does_not_stop_the_session(project, tmp_path):
    from app.ui import Session, _acquire

    sess = Session(project, tmp_path)
    project.add_class("other")
    project.path.write_text("not json")                  # written over from outside
    assert _acquire(sess)                                # a warning, and the handler runs
    try:
        project.add_box([1, 1, 9, 9])
    finally:
        sess.work.lock.release()
    assert Project(project.root, project.path).class_names == ["cell", "other"]


def test_imported_labels_and_hand_drawn_boxes_mark_the_image_reviewed(project, engine, tmp_path):
    """An image given accepted labels (Import tab, or drawn by hand) is no longer listed as
    untouched: it is reviewed unless boxes above the threshold still wait, as after accepting."""
    from exports import write_coco

    from app.ui import STATUS_ICON, Session, _images_update

    src = tmp_path / "labels.coco.json"
    write_coco(src, [("a.jpg", W, H), ("b.png", W, H)], ["cell"],
               [("a.jpg", "cell", (5, 5, 25, 25)),                # a label only
                ("b.png", "cell", (5, 5, 25, 25)),                # a label and a detection
                ("b.png", "cell", (40, 30, 60, 50), 0.8)])
    project.import_coco(src)
    a, b, c = project.images
    assert (a.status, b.status, c.status) == ("reviewed", "predicted", "untouched")
    choices = _images_update(Session(project, tmp_path), force=True)["choices"]
    assert choices[0][0] == f"{STATUS_ICON['reviewed']} a.jpg"
    assert project.undo() == "import COCO" and project.images[0].status == "untouched"
    project.goto(2)
    project.add_box([10, 10, 40, 30])                    # a label drawn by hand
    assert project.current.status == "reviewed"
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)                     # pending boxes above the threshold
    project.add_box([50, 30, 70, 50])
    assert project.current.status == "predicted"


def test_delete_class_says_what_went_with_it_and_undo_brings_it_back(project, engine, tmp_path):
    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    on_delete = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "on_class_delete")
    project.add_prompt("box", [5, 5, 25, 15])
    detect_in_image(project, engine)                     # 3 pending boxes on a.jpg
    project.accept_all()                                 # 2 above the threshold accepted
    project.goto(1)
    project.add_box([5, 5, 20, 20])                      # and a label on b.png
    project.external_prompts.append({"image": "/elsewhere/x.jpg", "id": 99, "cls": "cell",
                                     "kind": "point", "coords": [3, 3], "negative": False})
    project.set_active_class("cell")
    sess = Session(project, tmp_path)
    message = on_delete(sess)[1]["message"]
    assert message == ("deleted class cell with its 4 boxes (3 accepted) on 2 images and its "
                       "2 prompts: Ctrl+Z brings them back")
    assert not any(im.boxes or im.prompts for im in project.images)
    project.undo()
    assert [len(im.boxes) for im in project.images] == [3, 1, 0]
    assert len(project.external_prompts) == 1


def test_a_tab_shows_another_tabs_saves_on_its_own(project, engine, tmp_path, monkeypatch):
    """The periodic sync: another tab's save shows without an action here; when nothing
    changed it costs a stat call (no read), and it never waits for a busy project."""
    import gradio as gr

    from app.ui import AppConfig, Session, build_app

    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path))
    tick = next(f for f in demo.fns.values() if f.fn.__name__ == "on_sync_tick")
    assert [(type(demo.blocks[i]), e) for i, e in tick.targets] == [(gr.Timer, "tick")]
    project.save()
    sess = Session(project, tmp_path)
    other = Project(project.root, project.path)
    other.add_box([5, 5, 30, 30])                        # saved by the other tab
    out = tick.fn(sess)
    assert out[1]["action"] == "sync" and [b["xyxy"] for b in out[1]["boxes"]] == [[5, 5, 30, 30]]
    reads = []
    monkeypatch.setattr(Project, "_read_saved", lambda self: reads.append(1))
    assert all(o == gr.skip() for o in tick.fn(sess))   # nothing new
    assert reads == []
    other.add_box([40, 30, 60, 50])
    with sess.work.lock:                                 # a handler holds the project
        assert all(o == gr.skip() for o in tick.fn(sess))


def test_engine_loads_the_weights_it_is_given(tmp_path, capsys, monkeypatch):
    """`app.py ui --weights PATH` (e.g. with a box refiner trained on the user's labels): the engine's
    model comes from that file; a missing file is refused before the app starts."""
    model = trex2.TRex2(trex2.ModelConfig(d_model=32, d_ffn=64, image_size=256, score_threshold=0.37,
                                          refine_iters=2)).eval()
    path = tmp_path / "mine.safetensors"
    model.save(str(path))
    engine = Engine(weights=path, preview_dir=tmp_path / "pv")
    p = engine.predictor
    assert p.model.cfg.refine_iters == 2 and p.score_threshold == pytest.approx(0.37)
    assert Engine().weights is None
    monkeypatch.chdir(tmp_path)                                        # a path relative to where the app starts
    assert Engine(weights="mine.safetensors").weights == str(path.resolve())   # (a fit runs elsewhere)
    from app import ui
    assert ui.main(["--images", str(tmp_path), "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "is not a file" in capsys.readouterr().err


def tiny_weights(path: Path) -> Path:
    """An untrained small model (256 px canvas) saved at path: quick to load and to fit a refiner on."""
    trex2.TRex2(trex2.ModelConfig(d_model=32, d_ffn=64, dec_layers=2, num_queries=50,
                                  image_size=256)).eval().save(str(path))
    return path


def test_box_refiner_tab_fits_in_the_background_and_switches_the_model(project, engine, tmp_path,
                                                                        monkeypatch):
    """The Box refiner tab: too few images with accepted boxes is refused with the count; otherwise
    the accepted boxes are exported and a refiner is fitted by a child process (progress in the
    status text) and saved beside the project file; 'Use fitted refiner' switches the shared model
    to it and back. A stopped fit leaves the saved file as it was; a failed one says why."""
    import time as _time

    import gradio as gr

    from app.refiner_job import RefinerJob
    from app.ui import AppConfig, Session, build_app

    start = tmp_path / "start.safetensors"
    tiny_weights(start)
    engine.start_weights = str(start)
    monkeypatch.setattr("app.ui.REFINER_MIN_IMAGES", 2)
    job = RefinerJob(steps=3, extra=("--synthetic", "0", "--batch", "2", "--warmup", "2"))
    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path, refiner=job))
    fn = {f.fn.__name__: f.fn for f in demo.fns.values()}
    sess = Session(project, tmp_path)

    def wait():
        for _ in range(600):
            if not job.running():
                return job.status()
            _time.sleep(0.5)
        raise AssertionError("the fit did not end")

    project.add_box([10, 10, 40, 30])
    msg = fn["on_fit_refiner"](sess)
    assert "Not done" in msg and "accepted boxes on 1 image(s)" in msg and not job.running()
    project.goto(1)
    project.add_box([20, 15, 60, 45])
    msg = fn["on_fit_refiner"](sess)
    assert "Started" in msg and "2 accepted boxes on 2 images" in msg
    assert "being fitted already" in fn["on_fit_refiner"](sess)      # one fit at a time
    with pytest.raises(RuntimeError, match="already being fitted"):
        job.start(tmp_path / "l.json", project.root, tmp_path / "y.safetensors", tmp_path / "y.log")
    st = wait()
    assert st.state == "done", st.text
    assert project.refiner_path.is_file() and "Use fitted refiner" in fn["on_refiner_tick"](sess)
    labels = json.loads(next(tmp_path.glob("refiner-*/labels.coco.json")).read_text())
    assert len(labels["images"]) == 2 and len(labels["annotations"]) == 2   # only images with boxes

    msg = fn["on_use_refiner"](sess)
    assert "now uses the fitted refiner" in msg
    assert engine.weights == str(project.refiner_path) and engine.predictor.model.cfg.refine_iters == 2
    assert "refiner fitted to this folder" in msg
    assert fn["on_refiner_tick"](sess) == gr.skip()                  # the timer sends changes only
    os.utime(project.refiner_path, ns=(1, 1))                          # fitted again since it was loaded
    assert "an earlier fit of this folder's refiner" in fn["on_refiner_tick"](sess)
    fn["on_use_start_weights"](sess)
    assert engine.weights == str(start) and engine.predictor.model.cfg.refine_iters == 0

    saved = project.refiner_path.stat().st_mtime_ns
    job.steps = 10 ** 6                                                # runs until stopped
    try:
        assert "Started" in fn["on_fit_refiner"](sess)
        assert "Stopped the fit" in fn["on_refiner_stop"](sess) and not job.running()
        st = job.status()
        assert st.state == "cancelled" and "no refiner was saved" in st.text
        assert project.refiner_path.stat().st_mtime_ns == saved
        assert "Started" in fn["on_fit_refiner"](sess)
        os.utime(project.refiner_path, ns=(2, 2))                      # as if it saved, then checked
        fn["on_refiner_stop"](sess)
        assert "the fitted refiner was saved, unchecked" in job.status().text
    finally:
        job.cancel()

    job.start(tmp_path / "missing.json", project.root, tmp_path / "x.safetensors", tmp_path / "x.log")
    st = wait()
    assert st.state == "failed" and "missing.json" in st.text and not (tmp_path / "x.safetensors").exists()


def test_box_refiner_is_checked_on_labelled_images_kept_out_of_the_fit(tmp_path, engine, monkeypatch):
    """With enough labelled images, a fifth of those without prompts (at least 2) are kept out of
    the fit; the child labels them with the project's prompts before and after the refiner and
    scores both against their accepted boxes; the result ends the status line."""
    import time as _time

    from app.refiner_job import RefinerJob
    from app.ui import AppConfig, Session, build_app, refiner_split

    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(d / f"{k:02d}.png")
    project = Project(d, tmp_path / "proj" / "many.json")
    project.add_class("cell")
    project.add_class("dust")                                        # never prompted: not checked
    for k in range(12):
        project.goto(k)
        project.add_box([10 + k, 10, 40 + k, 35], cls="cell")
        project.add_box([50, 40, 60, 50], cls="dust")
    monkeypatch.setattr("app.ui.REFINER_MIN_IMAGES", 5)
    listed, _ = project.export_images(with_boxes=True)
    start = tmp_path / "start.safetensors"
    tiny_weights(start)
    engine.start_weights = str(start)
    job = RefinerJob(steps=2, extra=("--synthetic", "0", "--batch", "2", "--warmup", "2"))
    demo = build_app(AppConfig(project.root, project.path, engine, tmp_path, refiner=job))
    fn = {f.fn.__name__: f.fn for f in demo.fns.values()}
    msg = fn["on_fit_refiner"](Session(project, tmp_path))           # no prompt yet: nothing to check with
    assert "24 accepted boxes on 12 images" in msg and "checked" not in msg
    fn["on_refiner_stop"](Session(project, tmp_path))
    project.goto(0)
    project.add_prompt("box", [10, 10, 40, 35], cls="cell")
    fit, check = refiner_split(project, listed)
    assert len(check) == 2 and len(fit) == 10 and "00.png" not in {f for f, _, _ in check}
    monkeypatch.setattr("app.ui.REFINER_MIN_IMAGES", 11)
    assert refiner_split(project, listed) == (listed, [])             # 11 must stay to fit: no check
    monkeypatch.setattr("app.ui.REFINER_MIN_IMAGES", 5)
    monkeypatch.setattr("app.ui.REFINER_MAX_IMAGES", 8)                 # memory cap: 8 of the 10 left
    msg = fn["on_fit_refiner"](Session(project, tmp_path))
    assert "16 accepted boxes on 8 images" in msg and "8 of the 10 images" in msg
    assert "checked on 2 other labelled images" in msg
    for _ in range(600):
        if not job.running():
            break
        _time.sleep(0.5)
    st = job.status()
    assert st.state == "done", st.text
    assert re.search(r"on 2 of your labelled images not used for fitting \(2 boxes\), AP [\d.]+ -> [\d.]+", st.text)
    labels = json.loads(max(tmp_path.glob("refiner-*/labels.coco.json"), key=lambda f: f.stat().st_mtime_ns).read_text())
    assert {im["file_name"] for im in labels["images"]}.isdisjoint(f for f, _, _ in check)
    assert len(labels["images"]) == 8
    # after a restart (no job in this process) the saved refiner comes with its check ...
    again = build_app(AppConfig(project.root, project.path, engine, tmp_path, refiner=RefinerJob()))
    tick = next(f.fn for f in again.fns.values() if f.fn.__name__ == "on_refiner_tick")
    shown = tick(Session(project, tmp_path))
    assert "A refiner fitted to this folder is saved" in shown and "Its check: on 2 of your" in shown
    os.utime(project.refiner_path, ns=(1, 1))                          # ... of that file only
    assert "It was not checked" in tick(Session(project, tmp_path))


def test_refiner_progress_is_read_from_the_fits_log():
    """The Box refiner tab's progress comes from the child's log lines (trex2/train_refiner.py)."""
    from app.refiner_job import progress

    log = ["[12:00:00] refiner views: 40 after labels.coco.json"]
    assert "reading your labelled images (1 min so far)" in progress(log, 3000, 1.2).text
    log.append("[12:00:20] refiner views: synthetic scene 200 of 600")
    st = progress(log, 3000, 2.0)
    assert "synthetic scene 200 of 600" in st.text and st.fraction is None
    log += ["[12:01:00] refiner views: 640 with 600 synthetic scenes",
            "[12:01:30] refiner step 200: reg 0.3 giou 0.2 iou 0.5 (lr 1.0e-03)",
            "[12:02:00] refiner step 400: reg 0.3 giou 0.2 iou 0.5 (lr 1.0e-03)"]
    st = progress(log, 3000, 3.0)
    assert "step 400 of 3000" in st.text and st.fraction == pytest.approx(400 / 3000)
    log.append("[12:09:00] refiner: checking it on the labelled images kept out of the fit")
    assert "now checking it" in progress(log, 3000, 9.0).text
