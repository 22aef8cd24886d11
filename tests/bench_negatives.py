"""Benchmark: what a negative prompt ("not this") does, measured on a labelled multi-class set.

    python tests/bench_negatives.py [--set ../shared/data/dev/bccd-val] [--limit N]

For each category C of the set's cross-image prompt file, the class embedding of C's exemplars is
used twice on every image: alone, and with the exemplars of the OTHER categories as negatives (a
user who marks "not these" on the look-alikes). Detections at or above the model's recommended
threshold are matched greedily (IoU >= 0.5) to the ground truth; the script prints, per category,
true positives, false positives that sit on another category's object (the look-alikes a negative
should remove), and other false positives, without and with the negatives.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from exports import read_coco, read_prompts  # noqa: E402
from trex2.box_ops import box_iou, greedy_match  # noqa: E402
from trex2.image_io import load_image  # noqa: E402


def match_counts(dets_xyxy: np.ndarray, same: np.ndarray, other: np.ndarray) -> tuple[int, int, int]:
    """Greedy IoU >= 0.5 matching in score order -> (TP, FP on other-category objects, other FP)."""
    d = torch.as_tensor(dets_xyxy, dtype=torch.float32).reshape(-1, 4)
    match = greedy_match(box_iou(d, torch.as_tensor(same, dtype=torch.float32).reshape(-1, 4))[0])
    iou_other = box_iou(d, torch.as_tensor(other, dtype=torch.float32).reshape(-1, 4))[0]
    on_other = (iou_other.max(1).values >= 0.5 if iou_other.shape[1] else torch.zeros(len(d), dtype=torch.bool))
    tp = int((match >= 0).sum())
    fp_other = int(((match < 0) & on_other).sum())
    fp = len(d) - tp - fp_other
    return tp, fp_other, fp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                   "dev", "bccd-val"))
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    predictor = trex2.Predictor(trex2.load_model(args.weights), cache_size=4)
    thr = predictor.score_threshold
    prompts = read_prompts(os.path.join(args.set, "prompts-cross-image", "prompts.json"))
    gt = read_coco(os.path.join(args.set, "gt.json"))

    def embed(cat, negative_cats=()):
        pos, neg = [], []
        for path in prompts.images():
            emb = predictor.encode_image(load_image(path), key=str(path))
            b = prompts.boxes(path, cat)
            if len(b):
                pos.append((emb, b))
            for other in negative_cats:
                nb = prompts.boxes(path, other)
                if len(nb):
                    neg.append((emb, nb))
        return predictor.embed_prompts(pos, negatives=neg)

    cats = prompts.category_names
    classes = {}
    for c in cats:
        classes[c] = embed(c)
        classes[c + " +neg"] = embed(c, [o for o in cats if o != c])
    totals = {name: np.zeros(3, int) for name in classes}
    records = gt.images[: args.limit] if args.limit else gt.images
    for rec in records:
        emb = predictor.encode_image(load_image(os.path.join(args.set, "images", rec.file_name)))
        dets = predictor.detect(emb, classes, score_threshold=thr, compete=False)  # each class alone
        anns = gt.annotations_for(rec.file_name)
        for name in classes:
            c = name.replace(" +neg", "")
            same = np.array([a.box for a in anns if a.category == c]).reshape(-1, 4)
            other = np.array([a.box for a in anns if a.category != c]).reshape(-1, 4)
            sel = dets.data["class_name"] == name
            order = np.argsort(-dets.confidence[sel])
            totals[name] += match_counts(dets.xyxy[sel][order], same, other)
    print(f"set {args.set}, {len(records)} images, threshold {thr:.3f}; negatives = other categories' "
          f"cross-image exemplars")
    print(f"{'category':<12} {'TP':>6} {'FP look-alike':>14} {'FP other':>9}   {'TP +neg':>7} "
          f"{'FP look-alike +neg':>19} {'FP other +neg':>14}")
    for c in cats:
        a, b = totals[c], totals[c + " +neg"]
        print(f"{c:<12} {a[0]:>6} {a[1]:>14} {a[2]:>9}   {b[0]:>7} {b[1]:>19} {b[2]:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
