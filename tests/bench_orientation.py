"""Benchmark: how much the detector depends on the targets' orientation and framing.

    python tests/bench_orientation.py [--set ../shared/data/dev/bccd-val ...]
                                      [--views upright turn90 turn180 portrait landscape]
                                      [--no-flip] [--threads 1] [--weights FILE]

Cross-image runs (the set's prompts-cross-image/prompts.json, prompt images left as they are) on
copies of the set's images:
  upright    the images as they are;
  turn90     each image turned 90 degrees counter-clockwise (a landscape image becomes portrait);
  turn180    turned 180 degrees (the frame's shape kept);
  portrait   its top-left crop of 3/4 x 1 of the short side (a 3:4 portrait frame);
  landscape  its top-left crop of 1 x 3/4 of the short side (4:3, the same area and scale).
Boxes are turned with the images; a crop keeps the objects with at least half their area inside,
clipped. Prints AP / AP50 / AP75 and the counting MAE (app.evaluate) per set and view. The copies
are written to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402
from trex2.data import turn_boxes  # noqa: E402
from trex2.image_io import load_image  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dev")
VIEWS = ("upright", "turn90", "turn180", "portrait", "landscape")


def turn_box(box, w: float, h: float, quarter_turns: int) -> list[float]:
    """COCO [x, y, w, h] in a w x h image -> the same box after counter-clockwise quarter turns of
    the image (trex2.data.turn_boxes)."""
    x, y, bw, bh = box
    x0, y0, x1, y1 = turn_boxes(np.array([[x, y, x + bw, y + bh]]), w, h, quarter_turns)[0].tolist()
    return [x0, y0, x1 - x0, y1 - y0]


def crop_window(w: int, h: int, view: str) -> tuple[int, int]:
    """(crop width, crop height) of the portrait / landscape view: 3/4 x 1 of the short side."""
    s = min(w, h)
    t = round(0.75 * s)
    return (t, s) if view == "portrait" else (s, t)


def make_view(set_dir: str, out: str, view: str) -> tuple[str, dict]:
    """Copies of <set_dir>/images in the view under `out` -> (image folder, ground truth)."""
    gt = json.load(open(os.path.join(set_dir, "gt.json")))
    folder = os.path.join(out, "images")
    os.makedirs(folder)
    sizes, images = {}, []
    for rec in gt["images"]:
        name = os.path.basename(rec["file_name"])
        im = Image.fromarray(load_image(os.path.join(set_dir, "images", name)))
        w, h = im.size
        sizes[rec["id"]] = (w, h)
        if view == "turn90":
            im = im.transpose(Image.ROTATE_90)
        elif view == "turn180":
            im = im.transpose(Image.ROTATE_180)
        elif view in ("portrait", "landscape"):
            im = im.crop((0, 0) + crop_window(w, h, view))
        stem = os.path.splitext(name)[0] + ".png"   # lossless: the views differ only in framing
        im.save(os.path.join(folder, stem))
        images.append(dict(rec, file_name=stem, width=im.size[0], height=im.size[1]))
    anns = []
    for a in gt["annotations"]:
        w, h = sizes[a["image_id"]]
        box = list(a["bbox"])
        if view in ("turn90", "turn180"):
            box = turn_box(box, w, h, 1 if view == "turn90" else 2)
        elif view in ("portrait", "landscape"):
            cw, ch = crop_window(w, h, view)
            x, y, bw, bh = box
            x1, y1 = min(x + bw, cw), min(y + bh, ch)
            if x1 <= x or y1 <= y or (x1 - x) * (y1 - y) < 0.5 * bw * bh:
                continue
            box = [x, y, x1 - x, y1 - y]
        anns.append(dict(a, bbox=box, area=box[2] * box[3]))
    return folder, {"images": images, "annotations": anns, "categories": gt["categories"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", nargs="+", default=[os.path.join(DEV, "bccd-val"), os.path.join(DEV, "tomato-val")])
    ap.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS))
    ap.add_argument("--no-flip", action="store_true")
    add_model_args(ap)
    args = ap.parse_args(argv)
    model = load_model(args)
    print(f"{'set':14s} {'view':10s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'MAE':>6s}")
    with tempfile.TemporaryDirectory(prefix="bench-orientation-") as tmp:
        for set_dir in args.set:
            name = os.path.basename(os.path.normpath(set_dir))
            prompts = os.path.join(set_dir, "prompts-cross-image", "prompts.json")
            for view in args.views:
                folder, gt = make_view(set_dir, os.path.join(tmp, name, view), view)
                out = os.path.join(tmp, f"{name}-{view}.json")
                batch.run(folder, prompts, out, predictor=trex2.Predictor(model, flip=not args.no_flip),
                          progress=False, warn=lambda m: None)
                r = evaluate(gt, json.load(open(out)))
                print(f"{name:14s} {view:10s} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP75']:6.3f} "
                      f"{r['count_mae']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
