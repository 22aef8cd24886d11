"""Score a COCO prediction file against a COCO ground truth (DESIGN.md section 5).

    python app.py eval GT.json PRED.json [--exclude-exemplars PROMPTS.json]
                       [--score-threshold T] [--max-dets 1000] [--errors] [--json]

PRED is a COCO file (what ``app.py label`` writes) or a pycocotools results list whose image and
category ids are GT's (``file_name`` / ``category_name`` may stand in for them).

AP / AP50 / AP75 are COCO box AP (pycocotools, IoU .50:.95, all areas) at ``--max-dets``
detections per image and category (dense scenes need more than COCO's 100). Images are matched
by ``file_name`` (exact, else PRED path ending in "/GT name", else a basename unique in GT) and
categories by name (case and surrounding blanks ignored), never by id.

``--exclude-exemplars`` (per-image protocol): GT objects that are (non-negative) box exemplars of
the prompt file are ignored for AP (pycocotools ``iscrowd``: a detection on them is neither a hit
nor a false positive). An exemplar names its GT object by ``gt_ann_id`` when present and
consistent, else it is matched to the GT box of its image and category with IoU > 0.9.
Counting always uses every GT object: per (image, category) pair with a non-zero GT or predicted
count, error = detections with score >= threshold minus GT count; threshold is
``--score-threshold``, else PRED ``info.score_threshold``, else 0.5.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import posixpath
import sys
from typing import Any

import numpy as np

EXEMPLAR_IOU = 0.9


class EvalError(Exception):
    """Bad input for evaluation; the message names the file."""


def _norm_path(p: str) -> str:
    p = str(p).replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return posixpath.normpath(p) if p else p


def _norm_name(n: Any) -> str:
    return " ".join(str(n).strip().lower().split())


class ImageMatcher:
    """Maps a file_name of another file onto the id of one of ``images`` (GT images, or a project's
    files in Project.import_coco): the same path, else the one path that ends the name after a "/"
    ("/data/x/sub/a.jpg" -> "sub/a.jpg"), else the one of the same basename; None if none or
    several fit."""

    def __init__(self, images: list[dict]):
        self.exact = {_norm_path(im["file_name"]): im["id"] for im in images}
        self.by_base: dict[str, list[int]] = {}
        for p, i in self.exact.items():
            self.by_base.setdefault(posixpath.basename(p), []).append(i)

    def __call__(self, file_name: str) -> int | None:
        p = _norm_path(file_name)
        if p in self.exact:
            return self.exact[p]
        hits = [self.exact[p[k + 1:]] for k, c in enumerate(p) if c == "/" and p[k + 1:] in self.exact]
        if len(hits) == 1:
            return hits[0]
        base = self.by_base.get(posixpath.basename(p), [])
        return base[0] if len(base) == 1 else None


def load_json(path: str, what: str) -> dict:
    """Read and check a COCO dataset file (``what``: "GT" or "PRED"; exports.parse_coco, with the
    file names of other tools allowed) or, for ``what`` "prompt", a prompt file
    (exports.read_prompts); EvalError naming the file if missing or malformed."""
    from exports._io import read_json
    try:
        data = read_json(path, f"{what} file")
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None
    return _checked(data, path, what)


def _checked(data, path: str, what: str) -> dict:
    """load_json's checks on the loaded JSON ``data`` of file ``path``."""
    from exports.coco import parse_coco
    from exports.prompts import read_prompts
    try:
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "categories", "annotations")):
            raise EvalError(f"{what} file {path} is not a COCO dataset (needs images, categories, annotations lists)")
        if what == "prompt":
            read_prompts(path)
        else:
            parse_coco(data, source=f"{what} file {path}", strict_names=False)
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None
    if what == "GT":   # pycocotools indexes GT objects by id: a repeated id loses one silently
        seen = set()
        for n, a in enumerate(data["annotations"]):
            i = a.get("id")
            if isinstance(i, bool) or not isinstance(i, int) or i in seen:
                raise EvalError(f"GT file {path}: annotations[{n}]: 'id' must be an integer of its own, got {i!r}")
            seen.add(i)
    return data


def load_pred(path: str, gt: dict) -> dict:
    """PRED as a COCO dataset: a COCO file (load_json), or a pycocotools results list
    ``[{"image_id" | "file_name", "category_id" | "category_name", "bbox", "score"}, ...]`` whose
    ids are GT's (as other detectors write them), turned into a dataset over GT's images and
    categories. EvalError naming the file and the entry for a bad list."""
    from exports._io import read_json
    try:
        data = read_json(path, "PRED file")
    except (OSError, ValueError) as e:
        raise EvalError(str(e)) from None
    if not isinstance(data, list):
        return _checked(data, path, "PRED")
    images = {im["id"]: im for im in gt["images"]}
    by_name = {im["file_name"]: im["id"] for im in gt["images"]}
    cats = {c["id"]: c for c in gt["categories"]}
    cat_by_name = {_norm_name(c["name"]): c["id"] for c in gt["categories"]}
    anns = []
    for n, r in enumerate(data):
        where = f"PRED file {path}: results[{n}]"
        if not isinstance(r, dict):
            raise EvalError(f"{where}: not a COCO dataset, nor a results list of objects (got {r!r})")
        img = by_name.get(r["file_name"]) if "file_name" in r else r.get("image_id")
        cat = cat_by_name.get(_norm_name(r["category_name"])) if "category_name" in r else r.get("category_id")
        if isinstance(img, bool) or img not in images:
            raise EvalError(f"{where}: no GT image with image_id/file_name "
                            f"{r.get('file_name', r.get('image_id'))!r}")
        if isinstance(cat, bool) or cat not in cats:
            raise EvalError(f"{where}: no GT category with category_id/category_name "
                            f"{r.get('category_name', r.get('category_id'))!r}")
        box, score = r.get("bbox"), r.get("score")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
                or box[2] <= 0 or box[3] <= 0):
            raise EvalError(f"{where}: 'bbox' must be [x, y, w, h] with w, h > 0, got {box!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            raise EvalError(f"{where}: 'score' must be a number from 0 to 1, got {score!r}")
        anns.append({"id": n + 1, "image_id": img, "category_id": cat, "bbox": [float(v) for v in box],
                     "area": float(box[2] * box[3]), "iscrowd": 0, "score": float(score)})
    return {"images": [dict(im) for im in images.values()], "categories": [dict(c) for c in cats.values()],
            "annotations": anns}


def _iou_many(box, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xywh box with (N, 4) xywh boxes -> (N,)."""
    iw = np.clip(np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _iou_xywh(a, b) -> float:
    return float(_iou_many(a, np.asarray([b], float))[0])


def predictions(gt: dict, pred: dict) -> tuple[list[tuple[int, int, list[float], float]], dict]:
    """PRED annotations mapped onto GT ids: list of (gt_image_id, gt_category_id, bbox xywh, score)."""
    match = ImageMatcher(gt["images"])
    gt_cat = {_norm_name(c["name"]): c["id"] for c in gt["categories"]}
    img_map, by_gt = {}, {}
    gt_size = {im["id"]: (im.get("width"), im.get("height")) for im in gt["images"]}
    stats = {"pred_images_unmatched": 0, "unknown_categories": [], "dets_dropped": 0, "dets_unscored": 0,
             "pred_images_merged": [], "size_mismatches": []}
    for im in pred["images"]:
        gid = match(im.get("file_name", ""))
        if gid is None:
            stats["pred_images_unmatched"] += 1
        else:
            img_map[im["id"]] = gid
            if gid in by_gt:   # as shared/tools/score.py: detections merged, reported
                stats["pred_images_merged"].append([by_gt[gid], im["file_name"]])
            by_gt.setdefault(gid, im["file_name"])
            size = (im.get("width"), im.get("height"))
            if None not in size + gt_size[gid] and size != gt_size[gid]:   # boxes in another frame or scale
                stats["size_mismatches"].append([im["file_name"], list(size), list(gt_size[gid])])
    cat_map = {}
    for c in pred["categories"]:
        gcid = gt_cat.get(_norm_name(c.get("name", "")))
        if gcid is None:
            stats["unknown_categories"].append(c.get("name"))
        else:
            cat_map[c["id"]] = gcid
    dets = []
    for a in pred["annotations"]:
        gid, cid, b = img_map.get(a.get("image_id")), cat_map.get(a.get("category_id")), a.get("bbox")
        if gid is None or cid is None or not b or len(b) != 4:
            stats["dets_dropped"] += 1
            continue
        score = a.get("score")
        stats["dets_unscored"] += score is None
        dets.append((gid, cid, [float(v) for v in b], 1.0 if score is None else float(score)))
    stats["images_matched"] = len(set(img_map.values()))
    stats["gt_images_missing"] = len(gt["images"]) - stats["images_matched"]
    return dets, stats


def exemplar_gt_ids(gt: dict, prompts: dict) -> set[int]:
    """GT annotation ids that are positive box exemplars of a prompt file.

    ``gt_ann_id`` is trusted when it names a GT annotation of the same image and category;
    otherwise the exemplar takes the best GT box of its image and category with IoU > 0.9.
    """
    match = ImageMatcher(gt["images"])
    gt_cat = {_norm_name(c["name"]): c["id"] for c in gt["categories"]}
    p_img = {im["id"]: match(im.get("file_name", "")) for im in prompts.get("images", [])}
    p_cat = {c["id"]: gt_cat.get(_norm_name(c.get("name", ""))) for c in prompts.get("categories", [])}
    gt_by_id = {a["id"]: a for a in gt["annotations"]}
    by_key: dict[tuple, list[dict]] = {}
    for a in gt["annotations"]:
        by_key.setdefault((a["image_id"], a["category_id"]), []).append(a)
    out = set()
    for e in prompts.get("annotations", []):
        box = e.get("bbox")
        if e.get("negative") or not box or len(box) != 4:
            continue
        key = (p_img.get(e.get("image_id")), p_cat.get(e.get("category_id")))
        if None in key:
            continue
        g = gt_by_id.get(e.get("gt_ann_id"))
        if g is not None and (g["image_id"], g["category_id"]) == key:
            out.add(g["id"])
            continue
        best = max(by_key.get(key, []), key=lambda a: _iou_xywh(a["bbox"], box), default=None)
        if best is not None and _iou_xywh(best["bbox"], box) > EXEMPLAR_IOU:
            out.add(best["id"])
    return out


def coco_ap(gt: dict, dets: list, max_dets: int, ignore_ids: set[int]) -> dict:
    """AP, AP50, AP75 (means over categories with GT, from COCOeval precision) and AP50 per category."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cats = sorted(gt["categories"], key=lambda c: c["id"])
    images = [{"id": im["id"], "width": im.get("width"), "height": im.get("height")} for im in gt["images"]]
    gt_anns = []
    for a in gt["annotations"]:
        b = [float(v) for v in a["bbox"]]
        gt_anns.append({"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": b,
                        "area": float(a.get("area", b[2] * b[3])),
                        "iscrowd": 1 if (a["id"] in ignore_ids or a.get("iscrowd")) else 0})
    dt_anns = [{"id": k, "image_id": g, "category_id": c, "bbox": b, "score": s, "area": b[2] * b[3], "iscrowd": 0}
               for k, (g, c, b, s) in enumerate(dets, start=1)
               if all(math.isfinite(v) for v in b) and b[2] > 0 and b[3] > 0]
    scored = {a["category_id"] for a in gt_anns if not a["iscrowd"]}   # AP is 0 where nothing was detected
    result = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0,
              "AP50_per_category": {c["name"]: 0.0 if c["id"] in scored else None for c in cats}}
    if not dt_anns or not gt_anns:
        return result
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "categories": cats, "annotations": gt_anns}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "categories": cats, "annotations": dt_anns}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = [im["id"] for im in images]
        ev.params.catIds = [c["id"] for c in cats]
        ev.params.maxDets = [int(max_dets)]
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, 0]  # (IoU thresholds, recall points, categories); -1 = no GT

    def mean(x):
        x = x[x > -1]
        return float(x.mean()) if x.size else 0.0

    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(ev.params.iouThrs - 0.75)))
    result.update(AP=mean(prec), AP50=mean(prec[t50]), AP75=mean(prec[t75]))
    for k, c in enumerate(cats):
        has = (prec[t50, :, k] > -1).any()
        result["AP50_per_category"][c["name"]] = mean(prec[t50, :, k]) if has else None
    return result


def error_breakdown(gt: dict, dets: list, max_dets: int, ignore_ids: set[int], near: float = 0.1) -> dict:
    """What the AP50 misses are made of (oracles in the spirit of TIDE): AP50 once every detection at
    IoU `near`..0.5 with a GT object of its class is moved onto that object ("localisation"), AP50
    once every detection at IoU < `near` with all GT objects of its class is removed ("background"),
    and the scored GT objects that no detection reaches at IoU >= `near` at any score ("missed")."""
    gt_boxes: dict[tuple, list] = {}
    for a in gt["annotations"]:
        gt_boxes.setdefault((a["image_id"], a["category_id"]), []).append(a)
    arrays = {k: np.array([a["bbox"] for a in v], float) for k, v in gt_boxes.items()}
    moved, kept, reached = [], [], set()
    for g, c, b, s in dets:
        boxes = arrays.get((g, c))
        iou = _iou_many(b, boxes) if boxes is not None else np.zeros(1)
        j = int(np.argmax(iou))
        if iou[j] < near:   # background: dropped from `kept`, unchanged in `moved`
            moved.append((g, c, b, s))
            continue
        reached.update(a["id"] for a, o in zip(gt_boxes[(g, c)], iou) if o >= near)
        kept.append((g, c, b, s))
        moved.append((g, c, [float(v) for v in boxes[j]], s) if iou[j] < 0.5 else (g, c, b, s))
    scored = [a["id"] for a in gt["annotations"] if a["id"] not in ignore_ids and not a.get("iscrowd")]
    return {"AP50_localisation_fixed": coco_ap(gt, moved, max_dets, ignore_ids)["AP50"],
            "AP50_background_removed": coco_ap(gt, kept, max_dets, ignore_ids)["AP50"],
            "missed": sum(i not in reached for i in scored), "scored_objects": len(scored)}


def counting(gt: dict, dets: list, threshold: float) -> dict:
    """Counting error over (image, category) pairs with a non-zero GT or predicted count."""
    gt_n: dict[tuple, int] = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd"):
            gt_n[(a["image_id"], a["category_id"])] = gt_n.get((a["image_id"], a["category_id"]), 0) + 1
    pr_n: dict[tuple, int] = {}
    for g, c, _, s in dets:
        if s >= threshold:
            pr_n[(g, c)] = pr_n.get((g, c), 0) + 1
    keys = sorted(set(gt_n) | set(pr_n))
    err = np.array([pr_n.get(k, 0) - gt_n.get(k, 0) for k in keys], float)
    rel = [abs(pr_n.get(k, 0) - gt_n[k]) / gt_n[k] for k in keys if gt_n.get(k, 0) > 0]
    return {"count_threshold": threshold,
            "count_mae": float(np.abs(err).mean()) if keys else 0.0,
            "count_rmse": float(np.sqrt((err ** 2).mean())) if keys else 0.0,
            "count_nae": float(np.mean(rel)) if rel else None,
            "count_gt_total": int(sum(gt_n.values())), "count_pred_total": int(sum(pr_n.values()))}


def evaluate(gt: dict, pred: dict, *, exemplars: dict | None = None, score_threshold: float | None = None,
             max_dets: int = 1000, errors: bool = False) -> dict:
    """All metrics for loaded COCO dicts. ``exemplars``: a loaded prompt file for --exclude-exemplars.
    ``errors``: add :func:`error_breakdown` under "errors".
    EvalError when PRED has images but none matches a GT image, or categories but none is a GT one
    (nothing could be scored: a renamed folder or class, not an AP of 0)."""
    dets, stats = predictions(gt, pred)
    if pred["images"] and not stats["images_matched"]:
        raise EvalError(f"none of the {len(pred['images'])} PRED images matches a GT image by file_name "
                        f"(PRED has e.g. {pred['images'][0].get('file_name')!r}, GT "
                        f"{gt['images'][0]['file_name'] if gt['images'] else 'no image'!r})")
    if pred["categories"] and len(stats["unknown_categories"]) == len(pred["categories"]):
        raise EvalError(f"none of the PRED categories {stats['unknown_categories']} is a GT category "
                        f"{[c['name'] for c in gt['categories']]} (matched by name)")
    if score_threshold is None:
        score_threshold = (pred.get("info") or {}).get("score_threshold")
    threshold = 0.5 if score_threshold is None else float(score_threshold)
    ignore = exemplar_gt_ids(gt, exemplars) if exemplars is not None else set()
    out = {"images": len(gt["images"]), **stats, "num_dets": len(dets), "max_dets": max_dets}
    if exemplars is not None:
        out["exemplars_excluded"] = len(ignore)
    out.update(coco_ap(gt, dets, max_dets, ignore))
    out.update(counting(gt, dets, threshold))
    if errors:
        out["errors"] = error_breakdown(gt, dets, max_dets, ignore)
    return out


def warnings(r: dict) -> list[str]:
    """What :func:`evaluate` matched only in part (also shown by --json runs, on stderr)."""
    out = []
    if r["unknown_categories"]:
        out.append(f"PRED categories not in GT, ignored: {', '.join(map(str, r['unknown_categories']))}")
    if r["pred_images_unmatched"]:
        out.append(f"{r['pred_images_unmatched']} PRED image(s) not in GT, ignored")
    for first, other in r["pred_images_merged"]:
        out.append(f"PRED images {first!r} and {other!r} match the same GT image; their detections are merged")
    if r["size_mismatches"]:
        name, size, gt_size = r["size_mismatches"][0]
        out.append(f"{len(r['size_mismatches'])} PRED image(s) differ in size from GT (e.g. {name!r}: "
                   f"{size[0]}x{size[1]} against {gt_size[0]}x{gt_size[1]}; a resized copy, or EXIF "
                   f"orientation applied on one side only?); their boxes are scored as they are")
    if r["gt_images_missing"]:
        out.append(f"{r['gt_images_missing']} GT image(s) not in PRED, scored as holding no detection")
    if "exemplars_excluded" in r and not r["exemplars_excluded"]:
        out.append("no exemplar of the prompt file matches a GT object")
    if r.get("dets_unscored"):
        out.append(f"{r['dets_unscored']} PRED box(es) have no 'score' and count as score 1: AP then "
                   f"follows the file's order, not the model's confidence (labels rather than detections?)")
    return out


def format_table(r: dict) -> str:
    """Human-readable summary of :func:`evaluate`'s result."""
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"images {r['images']} (matched {r['images_matched']}), detections {r['num_dets']}, "
             f"maxDets {r['max_dets']}" + (f", exemplars excluded {r['exemplars_excluded']}"
                                          if "exemplars_excluded" in r else ""),
             f"AP {f(r['AP'])}   AP50 {f(r['AP50'])}   AP75 {f(r['AP75'])}",
             f"count error @ score >= {r['count_threshold']:g}: MAE {f(r['count_mae'])}  RMSE {f(r['count_rmse'])}"
             f"  NAE {f(r['count_nae'])}  (predicted {r['count_pred_total']}, true {r['count_gt_total']})"]
    lines += [f"  AP50 {name}: {f(v)}" for name, v in r["AP50_per_category"].items()]
    if "errors" in r:
        e = r["errors"]
        lines += [f"AP50 if boxes at IoU 0.1-0.5 with an object of their class were moved onto it: "
                  f"{f(e['AP50_localisation_fixed'])}",
                  f"AP50 if boxes at IoU < 0.1 with every object of their class were removed: "
                  f"{f(e['AP50_background_removed'])}",
                  f"objects no box reaches at IoU >= 0.1: {e['missed']} of {e['scored_objects']}"]
    return "\n".join(lines)


def score_arg(text: str) -> float:
    """argparse type of a score threshold: a number from 0 to 1 (scores are probabilities)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"a score threshold is a number from 0 to 1, got {text!r}")
    return v


def positive_int_arg(text: str) -> int:
    """argparse type of a count: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="app.py eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gt", metavar="GT.json")
    ap.add_argument("pred", metavar="PRED.json")
    ap.add_argument("--exclude-exemplars", metavar="PROMPTS.json",
                    help="per-image prompt file whose exemplar objects are left out of AP")
    ap.add_argument("--score-threshold", type=score_arg, default=None,
                    help="counting threshold (default: PRED info.score_threshold, else 0.5)")
    ap.add_argument("--max-dets", type=positive_int_arg, default=1000, help="detections per image and category (default 1000)")
    ap.add_argument("--errors", action="store_true",
                    help="also break the AP50 misses down: localisation, background boxes, missed objects")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    a = ap.parse_args(argv)
    try:
        gt = load_json(a.gt, "GT")
        pred = load_pred(a.pred, gt)
        ex = load_json(a.exclude_exemplars, "prompt") if a.exclude_exemplars else None
        try:
            r = evaluate(gt, pred, exemplars=ex, score_threshold=a.score_threshold, max_dets=a.max_dets,
                         errors=a.errors)
        except EvalError as e:
            raise EvalError(f"{a.pred} against {a.gt}: {e}") from None
    except EvalError as e:
        print(f"app.py eval: error: {e}", file=sys.stderr)
        return 2
    for warning in warnings(r):
        print(f"app.py eval: warning: {warning}", file=sys.stderr)
    print(json.dumps(r) if a.json else format_table(r))
    return 0
