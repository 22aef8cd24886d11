"""Benchmark: how much of the exemplars' box-size error carries over to the other objects of an image
(the estimate behind trex2.predictor.EXEMPLAR_SIZE_SHRINK).

    python tests/bench_exemplar_size.py [--train-root ../shared/data/train] [--images 12] [--threads 2]

For the first --images labelled images of each train set, each category with at least 5 boxes
there is prompted with 3 of them (seed 0) and detected (flip on, boxes scoring >= 0.2). Each box
is matched to the detection it overlaps most (IoU > 0.5), and its size error is log(labelled /
detected) for the width and for the height. Per image and category: x = the mean error over the
exemplars, y = the mean over the other objects. Prints beta = cov(x, y) / var(x) (widths and
heights pooled), the share of the exemplars' mean error that is, on average, also the others'
error: the least-squares factor to apply to it. Uses train images only (never the dev sets).
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
from trex2.box_ops import box_iou  # noqa: E402
from trex2.image_io import load_image  # noqa: E402

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    ap.add_argument("--images", type=int, default=12, help="labelled images per train set")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = trex2.Predictor(trex2.load_model(args.weights), flip=True)
    rng = random.Random(0)
    xs, ys = [], []
    for name in sorted(os.listdir(args.train_root)):
        gt_path = os.path.join(args.train_root, name, "gt.json")
        if not os.path.isfile(gt_path):
            continue
        gt = json.load(open(gt_path))
        boxes: dict[int, dict[int, list]] = {}
        for a in gt["annotations"]:
            x, y, w, h = a["bbox"]
            if w > 1 and h > 1:
                boxes.setdefault(a["image_id"], {}).setdefault(a["category_id"], []).append([x, y, x + w, y + h])
        for im in [im for im in gt["images"] if im["id"] in boxes][:args.images]:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
