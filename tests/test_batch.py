"""app.batch (`python app.py label`): end to end on generated folders, resume after SIGKILL, bad files,
per-image vs cross-image prompts, negatives, class-embedding files. Uses the real trex2 model on CPU;
images are small generated scenes of repeated shapes (red discs, blue squares, red squares)."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import trex2
from app import batch

REPO = Path(__file__).resolve().parents[1]
SIZE = 224
N_IMAGES = 8
SHAPES = {"disc": (220, 40, 40), "square": (40, 60, 220), "redsquare": (220, 40, 40)}


def draw_scene(rng, counts: dict, size: int = SIZE):
    """RGB uint8 (size, size, 3) grey scene with counts[shape] copies of each shape (side 22-26 px,
    no overlaps) -> (image, {shape: (N, 4) xyxy boxes})."""
    img = np.full((size, size, 3), 190, np.uint8)
    img += rng.integers(0, 12, img.shape, dtype=np.uint8)
    taken, boxes = [], {k: [] for k in counts}
    for shape, n in counts.items():
        for _ in range(n):
            for _ in range(200):
                s = int(rng.integers(22, 27))
                x, y = (int(v) for v in rng.integers(4, size - s - 4, 2))
                if all(x + s + 6 < a or a + b + 6 < x or y + s + 6 < c or c + b + 6 < y for a, c, b in taken):
                    break
            taken.append((x, y, s))
            if shape == "disc":
                cv2.circle(img, (x + s // 2, y + s // 2), s // 2, SHAPES[shape], -1)
            else:
                cv2.rectangle(img, (x, y), (x + s - 1, y + s - 1), SHAPES[shape], -1)
            boxes[shape].append([x, y, x + s, y + s])
    return img, {k: np.asarray(v, float).reshape(-1, 4) for k, v in boxes.items()}


def save_rgb(path: Path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(img[:, :, ::-1]))


def prompt_file(path: Path, entries, categories=("disc", "square"), texts=None, size=SIZE):
    """Write a prompt file. entries: (image path, category, box xyxy | None, point | None, negative)."""
    images, anns = [], []
    ids = {}
    for img_path, cat, box, point, neg in entries:
        rel = os.path.relpath(img_path, path.parent).replace(os.sep, "/")
        if rel not in ids:
            ids[rel] = len(ids) + 1
            images.append({"id": ids[rel], "file_name": rel, "width": size, "height": size})
        a = {"id": len(anns) + 1, "image_id": ids[rel], "category_id": list(categories).index(cat) + 1}
        if box is not None:
            a["bbox"] = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
        else:
            a["point"] = [float(point[0]), float(point[1])]
        if neg:
            a["negative"] = True
        anns.append(a)
    cats = [{"id": i + 1, "name": c, **({"text": texts[c]} if texts and c in texts else {})}
            for i, c in enumerate(categories)]
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": anns}))
    return str(path)


def iou(a, b):
    """IoU matrix between (N, 4) and (M, 4) xyxy boxes."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and in the CLI subprocesses (--threads 1): on a busy 2-core machine two
    threads are several times slower, and in-process and CLI runs must compute alike."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def predictor():
    return trex2.Predictor(trex2.load_model())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A folder of N_IMAGES scenes (two in a subfolder) with discs and squares, a cross-image prompt
    file on a separate prompt image, and a per-image prompt file with exemplars on images 0 and 1 only."""
    root = tmp_path_factory.mktemp("labelset")
    rng = np.random.default_rng(0)
    truth = {}
    for i in range(N_IMAGES):
        rel = f"{'deep/' if i >= N_IMAGES - 2 else ''}img{i:02d}.png"
        img, boxes = draw_scene(rng, {"disc": 5, "square": 4})
        save_rgb(root / "images" / rel, img)
        truth[rel] = boxes
    img, pboxes = draw_scene(rng, {"disc": 4, "square": 4})
    save_rgb(root / "prompts" / "images" / "p.png", img)
    cross = prompt_file(root / "prompts" / "prompts.json",
                        [(root / "prompts/images/p.png", "disc", b, None, False) for b in pboxes["disc"][:2]]
                        + [(root / "prompts/images/p.png", "square", b, None, False) for b in pboxes["square"][:2]])
    im0, im1 = root / "images/img00.png", root / "images/img01.png"
    per = prompt_file(root / "prompts-per-image.json",
                      [(im0, "disc", b, None, False) for b in truth["img00.png"]["disc"][:2]]
                      + [(im1, "square", b, None, False) for b in truth["img01.png"]["square"][:2]])
    return {"root": root, "images": str(root / "images"), "truth": truth, "cross": cross, "per": per}


@pytest.fixture(scope="module")
def clean_cross(dataset, predictor, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out.json"
    summary = batch.run(dataset["images"], dataset["cross"], str(out), predictor=predictor, progress=False)
    return json.loads(out.read_text()), summary


def load_coco_checked(path):
    """Load with pycocotools and check the DESIGN.md section 3 invariants; returns the JSON dict."""
    from pycocotools.coco import COCO
    data = json.loads(Path(path).read_text())
    coco = COCO(str(path))
    assert len(coco.getImgIds()) == len(data["images"])
    assert [im["id"] for im in data["images"]] == list(range(1, len(data["images"]) + 1))
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))
    names = [im["file_name"] for im in data["images"]]
    assert len(set(names)) == len(names) and all(not n.startswith("/") and "\\" not in n for n in names)
    assert [c["id"] for c in data["categories"]] == list(range(1, len(data["categories"]) + 1))
    for a in data["annotations"]:
        assert a["iscrowd"] == 0 and 0 <= a["score"] <= 1 and a["bbox"][2] > 0 and a["bbox"][3] > 0
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=1e-3)
    assert isinstance(data["info"]["score_threshold"], float)
    return data


def dets_by_image(data, threshold=None):
    """{file_name: {category name: (N, 5) [x1, y1, x2, y2, score]}} from a COCO dict."""
    cat = {c["id"]: c["name"] for c in data["categories"]}
    fn = {im["id"]: im["file_name"] for im in data["images"]}
    out = {f: {} for f in fn.values()}
    for a in data["annotations"]:
        if threshold is None or a["score"] >= threshold:
            x, y, w, h = a["bbox"]
            out[fn[a["image_id"]]].setdefault(cat[a["category_id"]], []).append([x, y, x + w, y + h, a["score"]])
    return {f: {c: np.asarray(v) for c, v in d.items()} for f, d in out.items()}


def top_k_precision(found, truth, thr=0.5):
    """Of the k = len(truth) best-scoring detections (N, 5), the fraction on a true object (IoU >= thr).
    Ranking-based, so it does not depend on the model's threshold calibration."""
    if found is None or not len(found):
        return 0.0
    top = found[np.argsort(-found[:, 4])[: len(truth)], :4]
    return float((iou(top, truth).max(1) >= thr).sum() / len(truth))


# ----------------------------------------------------------------------------------------- tests
def test_cross_image_finds_the_prompted_shapes(dataset, clean_cross, predictor):
    data, summary = clean_cross
    assert summary["images"] == N_IMAGES and summary["skipped"] == []
    assert sorted(im["file_name"] for im in data["images"]) == sorted(dataset["truth"])
    assert [c["name"] for c in data["categories"]] == ["disc", "square"]
    assert data["info"]["score_threshold"] == pytest.approx(predictor.score_threshold)
    found = dets_by_image(data)
    assert all(set(found[f]) == {"disc", "square"} for f in found)
    # discs drawn on the separate prompt image are found on every image of the folder
    prec = [top_k_precision(found[f]["disc"], dataset["truth"][f]["disc"]) for f in found]
    assert np.mean(prec) >= 0.6, prec


def test_cli_end_to_end_with_bad_files(dataset, tmp_path):
    folder = tmp_path / "mixed"
    for rel in ("img00.png", "deep/img06.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes((Path(dataset["images"]) / rel).read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    good = (Path(dataset["images"]) / "img01.png").read_bytes()
    (folder / "deep" / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "readme.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out" / "labels.json"
    out.parent.mkdir()
    p = subprocess.run([sys.executable, "app.py", "label", str(folder), "--prompts", dataset["cross"],
                        "--out", str(out), "--score-threshold", "0.4", "--threads", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for bad in ("empty.jpg", "notes.png", "truncated.png"):
        assert bad in p.stderr
    assert "skipped 3 unreadable" in p.stderr and "Traceback" not in p.stderr
    data = load_coco_checked(out)
    assert sorted(im["file_name"] for im in data["images"]) == ["deep/img06.png", "img00.png"]
    assert data["info"]["score_threshold"] == 0.4
    assert not Path(str(out) + batch.SIDECAR_SUFFIX).exists()
    assert list(out.parent.iterdir()) == [out]  # no temp files left behind

    # a folder with nothing readable: non-zero exit, clear message, no empty COCO file over an older one
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "empty.jpg").write_bytes(b"")
    older = tmp_path / "x.json"
    older.write_text("labels of an earlier run")
    p = subprocess.run([sys.executable, "app.py", "label", str(only_bad), "--prompts", dataset["cross"],
                        "--out", str(older), "--threads", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "no image could be read" in p.stderr and "Traceback" not in p.stderr
    assert "not written" in p.stderr and "wrote" not in p.stderr
    assert older.read_text() == "labels of an earlier run"
    assert not Path(str(older) + batch.SIDECAR_SUFFIX).exists()


def test_bad_arguments_give_clear_errors(dataset, tmp_path, capsys):
    out = str(tmp_path / "o.json")
    cases = [
        ([str(tmp_path / "nope"), "--prompts", dataset["cross"], "--out", out], "image folder not found"),
        ([dataset["images"], "--prompts", str(tmp_path / "missing.json"), "--out", out], "prompts file not found"),
        ([dataset["images"], "--prompts", dataset["cross"], "--out", str(tmp_path / "no" / "dir.json")],
         "output folder does not exist"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    cases.append(([dataset["images"], "--prompts", str(broken), "--out", out], "broken.json"))
    negonly = prompt_file(tmp_path / "negonly.json", [(Path(dataset["images"]) / "img00.png", "disc",
                                                       [0, 0, 20, 20], None, True)], categories=("disc",))
    cases.append(([dataset["images"], "--prompts", negonly, "--out", out], "no positive exemplar"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cases.append(([str(empty), "--prompts", dataset["cross"], "--out", out], "no image files"))
    cases.append(([dataset["images"], "--prompts", dataset["cross"], "--out", out, "--per-image"],
                  "none of the"))
    for argv, message in cases:
        assert batch.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not Path(out).exists()


def _kill_after(cmd, sidecar: Path, n_done: int, timeout=240):
    """Start cmd, SIGKILL it once the sidecar holds n_done image records."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if sidecar.exists() and sidecar.read_bytes().count(b"\n") >= 1 + n_done:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"label ended before it could be killed: {proc.stderr.read().decode()}")
            time.sleep(0.02)
        else:
            pytest.fail("label made no progress")
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def _content(data):
    info = {k: v for k, v in data["info"].items() if k != "date_created"}
    return {**data, "info": info}


def test_resume_after_sigkill_matches_clean_run(dataset, clean_cross, predictor, tmp_path):
    out = tmp_path / "resumed.json"
    sidecar = Path(str(out) + batch.SIDECAR_SUFFIX)
    cmd = [sys.executable, "app.py", "label", dataset["images"], "--prompts", dataset["cross"], "--out", str(out),
           "--threads", "1", "--no-flip"]
    _kill_after(cmd, sidecar, n_done=3)
    assert not out.exists() and sidecar.exists()
    header, records, _ = batch.read_sidecar(str(sidecar))
    assert 3 <= len(records) < N_IMAGES
    with open(sidecar, "ab") as f:  # a torn last line, as if killed in the middle of a write
        f.write(b'{"file_name": "img07.png", "width": 224, "he')

    # without --resume the unfinished run is not clobbered
    assert batch.main([dataset["images"], "--prompts", dataset["cross"], "--out", str(out), "--quiet"]) == 2
    # different prompts are refused
    other = prompt_file(tmp_path / "other.json", [(Path(dataset["images"]) / "img00.png", "disc",
                                                   dataset["truth"]["img00.png"]["disc"][0], None, False)],
                        categories=("disc",))
    with pytest.raises(batch.LabelError, match="different prompts_sha256"):
        batch.run(dataset["images"], other, str(out), resume=True, predictor=predictor, progress=False)
    with pytest.raises(batch.LabelError, match="different flip"):   # nor a run with flip TTA
        batch.run(dataset["images"], dataset["cross"], str(out), resume=True, progress=False,
                  predictor=trex2.Predictor(predictor.model, flip=True))

    fresh = trex2.Predictor(predictor.model)  # empty cache: counts what the resumed run encodes
    batch.run(dataset["images"], dataset["cross"], str(out), resume=True, predictor=fresh, progress=False)
    assert fresh.encode_count == (N_IMAGES - len(records)) + 1  # the rest + the one prompt image
    assert not sidecar.exists()
    resumed = load_coco_checked(out)
    assert _content(resumed) == _content(clean_cross[0])


def test_resume_without_progress_file_starts_over(dataset, predictor, tmp_path):
    out = tmp_path / "o.json"
    s = batch.run(dataset["images"], dataset["cross"], str(out), resume=True, predictor=predictor, progress=False,
                  warn=lambda m: None)
    assert s["images"] == N_IMAGES


def test_per_image_uses_only_each_images_exemplars(dataset, clean_cross, predictor, tmp_path):
    out = tmp_path / "per.json"
    batch.run(dataset["images"], dataset["per"], str(out), per_image=True, predictor=predictor, progress=False)
    data = load_coco_checked(out)
    assert len(data["images"]) == N_IMAGES  # every image listed, prompted or not
    per = dets_by_image(data)
    # image 0 has only disc exemplars, image 1 only square exemplars, the others none
    assert set(per["img00.png"]) == {"disc"} and set(per["img01.png"]) == {"square"}
    assert all(not per[f] for f in per if f not in ("img00.png", "img01.png"))
    assert top_k_precision(per["img00.png"]["disc"], dataset["truth"]["img00.png"]["disc"]) >= 0.6
    # cross-image: both categories on every image, including those without exemplars
    cross = dets_by_image(clean_cross[0])
    assert sum(set(cross[f]) == {"disc", "square"} for f in cross) >= N_IMAGES - 1


def test_exemplar_objects_get_the_drawn_box_once(dataset, predictor, tmp_path):
    """On a prompted image each exemplar is in the output as drawn, with score 1, and no other box
    of its class overlaps an exemplar by IoU > 0.35 (trex2.predictor.respect_exemplars)."""
    from trex2.box_ops import box_iou
    out = tmp_path / "per.json"
    batch.run(dataset["images"], dataset["per"], str(out), per_image=True, predictor=predictor, progress=False)
    discs = dets_by_image(load_coco_checked(out))["img00.png"]["disc"]
    drawn = np.asarray(dataset["truth"]["img00.png"]["disc"][:2], np.float32)
    overlap = box_iou(torch.as_tensor(discs[:, :4], dtype=torch.float32), torch.as_tensor(drawn))[0].numpy()
    assert (overlap.max(0) > 0.999).all()                 # each drawn box is in the output as drawn
    assert discs[overlap.argmax(0), 4].tolist() == [1.0, 1.0]
    assert ((overlap > 0.35).sum(0) == 1).all()           # and nothing else of its class on it


def test_prompt_file_exemplar_boxes_by_image(dataset, tmp_path):
    """PromptSource.exemplar_boxes: the positive and negative boxes drawn on each file, by class
    (points are not boxes), looked up by any path to the file."""
    im0, im1 = Path(dataset["images"]) / "img00.png", Path(dataset["images"]) / "img01.png"
    path = prompt_file(tmp_path / "p.json", [(im0, "disc", (1, 2, 11, 12), None, False),
                                             (im0, "square", (5, 5, 9, 9), None, True),
                                             (im0, "disc", None, (3, 3), False),
                                             (im1, "square", (0, 0, 4, 4), None, False)])
    lookup = batch.PromptSource.load(path).exemplar_boxes()
    pos, neg = lookup(str(im0.parent / "." / im0.name))
    assert {k: v.tolist() for k, v in pos.items()} == {"disc": [[1, 2, 11, 12]]}
    assert {k: v.tolist() for k, v in neg.items()} == {"square": [[5, 5, 9, 9]]}
    assert {k: v.tolist() for k, v in lookup(str(im1))[0].items()} == {"square": [[0, 0, 4, 4]]}
    assert lookup(str(Path(dataset["images"]) / "img02.png")) == ({}, {})


def test_negative_exemplar_suppresses_look_alikes(predictor, tmp_path):
    rng = np.random.default_rng(5)
    img, truth = draw_scene(rng, {"disc": 5, "redsquare": 5})
    path = tmp_path / "images" / "scene.png"
    save_rgb(path, img)
    pos = [(path, "disc", b, None, False) for b in truth["disc"][:2]]
    neg = [(path, "disc", b, None, True) for b in truth["redsquare"][:2]]
    scores = {}
    for name, entries in (("plain", pos), ("negative", pos + neg)):
        pf = prompt_file(tmp_path / f"{name}.json", entries, categories=("disc",))
        out = tmp_path / f"{name}_out.json"
        batch.run(str(tmp_path / "images"), pf, str(out), predictor=predictor, progress=False)
        d = dets_by_image(json.loads(out.read_text()))["scene.png"].get("disc", np.zeros((0, 5)))
        # best score of a detection on each true red square / disc (0 if none)
        scores[name] = {k: np.array([max([s for *b, s in d if iou(t, b)[0, 0] >= 0.5], default=0.0)
                                     for t in truth[k]]) for k in ("disc", "redsquare")}
    plain, negative = scores["plain"], scores["negative"]
    # the look-alikes' best scores drop clearly, and no more of them pass the threshold than before
    assert negative["redsquare"].mean() < 0.8 * plain["redsquare"].mean(), scores
    thr = predictor.score_threshold
    assert (negative["redsquare"] >= thr).sum() <= (plain["redsquare"] >= thr).sum()
    # relative to the discs they lose at least as much
    ratio = {k: negative[k].mean() / max(plain[k].mean(), 1e-6) for k in plain}
    assert ratio["redsquare"] <= ratio["disc"] + 0.05, ratio


def test_points_and_class_embedding_file(dataset, clean_cross, predictor, tmp_path):
    # a class drawn once, saved as class embeddings, labels the folder without the prompt images
    src = batch.PromptSource.load(dataset["cross"])
    emb_file = tmp_path / "classes.safetensors"
    trex2.save_class_embeddings(str(emb_file), src.cross_image_classes(predictor))
    out = tmp_path / "from_embeddings.json"
    assert batch.main([dataset["images"], "--prompts", str(emb_file), "--out", str(out), "--quiet", "--no-flip"]) == 0
    assert _content(json.loads(out.read_text()))["annotations"] == clean_cross[0]["annotations"]
    assert json.loads(out.read_text())["info"]["flip"] is False
    # by default the CLI also looks at each image mirrored (flip TTA): other, fused boxes
    flipped = tmp_path / "flipped.json"
    assert batch.main([dataset["images"], "--prompts", str(emb_file), "--out", str(flipped), "--quiet"]) == 0
    got = json.loads(flipped.read_text())
    assert got["info"]["flip"] is True and got["annotations"] != clean_cross[0]["annotations"]
    # the saved classes pick the canvas of each image as their prompt file does
    from_file = batch.PromptSource.load(str(emb_file)).class_sides()[0]
    assert from_file == pytest.approx(src.class_sides()[0], rel=1e-3) and None not in from_file.values()
    plain = tmp_path / "classes.bin"  # detected by content, not only by extension
    plain.write_bytes(emb_file.read_bytes())
    assert batch.PromptSource.load(str(plain)).kind == "embeddings"
    with pytest.raises(batch.LabelError, match="--per-image needs"):
        batch.run(dataset["images"], str(emb_file), str(tmp_path / "x.json"), per_image=True, predictor=predictor)

    # point prompts (centres of two discs) find discs too
    p = Path(dataset["images"]) / "img02.png"
    centres = dataset["truth"]["img02.png"]["disc"][:2]
    pts = prompt_file(tmp_path / "points.json", [(p, "disc", None, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), False)
                                                 for b in centres], categories=("disc",))
    out = tmp_path / "points_out.json"
    batch.run(dataset["images"], pts, str(out), per_image=True, predictor=predictor, progress=False,
              warn=lambda m: None)
    found = dets_by_image(load_coco_checked(out))["img02.png"].get("disc")
    assert top_k_precision(found, dataset["truth"]["img02.png"]["disc"]) >= 0.6


def test_text_prompt_without_text_encoder_is_a_clear_error(dataset, predictor, tmp_path, monkeypatch):
    def unavailable(*a, **k):
        raise trex2.TextEncoderUnavailable("no CLIP checkpoint: set TREX2_CLIP_DIR")
    monkeypatch.setattr(predictor, "embed_prompts", unavailable)
    pf = prompt_file(tmp_path / "text.json", [], categories=("disc",), texts={"disc": "a red disc"})
    with pytest.raises(batch.LabelError, match="text prompt 'a red disc'.*TREX2_CLIP_DIR"):
        batch.run(dataset["images"], pf, str(tmp_path / "o.json"), predictor=predictor, progress=False)


def test_ignore_text_detects_with_the_exemplars_alone(dataset, clean_cross, predictor, tmp_path, monkeypatch):
    """A prompt file whose category has exemplars and a text prompt: without a CLIP model the run
    stops and names --ignore-text; with it, the detections are those of the exemplars alone."""
    monkeypatch.delenv("TREX2_CLIP_DIR", raising=False)
    src = json.loads(Path(dataset["cross"]).read_text())
    src["categories"][0]["text"] = "a red disc"
    pf = Path(dataset["cross"]).with_name("with_text.json")
    pf.write_text(json.dumps(src))
    with pytest.raises(batch.LabelError, match="text prompt 'a red disc'.*--ignore-text"):
        batch.run(dataset["images"], str(pf), str(tmp_path / "o.json"), predictor=predictor, progress=False)
    # --per-image embeds image by image: it stops before the first image, leaving no progress file
    per = json.loads(Path(dataset["per"]).read_text())
    per["categories"][0]["text"] = "a red disc"
    pf_per = Path(dataset["per"]).with_name("per_with_text.json")
    pf_per.write_text(json.dumps(per))
    with pytest.raises(batch.LabelError, match="text prompt 'a red disc'.*--ignore-text"):
        batch.run(dataset["images"], str(pf_per), str(tmp_path / "p.json"), per_image=True, predictor=predictor,
                  progress=False, warn=lambda m: None)
    assert not os.path.exists(batch.sidecar_path(str(tmp_path / "p.json")))
    out = tmp_path / "ignored.json"
    batch.run(dataset["images"], str(pf), str(out), predictor=predictor, progress=False, ignore_text=True)
    assert json.loads(out.read_text())["annotations"] == clean_cross[0]["annotations"]
    # a category with only a text prompt has nothing left to detect with
    src["annotations"] = [a for a in src["annotations"] if a["category_id"] != 1]
    pf.write_text(json.dumps(src))
    with pytest.raises(batch.LabelError, match="'disc' has no positive exemplar.*ignored: --ignore-text"):
        batch.run(dataset["images"], str(pf), str(tmp_path / "o2.json"), predictor=predictor, progress=False,
                  ignore_text=True)


def test_label_folder_generator_progress_and_cancel(dataset, predictor):
    classes = batch.PromptSource.load(dataset["cross"]).cross_image_classes(predictor)
    names = sorted(dataset["truth"])
    seen = []
    results = list(batch.label_folder(predictor, dataset["images"], names + ["missing.png"], classes,
                                      on_progress=lambda d, t: seen.append((d, t))))
    assert [r.file_name for r in results] == names + ["missing.png"]
    assert results[-1].error and "missing.png" in results[-1].error and results[0].size == (SIZE, SIZE)
    assert seen[-1] == (len(names) + 1, len(names) + 1)
    gen = batch.label_folder(predictor, dataset["images"], names, classes, should_cancel=lambda: len(seen2) >= 2)
    seen2 = []
    for r in gen:
        seen2.append(r)
    assert len(seen2) == 2


def test_label_folder_does_not_decode_images_already_encoded(dataset, predictor, monkeypatch):
    classes = batch.PromptSource.load(dataset["cross"]).cross_image_classes(predictor)
    names = sorted(dataset["truth"])[:3]
    first = list(batch.label_folder(predictor, dataset["images"], names, classes))
    decoded = []
    real = batch.load_image
    monkeypatch.setattr(batch, "load_image", lambda p: decoded.append(p) or real(p))
    again = list(batch.label_folder(predictor, dataset["images"], names, classes))
    assert decoded == [] and [r.size for r in again] == [r.size for r in first] == [(SIZE, SIZE)] * 3
    assert all(np.array_equal(a.detections.xyxy, b.detections.xyxy) for a, b in zip(first, again))
    predictor.cache.clear()
    list(batch.label_folder(predictor, dataset["images"], names, classes))
    assert len(decoded) == 3


class Recording:
    """A predictor wrapper that records the canvas size of every encode_image call in ``sizes``."""

    def __init__(self, inner, sizes: list):
        self.inner, self.model, self.sizes = inner, inner.model, sizes

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image(self, image, key=None, size=None):
        self.sizes.append(size)
        return self.inner.encode_image(image, key=key, size=size)


def test_canvas_auto_enlarges_small_exemplars(dataset, predictor, tmp_path):
    """--canvas auto keeps the model's 640 px for ordinary exemplars (the shapes here become ~70 px)
    and encodes at a larger canvas when the exemplars would be tiny; a fixed --canvas is honoured
    everywhere and recorded in info; a bad value is a clear error."""
    sizes = []
    rec = Recording(predictor, sizes)
    batch.run(dataset["images"], dataset["cross"], str(tmp_path / "a.json"), predictor=rec, progress=False)
    assert set(sizes) == {640}
    # the same file with 6 px exemplars: 44 px in the canvas needs 44 * 224 / 6 = 1643 -> 1664 px
    src = json.loads(Path(dataset["cross"]).read_text())
    for a in src["annotations"]:
        a["bbox"] = [a["bbox"][0], a["bbox"][1], 6.0, 6.0]
    small = Path(dataset["cross"]).with_name("small.json")
    small.write_text(json.dumps(src))
    sizes.clear()
    out = tmp_path / "b.json"
    # without the second look: the shapes found are far larger than these 6 px "exemplars", which
    # would send each image to a second canvas (test_second_look_at_the_exemplars_scale)
    batch.run(dataset["images"], str(small), str(out), predictor=rec, progress=False, rescale=False)
    assert set(sizes) == {1664}
    assert json.loads(out.read_text())["info"]["canvas"] == "auto"
    assert json.loads(out.read_text())["info"]["rescale"] is False
    sizes.clear()
    batch.run(dataset["images"], str(small), str(tmp_path / "c.json"), predictor=rec, progress=False, canvas="640")
    assert set(sizes) == {640}
    # --per-image: each image by its own exemplars (6 px on img00 only; the rest stay at 640)
    per = json.loads(Path(dataset["per"]).read_text())
    first = min(i["id"] for i in per["images"] if i["file_name"].endswith("img00.png"))
    for a in per["annotations"]:
        if a["image_id"] == first:
            a["bbox"] = [a["bbox"][0], a["bbox"][1], 6.0, 6.0]
    small_per = Path(dataset["per"]).with_name("small-per.json")
    small_per.write_text(json.dumps(per))
    sizes.clear()
    predictor.cache.clear()               # label skips the encode of an image already cached
    batch.run(dataset["images"], str(small_per), str(tmp_path / "e.json"), predictor=rec, progress=False,
              per_image=True)
    prompted = len({a["image_id"] for a in per["annotations"]})   # the others are not even encoded
    assert 1 < prompted < N_IMAGES and sorted(sizes) == [640] * (prompted - 1) + [1664]
    with pytest.raises(batch.LabelError, match="--canvas"):
        batch.run(dataset["images"], str(small), str(tmp_path / "d.json"), predictor=rec, progress=False,
                  canvas="100")
    # the API also takes a policy (abs_path, (H, W)) -> px, applied to every image it encodes
    seen = []
    sizes.clear()
    out = tmp_path / "f.json"
    batch.run(dataset["images"], str(small), str(out), predictor=rec, progress=False, rescale=False,
              canvas=lambda path, hw: seen.append(os.path.isabs(path)) or 320)
    assert set(sizes) == {320} and len(seen) == len(sizes) and all(seen)
    assert json.loads(out.read_text())["info"]["canvas"] == "custom"


def test_tiled_detection_finds_each_small_object_once(predictor):
    """Small-object mode end to end with the shipped model: 40 discs of 14-17 px in a 960 px image.
    canvas_size asks for tiles (44 px objects); every disc is found once, with no duplicates from
    the tiles' overlaps."""
    from trex2.predictor import TiledEmbedding, canvas_size, object_side
    rng = np.random.default_rng(0)
    S = 960
    img = np.full((S, S, 3), 190, np.uint8)
    img += rng.integers(0, 12, img.shape, dtype=np.uint8)
    boxes = []
    while len(boxes) < 40:
        s = int(rng.integers(14, 18))
        x, y = (int(v) for v in rng.integers(4, S - s - 4, 2))
        if all(abs(x - a) > 30 or abs(y - b) > 30 for a, b, _, _ in boxes):
            cv2.circle(img, (x + s // 2, y + s // 2), s // 2, SHAPES["disc"], -1)
            boxes.append([x, y, x + s, y + s])
    size = canvas_size(img.shape[:2], object_side(boxes[:3]), predictor.model.cfg.image_size)
    assert size == 2816                                    # 44 * 960 / 15 px, a multiple of 32
    emb = predictor.encode_image(img, size=size)
    assert isinstance(emb, TiledEmbedding) and len(emb.tiles) >= 9
    dets = predictor.detect(emb, {"disc": predictor.embed_prompts([(emb, np.asarray(boxes[:3], float))])},
                            score_threshold=predictor.score_threshold)
    good = dets.xyxy[dets.confidence >= predictor.score_threshold]
    m = iou(boxes, good)
    assert (m.max(1) >= 0.5).mean() >= 0.95, "a disc was missed"
    assert len(good) <= 42 and (m.max(0) >= 0.5).mean() >= 0.95, "duplicates or false positives"


def test_each_class_is_detected_at_its_own_canvas(predictor, tmp_path):
    """--canvas auto with a tiny class and a large one in one prompt file: the tiny discs are found
    on the tiles of an enlarged canvas, the large squares at 640 px in one piece (tiles of the
    enlarged canvas would cut them up); each image is encoded once per canvas."""
    rng = np.random.default_rng(1)
    S = 960
    img = np.full((S, S, 3), 190, np.uint8)
    img += rng.integers(0, 12, img.shape, dtype=np.uint8)
    squares = [[40, 40, 160, 160], [600, 60, 730, 185], [80, 580, 205, 700]]
    for x0, y0, x1, y1 in squares:
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), SHAPES["square"], -1)
    discs = []
    while len(discs) < 30:
        s = int(rng.integers(14, 18))
        x, y = (int(v) for v in rng.integers(4, S - s - 4, 2))
        clear = all(x + s + 8 < a or c + 8 < x or y + s + 8 < b or d + 8 < y for a, b, c, d in squares + discs)
        if clear:
            cv2.circle(img, (x + s // 2, y + s // 2), s // 2, SHAPES["disc"], -1)
            discs.append([x, y, x + s, y + s])
    save_rgb(tmp_path / "imgs" / "mixed.png", img)
    prompts = prompt_file(tmp_path / "p.json", [(tmp_path / "imgs" / "mixed.png", "disc", b, None, False)
                                                for b in discs[:3]]
                          + [(tmp_path / "imgs" / "mixed.png", "square", squares[0], None, False)], size=S)
    sizes = []
    out = tmp_path / "o.json"
    roomy = trex2.Predictor(predictor.model, cache_size=64)   # holds the 36 tiles and the 640 px encode
    batch.run(str(tmp_path / "imgs"), prompts, str(out), predictor=Recording(roomy, sizes), progress=False)
    from trex2.predictor import canvas_size, object_side
    tiny = canvas_size((S, S), object_side(discs[:3]), 640)   # 44 px discs: 2,656 px
    assert sorted(sizes) == [640, tiny]   # the prompt image is the folder's: each canvas encoded once
    data = json.loads(out.read_text())
    thr = data["info"]["score_threshold"]
    by_score = lambda c: sorted((a for a in data["annotations"] if a["category_id"] == c),  # noqa: E731
                                key=lambda a: -a["score"])
    xyxy = lambda anns: np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)  # noqa: E731
    top = by_score(2)[:3]   # at the tiled canvas no square scores above 0.1 and the top boxes are bits
    assert (iou(squares, xyxy(top)).max(1) >= 0.85).all(), top
    found = [a for a in by_score(1) if a["score"] >= thr]
    m = iou(discs, xyxy(found))
    assert (m.max(1) >= 0.5).mean() >= 0.9 and len(found) <= 33


def test_label_folder_makes_classes_on_different_canvases_compete_once(tmp_path):
    """Classes detected at different canvases compete after the merge, exactly once."""
    import supervision as sv

    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64, 3), 128, np.uint8))

    class Fake:
        calls = []

        def cached(self, key, size=None):
            return None

        def encode_image(self, image, key=None, size=None):
            return size

        def detect(self, emb, classes, score_threshold=None, compete=True):
            self.calls.append(compete)
            name = next(iter(classes))
            score = {"a": 0.8, "b": 0.6}[name]
            return sv.Detections(xyxy=np.array([[10, 10, 30, 30]], np.float32),
                                 confidence=np.array([score], np.float32), class_id=np.array([0]),
                                 data={"class_name": np.array([name], dtype=object)})

    one, = batch.label_folder(Fake(), str(tmp_path), ["a.png"], {"a": None, "b": None},
                              canvas=lambda path, hw: {640: ["a"], 1280: ["b"]}, rescale=False)
    assert Fake.calls == [False, False]
    assert dict(zip(one.detections.data["class_name"], one.detections.confidence.tolist())) == \
        pytest.approx({"a": 0.8, "b": 0.3})


# ------------------------------------------------------------------ bad input found by the s6 audit
def _copy_images(dataset, folder: Path, names=("img00.png", "img01.png")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes((Path(dataset["images"]) / n).read_bytes())
    return folder


def test_prompts_must_be_in_the_displayed_frame_of_the_file(predictor, tmp_path):
    """An EXIF-rotated prompt image: prompts in the displayed frame land on the object drawn; a prompt
    file recording another size (the stored frame, or another version of the file) is refused before
    any work, naming the file and both sizes (it used to run with the boxes on the wrong pixels)."""
    from PIL import Image
    img, boxes = draw_scene(np.random.default_rng(5), {"disc": 4})
    shown = Image.fromarray(img[:, :160])                      # 160 x 224 as displayed
    boxes = boxes["disc"][boxes["disc"][:, 2] <= 160]
    assert len(boxes) >= 2
    exif = Image.Exif()
    exif[0x0112] = 6                                           # viewers rotate the stored pixels 90 deg
    folder = tmp_path / "photos"
    folder.mkdir()
    shown.transpose(Image.Transpose.ROTATE_90).save(folder / "rot.png", exif=exif.tobytes())

    def prompts(name, w, h, drawn):
        anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                for k, b in enumerate(drawn)]
        path = tmp_path / name
        path.write_text(json.dumps({"images": [{"id": 1, "file_name": "photos/rot.png", "width": w, "height": h}],
                                    "categories": [{"id": 1, "name": "disc"}], "annotations": anns}))
        return str(path)

    out = tmp_path / "o.json"
    batch.run(str(folder), prompts("shown.json", 160, 224, boxes[:1]), str(out), per_image=True,
              predictor=predictor, progress=False, warn=lambda m: None)
    found = dets_by_image(load_coco_checked(out))["rot.png"]["disc"]
    assert iou(found[np.argmax(found[:, 4]), :4], boxes).max() > 0.7   # the top box is a disc, as displayed
    stored = [[b[1], 160 - b[2], b[3], 160 - b[0]] for b in boxes[:1]]  # the same disc in stored pixels
    for per_image in (False, True):
        with pytest.raises(batch.LabelError, match=r"rot.png is 160x224 pixels as displayed.*records 224x160"):
            batch.run(str(folder), prompts("stored.json", 224, 160, stored), str(tmp_path / "x.json"),
                      per_image=per_image, predictor=predictor, progress=False, warn=lambda m: None)
    assert not (tmp_path / ("x.json" + batch.SIDECAR_SUFFIX)).exists()


def test_objects_too_small_even_at_the_largest_canvas_are_warned_about_once():
    from types import SimpleNamespace
    told = []
    source = SimpleNamespace(class_sides=lambda: ({"dot": 5.0, "cell": 100.0}, {}))
    policy = batch.canvas_policy(source, False, "auto", 640, told.append)
    for _ in range(2):
        assert policy("a.jpg", (9000, 12000))                # still detected, at the largest canvas
    assert len(told) == 1 and "'dot'" in told[0] and "expect misses" in told[0]   # once, and not 'cell'
    batch.canvas_policy(source, False, "auto", 640, told.append)("small.jpg", (480, 640))
    assert len(told) == 1                                 # on small images the model sees them


def test_bad_out_is_refused_before_any_work(dataset, predictor, tmp_path, monkeypatch, capsys):
    """--out naming a folder, the prompt file, an image, or a folder that takes no new file is a clear
    error up front (a folder used to end the whole run in an IsADirectoryError traceback; the prompt
    file or an image was overwritten by the output)."""
    folder = _copy_images(dataset, tmp_path / "imgs", ("img00.png",))
    assert batch.main([str(folder), "--prompts", dataset["cross"], "--out", str(folder), "--quiet"]) == 2
    assert f"--out {folder} is a folder" in capsys.readouterr().err
    prompts = Path(dataset["cross"]).read_bytes()
    copy = Path(dataset["cross"]).with_name("copy-for-the-out-test.json")   # beside it: same prompt image
    copy.write_bytes(prompts)
    try:
        for out, what in ((copy, "would overwrite the prompt file"), (folder / "img00.png", "image file's")):
            assert batch.main([str(folder), "--prompts", str(copy), "--out", str(out), "--quiet"]) == 2
            assert what in capsys.readouterr().err
        assert copy.read_bytes() == prompts
    finally:
        copy.unlink()

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")
    import exports._io
    monkeypatch.setattr(exports._io.tempfile, "mkstemp", refused)
    with pytest.raises(batch.LabelError, match="cannot write to the output folder .*Permission denied"):
        batch.run(str(folder), dataset["cross"], str(tmp_path / "o.json"), predictor=predictor, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


def test_score_threshold_outside_0_1_is_refused_up_front(dataset, predictor, tmp_path, capsys):
    """--score-threshold nan or inf failed only when writing OUT.json after the whole run; 2 or -1 were
    recorded as they were. eval counted nothing at nan, and scored AP 0 at --max-dets 0."""
    from app import evaluate
    out = str(tmp_path / "o.json")
    for t in ("nan", "inf", "2", "-0.5", "x"):
        with pytest.raises(SystemExit) as e:
            batch.main([dataset["images"], "--prompts", dataset["cross"], "--out", out, "--score-threshold", t])
        assert e.value.code == 2 and "from 0 to 1" in capsys.readouterr().err
    with pytest.raises(batch.LabelError, match="from 0 to 1"):
        batch.run(dataset["images"], dataset["cross"], out, score_threshold=float("nan"), predictor=predictor)
    assert not os.path.exists(out + batch.SIDECAR_SUFFIX)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_eval_gt()))
    for option in (["--score-threshold", "nan"], ["--max-dets", "0"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main([str(gt), str(gt), *option])
        assert e.value.code == 2 and option[0] in capsys.readouterr().err


def test_file_names_a_coco_file_cannot_hold_are_skipped_with_a_warning(dataset, predictor, tmp_path):
    """A backslash or non-UTF-8 bytes in a file name (legal on Linux) used to crash the final COCO write
    after every image was labelled; such files are now skipped up front, each named in a warning."""
    folder = _copy_images(dataset, tmp_path / "imgs", ("img00.png",))
    data = (folder / "img00.png").read_bytes()
    (folder / "a\\b.png").write_bytes(data)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:   # Latin-1 name
        f.write(data)
    out, warnings = tmp_path / "o.json", []
    s = batch.run(str(folder), dataset["cross"], str(out), predictor=predictor, progress=False,
                  warn=warnings.append)
    assert s["images"] == 1 and [im["file_name"] for im in load_coco_checked(out)["images"]] == ["img00.png"]
    assert len(warnings) == 2 and "a\\\\b.png" in warnings[0] and "backslash" in warnings[0]
    assert "caf\\udce9.png" in warnings[1] and "UTF-8" in warnings[1]


def test_failed_final_write_keeps_progress_and_resume_finishes_it(dataset, predictor, tmp_path, monkeypatch):
    """A failure writing OUT.json (disk full) is a clear error that keeps the progress file; --resume
    then refuses other weights, redoes the image that could not be read before (fixed since) and the
    one replaced since, and not the others."""
    import exports.coco
    folder = _copy_images(dataset, tmp_path / "imgs")
    late = (Path(dataset["images"]) / "img02.png").read_bytes()
    (folder / "late.png").write_bytes(late[: len(late) // 3])          # still being copied
    out = tmp_path / "o.json"
    sidecar = Path(str(out) + batch.SIDECAR_SUFFIX)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(exports.coco, "atomic_write_json", disk_full)
    with pytest.raises(batch.LabelError, match=r"(?s)No space left.*kept in .*--resume"):
        batch.run(str(folder), dataset["cross"], str(out), predictor=predictor, progress=False, warn=lambda m: None)
    monkeypatch.undo()
    assert not out.exists() and sidecar.exists()
    assert "error" in batch.read_sidecar(str(sidecar))[1]["late.png"]

    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other weights")
    with pytest.raises(batch.LabelError, match=f"cannot load the model from {other}"):   # was a SafetensorError
        batch.run(str(folder), dataset["cross"], str(tmp_path / "x.json"), weights=str(other), progress=False)
    with pytest.raises(batch.LabelError, match="different weights_sha256"):
        batch.run(str(folder), dataset["cross"], str(out), resume=True, weights=str(other), predictor=predictor,
                  progress=False)

    (folder / "late.png").write_bytes(late)                               # the copy finished
    (folder / "img01.png").write_bytes((Path(dataset["images"]) / "img03.png").read_bytes())   # replaced
    fresh = trex2.Predictor(predictor.model)
    s = batch.run(str(folder), dataset["cross"], str(out), resume=True, predictor=fresh, progress=False)
    assert fresh.encode_count == 2 + 1                            # late.png, img01.png + the prompt image
    assert s["skipped"] == [] and not sidecar.exists()
    assert [im["file_name"] for im in load_coco_checked(out)["images"]] == ["img00.png", "img01.png", "late.png"]


# ---------------------------- app.evaluate (`python app.py eval`) on bad input; pure JSON, no model
def _eval_gt():
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
                       {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "dot"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 10, 10]}]}


def _eval_pred():
    return {"info": {"score_threshold": 0.5},
            "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100},
                       {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "cell"}, {"id": 2, "name": "dot"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.8}]}


def _eval(tmp_path, capsys, gt, pred, *extra):
    from app import evaluate
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    code = evaluate.main([str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _edit(d, where, key, value):
    """d[where[0]][where[1]][key] = value, or delete the key when value is ...; returns d."""
    item = d[where[0]][where[1]]
    if value is ...:
        del item[key]
    else:
        item[key] = value
    return d


@pytest.mark.parametrize("which, edit, message", [
    ("gt", (("annotations", 0), "bbox", ...), "annotations[0]: missing 'bbox'"),
    ("gt", (("annotations", 0), "bbox", [1, 2, 3]), "bbox must be 4 finite numbers"),
    ("gt", (("annotations", 0), "id", ...), "annotations[0]: 'id' must be an integer"),
    ("gt", (("annotations", 1), "id", 1), "annotations[1]: 'id' must be an integer of its own"),
    ("gt", (("annotations", 0), "image_id", 9), "image_id 9 is not in images"),
    ("gt", (("annotations", 0), "category_id", 9), "category_id 9 is not in categories"),
    ("gt", (("images", 1), "id", 1), "duplicate image id 1"),
    ("gt", (("images", 0), "id", ...), "images[0]: missing 'id'"),
    ("gt", (("categories", 0), "id", "1"), "categories[0]: 'id' has the wrong type"),
    ("pred", (("annotations", 0), "score", "high"), "score must be a finite number"),
    ("pred", (("annotations", 0), "bbox", ["a", 1, 2, 3]), "bbox must be 4 finite numbers"),
    ("pred", (("images", 0), "file_name", 5), "'file_name' has the wrong type"),
])
def test_eval_malformed_files_are_clear_errors(tmp_path, capsys, which, edit, message):
    """Each of these ended in a traceback (KeyError, IndexError, TypeError) or was scored silently
    (a GT object on a missing image or category, a repeated GT id: pycocotools drops one)."""
    gt, pred = _eval_gt(), _eval_pred()
    _edit(gt if which == "gt" else pred, *edit)
    code, out, err = _eval(tmp_path, capsys, gt, pred)
    assert code == 2 and message in err and f"{which}.json" in err and out == "", err


def test_eval_nothing_matched_is_an_error_and_partial_matches_warn(tmp_path, capsys):
    """PRED of another folder or other class names scored AP 0 with exit code 0; now a clear error.
    Partial matches are warned on stderr (also with --json), and an image without detections scores
    AP50 0 for its categories (was None, unlike shared/tools/score.py)."""
    pred = _eval_pred()
    for im in pred["images"]:
        im["file_name"] = "other_" + im["file_name"]
    code, _, err = _eval(tmp_path, capsys, _eval_gt(), pred)
    assert code == 2 and "none of the 2 PRED images matches" in err and "'other_a.jpg'" in err
    pred = _eval_pred()
    for c in pred["categories"]:
        c["name"] += "s"
    code, _, err = _eval(tmp_path, capsys, _eval_gt(), pred)
    assert code == 2 and "none of the PRED categories ['cells', 'dots']" in err

    pred = _eval_pred()
    pred["images"][1]["file_name"] = "sub/a.jpg"          # two PRED images on GT a.jpg, none on b.jpg
    pred["categories"][1]["name"] = "blob"
    code, out, err = _eval(tmp_path, capsys, _eval_gt(), pred, "--json")
    r = json.loads(out)
    assert code == 0 and r["images_matched"] == 1 and r["gt_images_missing"] == 1
    for warning in ("categories not in GT, ignored: blob", "'a.jpg' and 'sub/a.jpg' match the same GT image",
                    "1 GT image(s) not in PRED"):
        assert warning in err, err
    pred = _eval_pred()
    pred["images"][1].update(width=50, height=50)          # boxes of a resized copy: warned, not silent
    code, out, err = _eval(tmp_path, capsys, _eval_gt(), pred)
    assert code == 0 and "1 PRED image(s) differ in size from GT (e.g. 'b.jpg': 50x50 against 100x100" in err
    pred = _eval_pred()
    pred["annotations"] = []
    code, out, _ = _eval(tmp_path, capsys, _eval_gt(), pred, "--json")
    assert code == 0 and json.loads(out)["AP50_per_category"] == {"cell": 0.0, "dot": 0.0}
    pred = _eval_pred()
    pred["annotations"][0]["score"] = None                 # no score: counted as 1.0 (was a TypeError)
    code, out, _ = _eval(tmp_path, capsys, _eval_gt(), pred, "--json")
    assert code == 0 and json.loads(out)["AP50"] == pytest.approx(1.0)


def test_per_image_skips_an_unreadable_prompted_image(dataset, predictor, tmp_path):
    """--per-image: a prompted image that cannot be read is skipped with a warning like any unreadable
    image, and the other prompted images are labelled (it used to stop the whole run)."""
    folder = _copy_images(dataset, tmp_path / "imgs")
    (folder / "img01.png").write_bytes(b"not an image")
    per = prompt_file(tmp_path / "per.json",
                      [(folder / "img00.png", "disc", b, None, False) for b in dataset["truth"]["img00.png"]["disc"][:2]]
                      + [(folder / "img01.png", "square", b, None, False) for b in dataset["truth"]["img01.png"]["square"][:2]])
    warned = []
    s = batch.run(str(folder), per, str(tmp_path / "o.json"), per_image=True, predictor=predictor, progress=False,
                  warn=warned.append)
    assert s["skipped"] == ["img01.png"] and any("img01.png" in m for m in warned)
    found = dets_by_image(load_coco_checked(tmp_path / "o.json"))["img00.png"]["disc"]
    assert top_k_precision(found, dataset["truth"]["img00.png"]["disc"]) >= 0.6


def squares_image(rng, boxes) -> np.ndarray:
    """A noisy grey SIZE x SIZE RGB image with a filled square at each xyxy box."""
    img = np.full((SIZE, SIZE, 3), 190, np.uint8) + rng.integers(0, 12, (SIZE, SIZE, 3), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(img, (x0, y0), (x1 - 1, y1 - 1), SHAPES["square"], -1)
    return img


def label_both_ways(predictor, tmp_path: Path, prompts: str) -> dict:
    """batch.run on tmp_path/imgs with the second look on and off -> {rescale: (canvas sizes of
    every encode, output COCO dict)}."""
    runs = {}
    for rescale in (True, False):
        sizes = []
        out = tmp_path / f"o{rescale}.json"
        batch.run(str(tmp_path / "imgs"), prompts, str(out), predictor=Recording(trex2.Predictor(predictor.model), sizes),
                  progress=False, rescale=rescale)
        runs[rescale] = sizes, json.loads(out.read_text())
    return runs


def small_square_prompts(rng, tmp_path: Path) -> str:
    """A cross-image prompt file: 3 of the ~24 px squares of a scene saved in tmp_path/prompt."""
    small, small_boxes = draw_scene(rng, {"square": 6})
    save_rgb(tmp_path / "prompt" / "p.png", small)
    return prompt_file(tmp_path / "prompt" / "p.json",
                       [(tmp_path / "prompt" / "p.png", "square", b, None, False) for b in small_boxes["square"][:3]],
                       categories=("square",))


def test_second_look_at_the_exemplars_scale(predictor, tmp_path):
    """Cross-image exemplars of ~24 px squares; a target image whose squares are ~2.5x larger is
    searched again at the canvas that gives them the exemplars' size (and its boxes are right), an
    image whose squares match the exemplars is encoded once; rescale=False never looks twice."""
    rng = np.random.default_rng(5)
    prompts = small_square_prompts(rng, tmp_path)
    big_boxes = [[10, 12, 68, 70], [122, 14, 180, 72], [16, 124, 74, 182], [130, 134, 188, 192]]
    save_rgb(tmp_path / "imgs" / "a_big.png", squares_image(rng, big_boxes))
    same, _ = draw_scene(rng, {"square": 5})
    save_rgb(tmp_path / "imgs" / "b_same.png", same)
    runs = label_both_ways(predictor, tmp_path, prompts)
    # prompt image, a_big at 640 and again at 640 / 2.5, b_same at 640
    assert runs[True][0] == [640, 640, 256, 640] and runs[False][0] == [640, 640, 640]
    data = runs[True][1]
    assert data["info"]["rescale"] is True and runs[False][1]["info"]["rescale"] is False
    big_id = next(i["id"] for i in data["images"] if i["file_name"] == "a_big.png")
    top = sorted((a for a in data["annotations"] if a["image_id"] == big_id), key=lambda a: -a["score"])[:4]
    found = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in top)])
    assert (iou(big_boxes, found).max(1) >= 0.8).all(), top


def test_blind_look_where_nothing_was_found(predictor, tmp_path):
    """Cross-image exemplars of ~24 px squares; a target image with 9 squares of 58 px, which the
    first look (640 px canvas) does not find above the threshold: the class is looked at again at
    BLIND_LOOK_SCALE times the canvas, where the squares are found."""
    from trex2.predictor import BLIND_LOOK_SCALE
    rng = np.random.default_rng(5)
    prompts = small_square_prompts(rng, tmp_path)
    big_boxes = [[x, y, x + 58, y + 58] for y in (6, 78, 150) for x in (6, 78, 150)]
    save_rgb(tmp_path / "imgs" / "big.png", squares_image(rng, big_boxes))
    best = {}
    for rescale, (sizes, data) in label_both_ways(predictor, tmp_path, prompts).items():
        top = sorted(data["annotations"], key=lambda a: -a["score"])[:9]
        found = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in top)]).reshape(-1, 4)
        best[rescale] = sizes, top, (iou(big_boxes, found).max(1) >= 0.7).sum() if len(found) else 0
        threshold = data["info"]["score_threshold"]
    assert best[False][1][0]["score"] < threshold      # the premise: the first look finds nothing
    assert best[False][0] == [640, 640] and best[True][0] == [640, 640, round(640 * BLIND_LOOK_SCALE)]
    assert best[False][2] < 5 and best[True][2] >= 8, best
    assert best[True][1][0]["score"] > best[False][1][0]["score"] + 0.1


def test_blind_look_counts_only_where_it_scores_higher():
    """Predictor.rescale_classes with a stand-in detector: a class with no box above the threshold
    is searched again at BLIND_LOOK_SCALE times the canvas, and that look's boxes are fused in only
    when its best score beats the first look's; a class found at its exemplars' size is not
    looked at again."""
    from types import SimpleNamespace
    from trex2.class_embedding import ClassEmbedding
    from trex2.predictor import BLIND_LOOK_SCALE, _detections

    class Stub:
        score_threshold = 0.3
        model = SimpleNamespace(cfg=SimpleNamespace(image_size=640))

        def __init__(self, second):
            self.second = second

        def detect(self, emb, classes, score_threshold=None, compete=True):
            keep = np.isin(self.second.data["class_name"], list(classes))
            return self.second[keep]

    cls = {n: ClassEmbedding(torch.zeros(4), object_px=40.0) for n in ("a", "b")}
    # "a": only a weak box; "b": a confident box at its exemplars' size (40 px at canvas 640)
    first = _detections([[10, 10, 50, 50], [100, 100, 140, 140]], np.array([0.2, 0.6]), [0, 1], ["a", "b"])
    for second_score, fused in ((0.5, True), (0.1, False)):
        sizes = []
        stub = Stub(_detections([[12, 12, 49, 52], [300, 300, 340, 340]], np.array([second_score, 0.05]),
                                [0, 0], ["a"]))
        parts = trex2.Predictor.rescale_classes(stub, first, cls, 640, (640, 640),
                                                lambda size: sizes.append(size))
        assert sizes == [round(640 * BLIND_LOOK_SCALE)]
        rest, a = parts
        assert list(rest.data["class_name"]) == ["b"] and list(a.data["class_name"]) == ["a"] * len(a)
        if fused:   # the two overlapping boxes become one, scored by the mean
            assert a.confidence.max() == pytest.approx((0.2 + second_score) / 2, abs=1e-6)
        else:       # the first look's boxes, as they were
            assert a.confidence.tolist() == pytest.approx([0.2]) and np.allclose(a.xyxy, [[10, 10, 50, 50]])


def test_no_second_look_where_the_exemplars_are_drawn(predictor, tmp_path):
    """Exemplars drawn on the image itself set the scale there: an image with 3 prompted 36 px
    squares and 4 of 54 px, whose confident boxes would ask for a second look, is searched once."""
    from trex2.predictor import rescaled_size
    rng = np.random.default_rng(6)
    small = [[4, 4, 40, 40], [4, 184, 40, 220], [184, 4, 220, 40]]
    large = [[60, 50, 114, 104], [130, 60, 184, 114], [50, 130, 104, 184], [120, 140, 174, 194]]
    img = squares_image(rng, small + large)
    save_rgb(tmp_path / "imgs" / "mixed.png", img)
    # the premise: by its confident boxes alone, the image would be searched again
    one = trex2.Predictor(predictor.model)
    emb = one.encode_image(img, size=640)
    cls = one.embed_prompts([(emb, np.array(small, float))])
    d = one.detect(emb, {"square": cls})
    ok = d.confidence >= one.score_threshold
    sides = np.sqrt((d.xyxy[ok, 2] - d.xyxy[ok, 0]) * (d.xyxy[ok, 3] - d.xyxy[ok, 1]))
    assert rescaled_size(640, (SIZE, SIZE), sides, cls.object_px) is not None
    prompts = prompt_file(tmp_path / "p.json", [(tmp_path / "imgs" / "mixed.png", "square", b, None, False)
                                                for b in small], categories=("square",))
    for per_image in (True, False):   # per-image, and cross-image with the prompt image in the folder
        sizes = []
        batch.run(str(tmp_path / "imgs"), prompts, str(tmp_path / f"o{per_image}.json"), per_image=per_image,
                  progress=False, predictor=Recording(trex2.Predictor(predictor.model), sizes))
        assert sizes == [640]


def coco_boxes(image_id: int, boxes, first_id: int, category_id: int = 1) -> list[dict]:
    """COCO annotations (ids from first_id) of xyxy pixel boxes on one image."""
    return [{"id": first_id + j, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float((x1 - x0) * (y1 - y0))}
            for j, (x0, y0, x1, y1) in enumerate(boxes)]


def tiny_weights(path: Path) -> Path:
    """An untrained small model saved at path (fast to load and to fit a refiner on)."""
    trex2.TRex2(trex2.ModelConfig(d_model=32, d_ffn=64, dec_layers=2, num_queries=50)).eval().save(str(path))
    return path


def test_refiner_check_scores_each_weights_on_the_kept_out_images(tmp_path):
    """app.refiner_job.check_weights (the app's check of a fitted box refiner): the labelled images
    listed in the check file, and only they, are labelled with the prompt file by each weights file
    and scored against their labels: the shipped model finds the squares, an untrained one does not."""
    from app.refiner_job import check_weights
    rng = np.random.default_rng(7)
    prompts = small_square_prompts(rng, tmp_path)
    images, anns = [], []
    for k in range(3):
        img, boxes = draw_scene(rng, {"square": 5})
        save_rgb(tmp_path / "imgs" / f"{k}.png", img)
        if k == 2:
            continue                                     # in the folder, not in the check file
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": SIZE, "height": SIZE})
        anns += coco_boxes(k + 1, boxes["square"], first_id=len(anns) + 1)
    check = tmp_path / "check.json"
    check.write_text(json.dumps({"images": images, "annotations": anns,
                                 "categories": [{"id": 1, "name": "square"}]}))
    untrained = tmp_path / "untrained.safetensors"
    tiny_weights(untrained)
    r = check_weights(check, tmp_path / "imgs", Path(prompts), {"shipped": None, "untrained": str(untrained)},
                      tmp_path / "work", print)
    assert sorted(p.name for p in (tmp_path / "work" / "check-images").iterdir()) == ["0.png", "1.png"]
    assert r["shipped"]["images"] == 2 and r["shipped"]["AP50"] >= 0.8, r["shipped"]
    assert r["untrained"]["AP50"] < 0.3, r["untrained"]


def test_refine_command_keeps_labelled_images_out_and_checks_on_them(tmp_path, capsys):
    """`app.py refine --check-share`: a share of the labelled images without prompts (never the
    prompt image) is kept out of the fit, the refiner is fitted on the rest and checked on them
    (before / after AP in the log and beside the weights); --check-share needs --prompts."""
    from app.refiner_job import main as refine_main, read_check
    rng = np.random.default_rng(3)
    images, anns = [], []
    for k in range(10):
        img, boxes = draw_scene(rng, {"square": 4})
        save_rgb(tmp_path / "imgs" / f"{k}.png", img)
        images.append({"id": k + 1, "file_name": f"{k}.png", "width": SIZE, "height": SIZE})
        anns += coco_boxes(k + 1, boxes["square"], first_id=len(anns) + 1)
        anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 2, "iscrowd": 0,   # never prompted
                     "bbox": [2.0, 2.0, 6.0, 6.0], "area": 36.0})
        if k == 5:
            prompts = prompt_file(tmp_path / "p.json", [(tmp_path / "imgs" / "5.png", "square", b, None, False)
                                                        for b in boxes["square"][:2]], categories=("square",))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"images": images, "annotations": anns,
                                  "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "dust"}]}))
    init, out = tmp_path / "init.safetensors", tmp_path / "out.safetensors"
    tiny_weights(init)
    common = ["--labels", str(labels), "--images", str(tmp_path / "imgs"), "--out", str(out), "--init", str(init),
              "--steps", "2", "--synthetic", "0", "--batch", "2", "--warmup", "2"]
    with pytest.raises(SystemExit):
        refine_main(common + ["--check-share", "0.3"])                # no prompt file to check with
    assert "--check-share needs --prompts" in capsys.readouterr().err
    assert refine_main(common + ["--prompts", prompts, "--check-share", "0.3"]) == 0
    err = capsys.readouterr().err
    fit = json.loads((tmp_path / "out-check" / "fit.coco.json").read_text())
    check = json.loads((tmp_path / "out-check" / "check.coco.json").read_text())
    assert len(check["images"]) == 3 and len(fit["images"]) == 7 and len(check["annotations"]) == 12
    assert "5.png" in {im["file_name"] for im in fit["images"]}     # the prompt image is fitted on
    assert trex2.load_model(str(out)).extra["refiner"]["labels"] == ["fit.coco.json"]
    assert re.search(r"refiner check: on 3 of your labelled images not used for fitting \(12 boxes\), AP", err)
    assert read_check(out).startswith("on 3 of your labelled images")
