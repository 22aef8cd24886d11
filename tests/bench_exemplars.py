"""Benchmark: prompts as labels (trex2.predictor.respect_exemplars), on the train sets only.

    python tests/bench_exemplars.py [--train-root ../shared/data/train] [--images 12] [--threads 2]

1. Size carry-over (the estimate behind trex2.predictor.EXEMPLAR_SIZE_SHRINK).
For the first --images labelled images of each train set, each category with at least 5 boxes
there is prompted with 3 of them (seed 0) and detected (flip on, boxes scoring >= 0.2). Each box
is matched to the detection it overlaps most (IoU > 0.5), and its size error is log(labelled /
detected) for the width and for the height. Per image and category: x = the mean error over the
exemplars, y = the mean over the other objects. Prints beta = cov(x, y) / var(x) (widths and
heights pooled), the share of the exemplars' mean error that is, on average, also the others'
error: the least-squares factor to apply to it.

2. Effect on the held-out images (the first 4 labelled of each set, never trained on): each
category with at least 4 boxes there is prompted with 3 of them (seed 0, flip on); AP50 and AP75
(all-point, greedy matching) of the other objects, detections on the exemplars (IoU >= 0.5 with
one) ignored, without and with respect_exemplars.

3. More exemplars (the app's E key makes a found box one): on the same images, each category
with at least 7 boxes there is prompted with the same 3 and with 3 more of its labelled boxes
(seed 1); AP50 / AP75 of the objects that are neither, with respect_exemplars.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from trex2.box_ops import box_iou  # noqa: E402
from trex2.image_io import load_image  # noqa: E402
from trex2.predictor import respect_exemplars  # noqa: E402
from trex2.train import HOLDOUT  # noqa: E402

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


def size_errors(boxes: np.ndarray, detected: np.ndarray, which) -> list:
    """[log(w / w_det), log(h / h_det)] of the boxes `which` that a detection matches (IoU > 0.5)."""
    if not len(detected):
        return []
    overlap = box_iou(torch.as_tensor(boxes), torch.as_tensor(detected))[0].numpy()
    out = []
    for i in which:
        j = int(overlap[i].argmax())
        if overlap[i, j] > 0.5:
            b, d = boxes[i], detected[j]
            out.append(np.log((b[2:] - b[:2]) / (d[2:] - d[:2])))
    return out


def read_boxes(set_dir: str) -> tuple[dict, list]:
    """{image id: {category id: [xyxy, ...]}} of a train set's boxes (> 1 px), and its labelled
    images in file order."""
    gt = json.load(open(os.path.join(set_dir, "gt.json")))
    boxes: dict[int, dict[int, list]] = {}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        if w > 1 and h > 1:
            boxes.setdefault(a["image_id"], {}).setdefault(a["category_id"], []).append([x, y, x + w, y + h])
    return boxes, [im for im in gt["images"] if im["id"] in boxes]


def ranked_hits(xyxy: np.ndarray, scores: np.ndarray, exemplars: np.ndarray, targets: np.ndarray) -> list:
    """Detections not on an exemplar (IoU < 0.5), best first -> [(score, hit at IoU 0.5, at 0.75)]
    by greedy matching to the targets."""
    if len(xyxy):
        off = box_iou(torch.as_tensor(xyxy), torch.as_tensor(exemplars))[0].numpy().max(1) < 0.5
        xyxy, scores = xyxy[off], scores[off]
    order = np.argsort(-scores, kind="stable")
    xyxy, scores = xyxy[order], scores[order]
    overlap = (box_iou(torch.as_tensor(xyxy), torch.as_tensor(targets))[0].numpy()
               if len(xyxy) and len(targets) else np.zeros((len(xyxy), len(targets))))
    hit = np.zeros((len(xyxy), 2), bool)
    for k, t in enumerate((0.5, 0.75)):
        free = np.ones(len(targets), bool)
        for j in range(len(xyxy)):
            cand = np.where(free & (overlap[j] >= t), overlap[j], -1.0)
            if len(cand) and cand.max() >= t:
                free[cand.argmax()] = False
                hit[j, k] = True
    return [(float(s), bool(a), bool(b)) for s, (a, b) in zip(scores, hit)]


def average_precision(rows: list, n_targets: int, k: int) -> float:
    """All-point AP of pooled (score, hit50, hit75) rows at hit column k (1: IoU 0.5, 2: 0.75)."""
    if not rows or not n_targets:
        return 0.0
    rows = sorted(rows, key=lambda r: -r[0])
    h = np.array([r[k] for r in rows], bool)
    tp, fp = np.cumsum(h), np.cumsum(~h)
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], tp / n_targets])) * precision))


def held_out_effect(predictor, root: str, sets: list[str]) -> None:
    """Parts 2 and 3 of the docstring: AP50 / AP75 without and with respect_exemplars, and with
    3 or 6 exemplars."""
    rng, extra = random.Random(0), random.Random(1)
    rows = {"without": [], "with": []}
    more = {3: [], 6: []}
    n_targets = n_more = 0
    for name in sets:
        boxes, images = read_boxes(os.path.join(root, name))
        for im in images[:HOLDOUT]:
            emb = predictor.encode_image(load_image(os.path.join(root, name, "images", im["file_name"])))
            for _, b in sorted(boxes[im["id"]].items()):
                b = np.array(b, np.float32)
                if len(b) < 4:
                    continue
                pick = rng.sample(range(len(b)), 3)
                exemplars, targets = b[pick], np.delete(b, pick, 0)
                n_targets += len(targets)
                d = predictor.detect(emb, {"c": predictor.embed_prompts([(emb, exemplars)])}, score_threshold=0.0)
                rows["without"] += ranked_hits(d.xyxy, d.confidence, exemplars, targets)
                r = respect_exemplars(d, {"c": exemplars}, names=["c"])
                rows["with"] += ranked_hits(r.xyxy, r.confidence, exemplars, targets)
                if len(b) >= 7:
                    six = pick + extra.sample([i for i in range(len(b)) if i not in pick], 3)
                    ex6, rest = b[six], np.delete(b, six, 0)
                    n_more += len(rest)
                    more[3] += ranked_hits(r.xyxy, r.confidence, ex6, rest)
                    d6 = predictor.detect(emb, {"c": predictor.embed_prompts([(emb, ex6)])}, score_threshold=0.0)
                    r6 = respect_exemplars(d6, {"c": ex6}, names=["c"])
                    more[6] += ranked_hits(r6.xyxy, r6.confidence, ex6, rest)
    print(f"\nheld-out images, per-image prompts, {n_targets} other objects:")
    for arm, r in rows.items():
        print(f"  {arm:7s} respect_exemplars: AP50 {average_precision(r, n_targets, 1):.3f}  "
              f"AP75 {average_precision(r, n_targets, 2):.3f}")
    print(f"categories with >= 7 objects there, {n_more} objects that are not one of 6 exemplars:")
    for k, r in more.items():
        print(f"  {k} exemplars: AP50 {average_precision(r, n_more, 1):.3f}  AP75 {average_precision(r, n_more, 2):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    ap.add_argument("--images", type=int, default=12, help="labelled images per train set")
    add_model_args(ap)
    args = ap.parse_args(argv)
    predictor = trex2.Predictor(load_model(args), flip=True)
    rng = random.Random(0)
    xs, ys = [], []
    sets = sorted(d for d in os.listdir(args.train_root)
                  if os.path.isfile(os.path.join(args.train_root, d, "gt.json")))
    for name in sets:
        boxes, images = read_boxes(os.path.join(args.train_root, name))
        for im in images[:args.images]:
            emb = predictor.encode_image(load_image(os.path.join(args.train_root, name, "images", im["file_name"])))
            for _, b in sorted(boxes[im["id"]].items()):
                b = np.array(b, np.float32)
                if len(b) < 5:
                    continue
                pick = rng.sample(range(len(b)), 3)
                d = predictor.detect(emb, {"c": predictor.embed_prompts([(emb, b[pick])])}, score_threshold=0.2)
                ex = size_errors(b, d.xyxy, pick)
                other = size_errors(b, d.xyxy, [i for i in range(len(b)) if i not in pick])
                if len(ex) >= 2 and len(other) >= 2:
                    xs.append(np.mean(ex, 0))
                    ys.append(np.mean(other, 0))
        print(f"{name:14s} image-category pairs so far: {len(xs)}", flush=True)
    x, y = np.ravel(xs), np.ravel(ys)
    beta = np.cov(x, y)[0, 1] / x.var(ddof=1)
    print(f"pairs {len(xs)}: beta {beta:.3f}, correlation {np.corrcoef(x, y)[0, 1]:.3f} "
          f"(trex2.predictor.EXEMPLAR_SIZE_SHRINK)")
    held_out_effect(predictor, args.train_root, sets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
