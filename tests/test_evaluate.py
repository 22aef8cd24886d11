"""app.evaluate (`python app.py eval`): AP/AP50/AP75, counting error, exemplar exclusion, matching."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.evaluate import evaluate, exemplar_gt_ids, main

REPO = Path(__file__).resolve().parents[1]
SCORE_PY = REPO.parent / "shared" / "tools" / "score.py"

# Three well separated objects on one image (COCO xywh), a fourth on a second image.
A, B, C, D = [10, 10, 40, 40], [100, 10, 40, 40], [10, 100, 40, 40], [50, 50, 30, 30]


def _gt():
    return {"images": [{"id": 7, "file_name": "a.jpg", "width": 200, "height": 200},
                       {"id": 9, "file_name": "sub/b.jpg", "width": 200, "height": 200}],
            "categories": [{"id": 3, "name": "cell"}, {"id": 5, "name": "Other"}],
            "annotations": [{"id": 11, "image_id": 7, "category_id": 3, "bbox": A, "area": 1600, "iscrowd": 0},
                            {"id": 12, "image_id": 7, "category_id": 3, "bbox": B, "area": 1600, "iscrowd": 0},
                            {"id": 13, "image_id": 7, "category_id": 3, "bbox": C, "area": 1600, "iscrowd": 0},
                            {"id": 14, "image_id": 9, "category_id": 5, "bbox": D, "area": 900, "iscrowd": 0}]}


def _pred(dets, threshold=0.5):
    """dets: (file_name, category name, bbox, score). PRED ids deliberately differ from GT ids."""
    names = ["other", "cell"]  # other order and case than GT
    files = ["images/a.jpg", "b.jpg"]  # a longer path and a bare basename
    return {"info": {"score_threshold": threshold},
            "images": [{"id": i + 1, "file_name": f, "width": 200, "height": 200} for i, f in enumerate(files)],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
            "annotations": [{"id": k + 1, "image_id": files.index(f) + 1, "category_id": names.index(c) + 1,
                             "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0}
                            for k, (f, c, b, s) in enumerate(dets)]}


def _prompts(with_ids=True, shift=0.0):
    """Per-image prompt file whose only exemplar is object A (optionally shifted by `shift` px)."""
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [A[0] + shift, A[1], A[2], A[3]]}
    if with_ids:
        ann["gt_ann_id"] = 11
    return {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 200, "height": 200}],
            "categories": [{"id": 1, "name": "cell"}], "annotations": [ann]}


def test_perfect_predictions_score_one_and_ids_are_matched_by_name():
    pred = _pred([("images/a.jpg", "cell", A, 0.9), ("images/a.jpg", "cell", B, 0.8),
                  ("images/a.jpg", "cell", C, 0.7), ("b.jpg", "other", D, 0.6)])
    r = evaluate(_gt(), pred)
    assert r["images_matched"] == 2 and r["dets_dropped"] == 0
    assert r["AP"] == pytest.approx(1.0) and r["AP50"] == pytest.approx(1.0) and r["AP75"] == pytest.approx(1.0)
    assert r["count_mae"] == 0 and r["count_gt_total"] == 4 and r["count_pred_total"] == 4


def test_loose_boxes_pass_ap50_but_not_ap75():
    loose = lambda b: [b[0] - 6, b[1] - 6, b[2] + 12, b[3] + 12]  # noqa: E731  IoU = 1600/2704 = 0.59
    pred = _pred([("images/a.jpg", "cell", loose(A), 0.9), ("images/a.jpg", "cell", loose(B), 0.8),
                  ("images/a.jpg", "cell", loose(C), 0.7), ("b.jpg", "other", loose(D), 0.6)])
    r = evaluate(_gt(), pred)
    assert r["AP50"] == pytest.approx(1.0)
    assert r["AP75"] == pytest.approx(0.0)
    assert 0.0 < r["AP"] < 0.5


def test_counting_uses_threshold_from_info_or_option():
    pred = _pred([("images/a.jpg", "cell", A, 0.9), ("images/a.jpg", "cell", B, 0.4),
                  ("images/a.jpg", "cell", C, 0.3)], threshold=0.5)
    r = evaluate(_gt(), pred)
    # pairs: (a, cell) gt 3 pred 1 -> err 2; (b, other) gt 1 pred 0 -> err 1
    assert r["count_threshold"] == 0.5 and r["count_mae"] == pytest.approx(1.5)
    r = evaluate(_gt(), pred, score_threshold=0.25)
    assert r["count_threshold"] == 0.25 and r["count_mae"] == pytest.approx(0.5)


def test_exclude_exemplars_by_gt_ann_id_and_by_iou():
    gt = _gt()
    only_exemplar = _pred([("images/a.jpg", "cell", A, 0.9)])
    only_others = _pred([("images/a.jpg", "cell", B, 0.9), ("images/a.jpg", "cell", C, 0.8)])
    # Without exclusion: finding A alone is a hit (recall 1/3), B and C alone miss A (recall 2/3).
    assert evaluate(gt, only_exemplar)["AP50_per_category"]["cell"] == pytest.approx(34 / 101, abs=1e-6)
    assert evaluate(gt, only_others)["AP50_per_category"]["cell"] == pytest.approx(67 / 101, abs=1e-6)
    for prompts in (_prompts(with_ids=True), _prompts(with_ids=False, shift=1.0)):
        assert exemplar_gt_ids(gt, prompts) == {11}
        r = evaluate(gt, only_exemplar, exemplars=prompts)
        assert r["exemplars_excluded"] == 1
        assert r["AP50_per_category"]["cell"] == pytest.approx(0.0)  # A ignored: nothing else found
        r = evaluate(gt, only_others, exemplars=prompts)
        assert r["AP50_per_category"]["cell"] == pytest.approx(1.0)  # B, C are all that is left
        # counting still uses every object
        assert r["count_gt_total"] == 4
    # An exemplar box that only roughly covers A (IoU ~0.78 < 0.9) and has no gt_ann_id is not A.
    assert exemplar_gt_ids(gt, _prompts(with_ids=False, shift=5.0)) == set()
    # A gt_ann_id that names an object of another image is not trusted; IoU decides.
    bad = _prompts(with_ids=True, shift=5.0)
    bad["annotations"][0]["gt_ann_id"] = 14
    assert exemplar_gt_ids(gt, bad) == set()


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_cli_prints_metrics_and_rejects_bad_files(tmp_path, capsys):
    gt = _write(tmp_path, "gt.json", _gt())
    pred = _write(tmp_path, "pred.json", _pred([("images/a.jpg", "cell", A, 0.9)]))
    prompts = _write(tmp_path, "prompts.json", _prompts())
    assert main([gt, pred, "--exclude-exemplars", prompts]) == 0
    out = capsys.readouterr().out
    assert "AP " in out and "AP50" in out and "AP75" in out and "count error" in out
    assert main([gt, pred, "--json"]) == 0
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert r["AP50_per_category"]["cell"] == pytest.approx(34 / 101, abs=1e-6)
    assert r["dets_unscored"] == 0 and "no 'score'" not in err
    unscored = _pred([("images/a.jpg", "cell", A, 0.9), ("b.jpg", "other", D, 0.5)])
    del unscored["annotations"][0]["score"]                # labels, not detections: said so
    assert main([gt, _write(tmp_path, "labels.json", unscored)]) == 0
    assert "1 PRED box(es) have no 'score'" in capsys.readouterr().err
    assert main([gt, str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main([gt, _write(tmp_path, "notcoco.json", {"images": 1})]) == 2
    assert "not a COCO dataset" in capsys.readouterr().err
    assert main([gt, _write(tmp_path, "notcoco.json", [1, 2])]) == 2
    assert "not a COCO dataset, nor a results list" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    p = subprocess.run([sys.executable, "app.py", "eval", gt, str(broken)], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "broken.json" in p.stderr and "Traceback" not in p.stderr


def test_results_list_scores_like_the_dataset_form(tmp_path, capsys):
    """PRED as a pycocotools results list (GT ids, or file_name / category_name) scores as the same
    detections in a COCO file; bad entries are clear errors (exit 2) naming the file and entry."""
    dets = [("images/a.jpg", "cell", A, 0.9), ("images/a.jpg", "cell", [200, 200, 5, 5], 0.8),
            ("b.jpg", "other", D, 0.7)]
    gt = _write(tmp_path, "gt.json", _gt())
    assert main([gt, _write(tmp_path, "pred.json", _pred(dets)), "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    by_ids = [{"image_id": 7, "category_id": 3, "bbox": A, "score": 0.9},
              {"image_id": 7, "category_id": 3, "bbox": [200, 200, 5, 5], "score": 0.8},
              {"image_id": 9, "category_id": 5, "bbox": D, "score": 0.7}]
    by_names = [{"file_name": "a.jpg", "category_name": "cell", "bbox": A, "score": 0.9},
                {"file_name": "a.jpg", "category_name": "CELL", "bbox": [200, 200, 5, 5], "score": 0.8},
                {"file_name": "sub/b.jpg", "category_name": "other", "bbox": D, "score": 0.7}]
    for k, results in enumerate((by_ids, by_names)):
        assert main([gt, _write(tmp_path, f"r{k}.json", results), "--json", "--score-threshold", "0.5"]) == 0
        got = json.loads(capsys.readouterr().out)
        for key in ("AP", "AP50", "AP75", "AP50_per_category", "count_mae", "num_dets"):
            assert got[key] == want[key], key
    for bad, message in [({"image_id": 8, "category_id": 3, "bbox": A, "score": 0.9}, "no GT image"),
                         ({"image_id": 7, "category_id": 4, "bbox": A, "score": 0.9}, "no GT category"),
                         ({"image_id": 7, "category_id": 3, "bbox": [1, 2, 0, 3], "score": 0.9}, "'bbox'"),
                         ({"image_id": 7, "category_id": 3, "bbox": A, "score": None}, "'score'"),
                         (5, "results list")]:
        assert main([gt, _write(tmp_path, "bad.json", [by_ids[0], bad])]) == 2
        err = capsys.readouterr().err
        assert "bad.json" in err and "results[1]" in err and message in err, err


def _score_py():
    if not SCORE_PY.is_file():
        pytest.skip(f"{SCORE_PY} not present")
    spec = importlib.util.spec_from_file_location("shared_score", SCORE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_agrees_with_shared_score_py():
    score = _score_py()
    import numpy as np
    rng = np.random.default_rng(0)
    gt = _gt()
    dets = []
    for b, f, c in [(A, "images/a.jpg", "cell"), (B, "images/a.jpg", "cell"), (C, "images/a.jpg", "cell"),
                    (D, "b.jpg", "other")]:
        for _ in range(4):  # jittered copies with random scores: a mix of hits, loose hits and duplicates
            j = rng.normal(0, 4, 4)
            dets.append((f, c, [b[0] + j[0], b[1] + j[1], b[2] + abs(j[2]), b[3] + abs(j[3])],
                         float(rng.uniform(0.1, 1.0))))
    dets.append(("images/a.jpg", "cell", [150, 150, 30, 30], 0.95))  # a false positive
    pred = _pred(dets, threshold=0.6)
    for prompts in (None, _prompts()):
        mine = evaluate(gt, pred, exemplars=prompts)
        ref = score.score(gt, pred, exclude_exemplars=prompts, warn=lambda m: None)
        for k in ("AP", "AP50", "AP75", "count_mae", "count_rmse", "count_nae"):
            assert mine[k] == pytest.approx(ref[k], abs=1e-9), k
        assert mine["AP50_per_category"] == pytest.approx(ref["AP50_per_category"])


def test_error_breakdown_oracles(tmp_path, capsys):
    """--errors: a background box, a loose box on A (IoU 0.24), an exact box on B; C is never reached.
    Hand-computed 101-point AP50 of "cell" (the exact box on D makes "Other" 1.0): as is, FP FP TP
    -> 1/3 precision up to recall 1/3; with the loose box moved onto A, FP TP TP -> 2/3 up to 2/3;
    without the background box, FP TP -> 1/2 up to 1/3."""
    dets = [("images/a.jpg", "cell", [160, 160, 20, 20], 0.9), ("images/a.jpg", "cell", [25, 25, 40, 40], 0.8),
            ("images/a.jpg", "cell", B, 0.7), ("b.jpg", "other", D, 0.9)]
    r = evaluate(_gt(), _pred(dets), errors=True)
    e = r["errors"]
    assert r["AP50"] == pytest.approx((34 / 101 / 3 + 1) / 2, abs=1e-6)
    assert e["AP50_localisation_fixed"] == pytest.approx((67 / 101 * 2 / 3 + 1) / 2, abs=1e-6)
    assert e["AP50_background_removed"] == pytest.approx((34 / 101 / 2 + 1) / 2, abs=1e-6)
    assert (e["missed"], e["scored_objects"]) == (1, 4)
    # exemplar objects are not scored, so not counted as missed
    assert evaluate(_gt(), _pred(dets), exemplars=_prompts(), errors=True)["errors"]["scored_objects"] == 3
    assert "errors" not in evaluate(_gt(), _pred(dets))
    gt, pred = _write(tmp_path, "gt.json", _gt()), _write(tmp_path, "pred.json", _pred(dets))
    assert main([gt, pred, "--errors"]) == 0
    out = capsys.readouterr().out
    assert "moved onto it: 0.7211" in out and "were removed: 0.5842" in out and "1 of 4" in out
