"""Benchmark: detections of a class on images that do not contain it ("presence bias").

    python tests/bench_absent.py [--sets ../shared/data/dev/bccd-val ../shared/data/dev/tomato-val]
                                 [--limit 40] [--weights FILE] [--threads 1]

Each category of each set is prompted with its cross-image prompt file and searched on the first
--limit images of the OTHER sets, which hold none of it (a tomato among blood cells). Every box
there is a false positive. Printed per category: on its own set's images (present), the median
of each image's best score and boxes per image at the recommended threshold; on the other sets'
images (absent), the same two figures, the share of images with at least one box at the threshold,
and the 90th percentile of the best score. A model free of presence bias scores absent images
well below present ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from exports import read_coco, read_prompts  # noqa: E402
from trex2.image_io import load_image  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dev")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=[os.path.join(DEV, "bccd-val"), os.path.join(DEV, "tomato-val")])
    ap.add_argument("--limit", type=int, default=40, help="images per set")
    add_model_args(ap)
    args = ap.parse_args(argv)
    if len(args.sets) < 2:
        ap.error("give at least two sets")
    predictor = trex2.Predictor(load_model(args), cache_size=4)
    thr = predictor.score_threshold

    classes, home = {}, {}
    for s in args.sets:
        prompts = read_prompts(os.path.join(s, "prompts-cross-image", "prompts.json"))
        embs = {p: predictor.encode_image(load_image(p), key=str(p)) for p in prompts.images()}  # each once
        for c in prompts.category_names:
            pos = [(e, prompts.boxes(p, c)) for p, e in embs.items()]
            name = f"{os.path.basename(os.path.normpath(s))}/{c}"
            classes[name] = predictor.embed_prompts([(e, b) for e, b in pos if len(b)])
            home[name] = s
    best = {(n, s): [] for n in classes for s in ("present", "absent")}
    count = {k: [] for k in best}
    for s in args.sets:
        gt = read_coco(os.path.join(s, "gt.json"))
        for rec in gt.images[: args.limit]:
            emb = predictor.encode_image(load_image(os.path.join(s, "images", rec.file_name)))
            dets = predictor.detect(emb, classes, compete=False)   # each class on its own
            have = {a.category for a in gt.annotations_for(rec.file_name)}
            for n in classes:
                if home[n] == s and n.split("/", 1)[1] not in have:
                    continue  # a category of this set that this image lacks: neither case
                k = (n, "present" if home[n] == s else "absent")
                conf = dets.confidence[dets.data["class_name"] == n]
                best[k].append(float(conf.max()) if len(conf) else 0.0)
                count[k].append(int((conf >= thr).sum()))
    print(f"threshold {thr:.3f}; up to {args.limit} images per set; absent = the other sets' images")
    print(f"{'class':<22} {'present: best':>14} {'boxes':>6}   {'absent: best':>13} {'p90':>5} "
          f"{'boxes':>6} {'images with a box':>18}")
    for n in classes:
        p, a = (n, "present"), (n, "absent")
        print(f"{n:<22} {np.median(best[p]):>14.3f} {np.mean(count[p]):>6.1f}   {np.median(best[a]):>13.3f} "
              f"{np.percentile(best[a], 90):>5.3f} {np.mean(count[a]):>6.2f} "
              f"{np.mean(np.array(count[a]) > 0):>17.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
