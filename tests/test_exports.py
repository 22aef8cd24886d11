"""exports/: COCO, YOLO and prompt files. Images are generated in tmp_path."""
import contextlib
import dataclasses
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import supervision as sv
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from exports import (Annotation, ImageRecord, Prompt, PromptCategory, PromptSet,
                     annotations_from_detections, build_coco, clip_xyxy, coco_results,
                     image_record, parse_coco, read_coco, read_prompts, read_yolo, write_coco,
                     write_prompts, write_yolo, xywh_to_xyxy, xyxy_to_xywh)
from trex2.image_io import list_images

DATA = Path("/work/shared/data")


def _img(path: Path, w: int, h: int, seed: int = 0, exif_orientation: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pix = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pix)
    kw = {}
    if exif_orientation is not None:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    im.save(path, **kw)
    return path


def _load_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _sample():
    images = [("a.jpg", 100, 80), ("sub/b.png", 50, 60)]
    cats = ["cat", "dog"]
    anns = [Annotation("a.jpg", "cat", (10.0, 20.0, 40.0, 50.0), 0.9),
            Annotation("a.jpg", "dog", (0.5, 1.25, 99.5, 79.0), 0.25),
            ("sub/b.png", "cat", (5, 5, 15, 30))]
    return images, cats, anns


# ---------------------------------------------------------------- boxes

def test_box_conversions():
    xyxy = np.array([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 0.5, 0.25]])
    xywh = xyxy_to_xywh(xyxy)
    np.testing.assert_allclose(xywh, [[1, 2, 10, 20], [0, 0, 0.5, 0.25]])
    np.testing.assert_allclose(xywh_to_xyxy(xywh), xyxy)
    np.testing.assert_allclose(xyxy_to_xywh([1, 2, 3, 5]), [[1, 2, 2, 3]])
    assert xyxy_to_xywh([]).shape == (0, 4)
    np.testing.assert_allclose(clip_xyxy([[-5, -5, 200, 50]], 100, 40), [[0, 0, 100, 40]])
    with pytest.raises(ValueError):
        xyxy_to_xywh([[1, 2, 3]])


# ---------------------------------------------------------------- COCO

def test_coco_round_trip_and_pycocotools(tmp_path):
    images, cats, anns = _sample()
    out = tmp_path / "out.json"
    write_coco(out, images, cats, anns, info={"score_threshold": 0.3})
    raw = json.loads(out.read_text())
    assert [im["id"] for im in raw["images"]] == [1, 2]
    assert [c["id"] for c in raw["categories"]] == [1, 2]
    assert [a["id"] for a in raw["annotations"]] == [1, 2, 3]
    assert raw["info"]["score_threshold"] == 0.3 and "description" in raw["info"]
    assert raw["licenses"] == []
    a0 = raw["annotations"][0]
    assert a0["bbox"] == [10.0, 20.0, 30.0, 30.0] and a0["area"] == 900.0
    assert a0["iscrowd"] == 0 and a0["score"] == 0.9
    assert "score" not in raw["annotations"][2]

    coco = _load_coco(out)
    assert sorted(coco.getImgIds()) == [1, 2]
    assert len(coco.getAnnIds()) == 3

    ds = read_coco(out)
    assert ds.images == [ImageRecord(*im) for im in images]
    assert ds.categories == cats
    assert ds.info["score_threshold"] == 0.3
    assert len(ds.annotations) == 3
    for got, want in zip(ds.annotations, [Annotation(*a) for a in anns]):
        assert (got.image, got.category, got.score) == (want.image, want.category, want.score)
        np.testing.assert_allclose(got.box, want.box, atol=0.01)


def test_coco_clipping_and_degenerate_boxes(tmp_path):
    images = [("a.jpg", 100, 80)]
    d = build_coco(images, ["x"], [("a.jpg", "x", (-10, -5, 50, 200))])
    assert d["annotations"][0]["bbox"] == [0.0, 0.0, 50.0, 80.0]
    assert d["annotations"][0]["area"] == 4000.0
    for bad in [(10, 10, 10, 20), (10, 10, 20, 10), (120, 10, 150, 20), (30, 30, 20, 40),
                (-20, 0, -1, 10)]:
        with pytest.raises(ValueError, match="width or height <= 0"):
            build_coco(images, ["x"], [("a.jpg", "x", bad)])
    with pytest.raises(ValueError, match="finite"):
        build_coco(images, ["x"], [("a.jpg", "x", (0, 0, float("nan"), 5))])
    with pytest.raises(ValueError, match="score"):
        build_coco(images, ["x"], [("a.jpg", "x", (0, 0, 5, 5), float("inf"))])


def test_gt_scored_as_its_own_results_gives_ap_1(tmp_path):
    rng = np.random.default_rng(3)
    images = [(f"img{i}.jpg", 200, 150) for i in range(5)]
    cats = ["a", "b"]
    anns = []
    for fn, w, h in images:
        for _ in range(4):
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            bw, bh = rng.uniform(8, 40), rng.uniform(8, 40)
            anns.append(Annotation(fn, cats[int(rng.integers(2))], (x, y, x + bw, y + bh)))
    gt_path = tmp_path / "gt.json"
    write_coco(gt_path, images, cats, anns)
    gt = read_coco(gt_path)

    def ap(results):
        coco_gt = _load_coco(gt_path)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, dt, "bbox")
            ev.evaluate(), ev.accumulate(), ev.summarize()
        return ev.stats[0]

    assert ap(coco_results(gt, gt)) == pytest.approx(1.0)
    # The check can fail: boxes shifted by half their size score far lower.
    shifted = [a._replace(box=(a.box[0] + (a.box[2] - a.box[0]) / 2, a.box[1],
                               a.box[2] + (a.box[2] - a.box[0]) / 2, a.box[3]))
               for a in gt.annotations]
    assert ap(coco_results(dataclasses.replace(gt, annotations=shifted), gt)) < 0.5


def test_coco_results_matches_categories_and_images_by_name(tmp_path):
    images = [("p.jpg", 50, 50), ("q.jpg", 50, 50)]
    gt_path = tmp_path / "gt.json"
    write_coco(gt_path, images, ["a", "b"], [("q.jpg", "b", (1, 1, 9, 9))])
    pred_path = tmp_path / "pred.json"
    # different order of images and categories -> different ids in the prediction file
    write_coco(pred_path, images[::-1], ["b", "a"], [("q.jpg", "b", (1, 1, 9, 9), 0.7)])
    res = coco_results(read_coco(pred_path), read_coco(gt_path))
    assert res == [{"image_id": 2, "category_id": 2, "bbox": [1.0, 1.0, 8.0, 8.0], "score": 0.7}]
    write_coco(pred_path, images, ["c"], [("q.jpg", "c", (1, 1, 9, 9), 0.7)])
    with pytest.raises(ValueError, match="category 'c'"):
        coco_results(read_coco(pred_path), read_coco(gt_path))
    assert coco_results(read_coco(pred_path), read_coco(gt_path), strict=False) == []


def test_duplicate_basenames_in_subfolders(tmp_path):
    root = tmp_path / "imgs"
    _img(root / "x" / "same.jpg", 40, 30, seed=1)
    _img(root / "y" / "same.jpg", 20, 50, seed=2)
    _img(root / "same.jpg", 10, 10, seed=3)
    rels = list_images(root)
    assert rels == ["same.jpg", "x/same.jpg", "y/same.jpg"]
    images = [image_record(root, r) for r in rels]
    assert images[1] == ("x/same.jpg", 40, 30) and images[2] == ("y/same.jpg", 20, 50)
    anns = [(r, "obj", (1, 1, 5, 6)) for r in rels]
    out = tmp_path / "dup.json"
    write_coco(out, images, ["obj"], anns)
    coco = _load_coco(out)
    names = [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)]
    assert names == rels and len(set(names)) == 3
    ds = read_coco(out)
    assert [a.image for a in ds.annotations] == rels
    with pytest.raises(ValueError, match="duplicate image file_name"):
        build_coco([("x/same.jpg", 4, 4), ("x/same.jpg", 4, 4)], [], [])


def test_file_name_must_be_relative_posix():
    for bad in ["/abs/a.jpg", "a\\b.jpg", "../a.jpg", "a//b.jpg", "./a.jpg", ""]:
        with pytest.raises(ValueError):
            build_coco([(bad, 4, 4)], [], [])
    d = build_coco([(Path("sub") / "a.jpg", 4, 4)], [], [])
    assert d["images"][0]["file_name"] == "sub/a.jpg"


def test_image_record_is_exif_corrected(tmp_path):
    _img(tmp_path / "r.jpg", 60, 20, exif_orientation=6)
    assert image_record(tmp_path, "r.jpg") == ImageRecord("r.jpg", 20, 60)


def test_empty_dataset(tmp_path):
    out = tmp_path / "empty.json"
    write_coco(out, [], [], [])
    coco = _load_coco(out)
    assert coco.getImgIds() == [] and coco.getAnnIds() == []
    ds = read_coco(out)
    assert ds.images == [] and ds.categories == [] and ds.annotations == []
    # images without any annotation are kept
    write_coco(out, [("a.jpg", 5, 5)], ["x"], [])
    assert read_coco(out).images == [("a.jpg", 5, 5)]


def test_unknown_category_or_image_is_an_error(tmp_path):
    images, cats, anns = _sample()
    out = tmp_path / "x.json"
    with pytest.raises(ValueError, match="category 'bird' is not in"):
        write_coco(out, images, cats, anns + [("a.jpg", "bird", (1, 1, 5, 5))])
    with pytest.raises(ValueError, match="image is not in"):
        write_coco(out, images, cats, [("zzz.jpg", "cat", (1, 1, 5, 5))])
    assert not out.exists()
    data = build_coco(images, cats, anns)
    data["annotations"][0]["category_id"] = 99
    with pytest.raises(ValueError, match="category_id 99"):
        parse_coco(data, source="pred.json")
    data = build_coco(images, cats, anns)
    data["annotations"][1]["image_id"] = 42
    with pytest.raises(ValueError, match="image_id 42"):
        parse_coco(data)
    with pytest.raises(ValueError, match="duplicate category"):
        build_coco(images, ["cat", "cat"], [])


def test_read_coco_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_coco(p)
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="bad.json.*categories"):
        read_coco(p)
    data = build_coco(*_sample())
    data["annotations"][0]["bbox"] = [1, 2, 3]
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: annotations\[0\]: bbox"):
        read_coco(p)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_coco(tmp_path / "missing.json")


def test_parse_coco_names_of_other_tools():
    """strict_names=False (app.py eval reads other tools' files): absolute, Windows and "./" file names
    and a missing width/height pass; the structure is still checked. Strict reading refuses them."""
    from exports import parse_coco
    data = {"images": [{"id": 1, "file_name": "/data/a.jpg"}, {"id": 2, "file_name": "C:\\x\\b.jpg"},
                       {"id": 3, "file_name": "./c.jpg", "width": 5, "height": 5}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2]}]}
    ds = parse_coco(data, "f.json", strict_names=False)
    assert [im.file_name for im in ds.images] == ["/data/a.jpg", "C:\\x\\b.jpg", "./c.jpg"]
    assert ds.annotations[0].image == "C:\\x\\b.jpg"
    with pytest.raises(ValueError, match="relative path"):
        parse_coco(data, "f.json")
    data["images"][0]["file_name"] = " "
    with pytest.raises(ValueError, match=r"f.json: images\[0\]: 'file_name' is empty"):
        parse_coco(data, "f.json", strict_names=False)
    data["images"][0] = {"id": 1, "file_name": "a.jpg", "width": 0, "height": 5}
    with pytest.raises(ValueError, match="width must be a positive integer"):
        parse_coco(data, "f.json", strict_names=False)


def test_write_is_atomic(tmp_path):
    images, cats, anns = _sample()
    out = tmp_path / "out.json"
    write_coco(out, images, cats, anns)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_coco(out, images, cats, [("a.jpg", "nope", (1, 1, 2, 2))])
    assert out.read_bytes() == before  # a failed write leaves the old file intact
    write_coco(out, images[:1], cats, [])
    assert len(read_coco(out).images) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp files left


def test_atomic_write_keeps_usual_permissions(tmp_path):
    """A new file gets what open() would give (0666 less the umask), not the temp file's private
    0600; a file that is replaced keeps its own permissions."""
    from exports import atomic_write_text
    fresh, plain = tmp_path / "fresh.json", tmp_path / "plain.json"
    atomic_write_text(fresh, "{}")
    plain.write_text("{}")
    assert stat.S_IMODE(fresh.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    os.chmod(fresh, 0o640)
    atomic_write_text(fresh, "[]")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_text() == "[]"


def test_annotations_from_detections():
    dets = sv.Detections(xyxy=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], float),
                         confidence=np.array([0.5, 0.8]), class_id=np.array([1, 0]),
                         data={"class_name": np.array(["b", "a"])})
    anns = annotations_from_detections("im.jpg", dets)
    assert anns == [Annotation("im.jpg", "b", (1.0, 2.0, 3.0, 4.0), 0.5),
                    Annotation("im.jpg", "a", (5.0, 6.0, 7.0, 8.0), 0.8)]
    assert [a.category for a in annotations_from_detections("im.jpg", dets, ["x", "y"])] == \
        ["y", "x"]
    assert annotations_from_detections("im.jpg", sv.Detections.empty()) == []
    d = build_coco([("im.jpg", 10, 10)], ["a", "b"], anns)
    assert [a["score"] for a in d["annotations"]] == [0.5, 0.8]


# ---------------------------------------------------------------- YOLO

def _yolo_sample(tmp_path):
    root = tmp_path / "imgs"
    _img(root / "a.jpg", 120, 90, seed=1)
    _img(root / "s1" / "same.png", 64, 48, seed=2)
    _img(root / "s2" / "same.png", 30, 70, seed=3)
    _img(root / "rot.jpg", 80, 40, seed=4, exif_orientation=6)  # displayed 40 x 80
    _img(root / "none.jpg", 16, 16, seed=5)
    images = [image_record(root, r) for r in list_images(root)]
    anns = [("a.jpg", "tomato", (10.3, 20.7, 50.2, 60.9)),
            ("a.jpg", "leaf", (0, 0, 120, 90)),
            ("a.jpg", "tomato", (100, 80, 130, 95)),          # clipped to the image
            ("s1/same.png", "leaf", (3, 4, 20, 30)),
            ("s2/same.png", "tomato", (1, 50, 29, 69)),
            ("rot.jpg", "tomato", (5, 60, 35, 79))]
    return root, images, ["tomato", "leaf"], anns


@pytest.mark.parametrize("symlink", [False, True])
def test_yolo_export_reimports_same_boxes(tmp_path, symlink):
    root, images, cats, anns = _yolo_sample(tmp_path)
    out = tmp_path / "yolo"
    data_yaml = write_yolo(out, root, images, cats, anns, symlink=symlink)
    assert data_yaml == out / "data.yaml"
    import yaml
    meta = yaml.safe_load(data_yaml.read_text())
    assert meta["names"] == {0: "tomato", 1: "leaf"} and meta["nc"] == 2
    assert meta["train"] == "images"
    assert (out / "labels" / "s1" / "same.txt").exists()
    assert (out / "labels" / "none.txt").read_text() == ""
    assert (out / "images" / "s2" / "same.png").is_symlink() == symlink
    assert (out / "images" / "a.jpg").read_bytes() == (root / "a.jpg").read_bytes()
    line = (out / "labels" / "s1" / "same.txt").read_text().split()
    assert line[0] == "1"
    np.testing.assert_allclose([float(v) for v in line[1:]],
                               [11.5 / 64, 17 / 48, 17 / 64, 26 / 48], atol=1e-6)

    back = read_yolo(out)
    assert sorted(back.images) == sorted(images)
    assert back.categories == cats
    want = sorted((a[0], a[1], tuple(clip_xyxy(a[2], *dict(
        (i.file_name, (i.width, i.height)) for i in images)[a[0]])[0])) for a in anns)
    got = sorted((a.image, a.category, a.box) for a in back.annotations)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:2] == w[:2]
        np.testing.assert_allclose(g[2], w[2], atol=1.0)


def test_yolo_errors(tmp_path):
    root, images, cats, anns = _yolo_sample(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        write_yolo(tmp_path / "full", root, images, cats, anns)
    with pytest.raises(ValueError, match="not in the categories"):
        write_yolo(tmp_path / "y1", root, images, cats, [("a.jpg", "bird", (1, 1, 5, 5))])
    _img(root / "a.png", 10, 10)
    with pytest.raises(ValueError, match="share the label file"):
        write_yolo(tmp_path / "y2", root, [("a.jpg", 120, 90), ("a.png", 10, 10)], cats, [])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        write_yolo(tmp_path / "y3", root, [("missing.jpg", 10, 10)], cats, [])


# ---------------------------------------------------------------- prompt files

def test_prompt_file_round_trip(tmp_path):
    imgs = tmp_path / "data" / "images"
    a = _img(imgs / "a.jpg", 100, 80, seed=1)
    b = _img(imgs / "sub" / "b.png", 60, 40, seed=2)
    c = _img(tmp_path / "elsewhere" / "c.jpg", 30, 30, seed=3)
    ps = PromptSet(
        categories=[PromptCategory("tomato", "a ripe red tomato"), PromptCategory("leaf")],
        prompts=[Prompt(a, "tomato", box=(10, 20, 40, 50)),
                 Prompt(a, "tomato", point=(70.5, 12.25)),
                 Prompt(a, "tomato", box=(50, 50, 60, 70), negative=True),
                 Prompt(b, "leaf", point=(3, 4), negative=True),
                 Prompt(c, "leaf", box=(1, 1, 29, 29), extra={"gt_ann_id": 7})])
    pfile = tmp_path / "data" / "prompts.json"
    write_prompts(pfile, ps)
    raw = json.loads(pfile.read_text())
    assert [im["file_name"] for im in raw["images"]] == \
        ["images/a.jpg", "images/sub/b.png", "../elsewhere/c.jpg"]
    assert raw["images"][0]["width"] == 100 and raw["images"][0]["height"] == 80
    assert raw["categories"][0] == {"id": 1, "name": "tomato", "text": "a ripe red tomato"}
    assert "text" not in raw["categories"][1]
    assert raw["annotations"][0]["bbox"] == [10.0, 20.0, 30.0, 30.0]
    assert raw["annotations"][1]["point"] == [70.5, 12.25] and "bbox" not in raw["annotations"][1]
    assert raw["annotations"][2]["negative"] is True and "negative" not in raw["annotations"][0]
    assert raw["annotations"][4]["gt_ann_id"] == 7

    back = read_prompts(pfile)
    assert back.categories == ps.categories
    assert back.prompts == ps.prompts
    assert back.prompts[4].extra == {"gt_ann_id": 7}
    assert all(p.image.is_absolute() for p in back.prompts)
    assert back.images() == [a.resolve(), b.resolve(), c.resolve()]
    assert back.image_sizes[b.resolve()] == (60, 40)
    assert back.text_for("tomato") == "a ripe red tomato" and back.text_for("leaf") is None
    np.testing.assert_allclose(back.boxes(a, "tomato"), [[10, 20, 40, 50]])
    np.testing.assert_allclose(back.boxes(a, "tomato", negative=True), [[50, 50, 60, 70]])
    np.testing.assert_allclose(back.points(str(a), "tomato"), [[70.5, 12.25]])
    assert back.boxes(b, "leaf").shape == (0, 4)
    # moving the prompt file with its images keeps it valid (paths are relative)
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "data").rename(moved / "data")
    back2 = read_prompts(moved / "data" / "prompts.json")
    assert back2.prompts[0].image == (moved / "data" / "images" / "a.jpg").resolve()


def test_prompt_writer_rejects_bad_prompts(tmp_path):
    a = _img(tmp_path / "a.jpg", 50, 40)
    cats = [PromptCategory("x")]
    with pytest.raises(ValueError, match="category is not in"):
        write_prompts(tmp_path / "p.json", PromptSet(cats, [Prompt(a, "y", box=(1, 1, 5, 5))]))
    with pytest.raises(ValueError, match="empty after clipping"):
        write_prompts(tmp_path / "p.json", PromptSet(cats, [Prompt(a, "x", box=(60, 1, 70, 5))]))
    with pytest.raises(ValueError, match="outside"):
        write_prompts(tmp_path / "p.json", PromptSet(cats, [Prompt(a, "x", point=(51, 1))]))
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(a, "x")
    assert not (tmp_path / "p.json").exists()


def _prompt_json(**changes):
    d = {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 64, "height": 48}],
         "categories": [{"id": 1, "name": "tomato"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]}]}
    for key, value in changes.items():
        if key.startswith("ann_"):
            d["annotations"][0][key[4:]] = value
        elif key.startswith("drop_"):
            d["annotations"][0].pop(key[5:])
        else:
            d[key] = value
    return d


@pytest.mark.parametrize("changes, message", [
    ({"ann_point": [3, 4]}, "exactly one of 'bbox' or 'point'.*both"),
    ({"drop_bbox": True}, "exactly one of 'bbox' or 'point'.*neither"),
    ({"ann_bbox": [1, 2, 0, 5]}, "width or height <= 0"),
    ({"ann_bbox": [1, 2, "a", 5]}, "bbox must be 4 finite numbers"),
    ({"ann_negative": "yes"}, "'negative' must be true or false"),
    ({"ann_category_id": 5}, "category_id 5 is not in categories"),
    ({"ann_image_id": 9}, "image_id 9 is not in images"),
    ({"drop_bbox": True, "ann_point": [100, 4]}, "outside the 64x48 image"),
    ({"ann_bbox": [70, 2, 10, 10]}, "bbox .* lies outside the 64x48 image"),
    ({"ann_bbox": [-30, -30, 20, 20]}, "bbox .* lies outside the 64x48 image"),
    ({"ann_bbox": [1e300, 1e300, 1e300, 1e300]}, "bbox .* lies outside the 64x48 image"),
    ({"drop_bbox": True, "ann_point": [1]}, "point must be 2 finite numbers"),
    ({"categories": [{"id": 1, "name": "t", "text": 3}]}, "'text' must be a non-empty string"),
    ({"images": [{"id": 1, "file_name": "C:\\x\\a.jpg", "width": 6, "height": 4}]},
     "POSIX"),
    ({"images": [{"id": 1, "file_name": "/abs/a.jpg", "width": 6, "height": 4}]}, "relative"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 4}]}, "width"),
    ({"annotations": None}, "needs a list 'annotations'"),
])
def test_prompt_reader_malformed(tmp_path, changes, message):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(_prompt_json(**changes)))
    with pytest.raises(ValueError, match=message) as ei:
        read_prompts(p)
    assert str(p) in str(ei.value)


def test_prompt_reader_valid_minimal_and_bad_json(tmp_path):
    p = tmp_path / "prompts.json"
    p.write_text(json.dumps(_prompt_json()))
    ps = read_prompts(p)
    assert ps.prompts == [Prompt(tmp_path / "images" / "a.jpg", "tomato", box=(1, 2, 11, 12))]
    p.write_text(json.dumps(_prompt_json(ann_bbox=[-5, 40, 20, 20])))   # partly outside: clipped
    assert read_prompts(p).prompts[0].box == (0, 40, 15, 48)
    p.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompts(p)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "nope.json")


DEV_PROMPTS = sorted(DATA.glob("dev/*/prompts-per-image.json")) + \
    sorted(DATA.glob("dev/*/prompts-cross-image/prompts.json"))


@pytest.mark.skipif(not DEV_PROMPTS, reason="shared dev data not present on this machine")
@pytest.mark.parametrize("path", DEV_PROMPTS, ids=lambda p: "/".join(p.parts[-3:]))
def test_dev_prompt_files_load(path):
    raw = json.loads(path.read_text())
    ps = read_prompts(path)
    assert len(ps.prompts) == len(raw["annotations"]) > 0
    assert ps.category_names == [c["name"] for c in raw["categories"]]
    assert all(p.box is not None and not p.negative for p in ps.prompts)
    for image in ps.images():
        assert image.is_file(), image
    assert all("gt_ann_id" in p.extra for p in ps.prompts) == ("per-image" in path.name)
