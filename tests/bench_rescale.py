"""Benchmark: the second look at each image at its objects' own scale (`label`'s rescale rule,
trex2.Predictor.rescale_classes; off with `--no-rescale`).

    python tests/bench_rescale.py [--train-root ../shared/data/train] [--targets 40] [--zoom 1 2]
                                  [--sets NAME ...] [--no-flip] [--threads 1]

Cross-image runs on each train set, prompts as in bench_flip (up to 3 labelled boxes of each
category from the 4 images training holds out) and the next --targets images as targets. With
--zoom Z > 1 each target image is replaced by its centre crop of 1/Z of each side enlarged back
to the image's size (objects Z times larger than the exemplars; objects less than half inside are
dropped), while the prompt images stay as they are: the objects' scale then differs between the
prompt images and the targets, as it does between photos of everyday objects. The targets were
trained on, by both arms alike: the figures compare the two modes, they are not a held-out score.
Prints AP / AP50 / AP75 / counting MAE (app.evaluate) and encode_image calls per target image
(the 4 prompt images' included), rescale off and on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402
from trex2.data import train_sets  # noqa: E402
from bench_flip import TRAIN, make_set  # noqa: E402


def zoom_targets(images: str, truth: dict, out: str, zoom: float) -> tuple[str, dict]:
    """Centre crops (1/zoom of each side) of the target images, enlarged back to their size, in
    `out` -> (folder, ground truth of the crops)."""
    os.makedirs(out)
    anns = {}
    for a in truth["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    kept = []
    for rec in truth["images"]:
        W, H = rec["width"], rec["height"]
        cw, ch = W / zoom, H / zoom
        x0, y0 = (W - cw) / 2, (H - ch) / 2
        im = Image.open(os.path.join(images, rec["file_name"])).convert("RGB")
        im.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch))).resize((W, H), Image.BICUBIC).save(
            os.path.join(out, os.path.splitext(rec["file_name"])[0] + ".png"))
        for a in anns.get(rec["id"], []):
            x, y, w, h = a["bbox"]
            bx0, by0, bx1, by1 = max(x, x0), max(y, y0), min(x + w, x0 + cw), min(y + h, y0 + ch)
            if bx1 > bx0 and by1 > by0 and (bx1 - bx0) * (by1 - by0) >= 0.5 * w * h:
                box = [(bx0 - x0) * zoom, (by0 - y0) * zoom, (bx1 - bx0) * zoom, (by1 - by0) * zoom]
                kept.append(dict(a, bbox=box, area=box[2] * box[3]))
    images_out = [dict(rec, file_name=os.path.splitext(rec["file_name"])[0] + ".png") for rec in truth["images"]]
    return out, {"images": images_out, "annotations": kept, "categories": truth["categories"]}


class Counting:
    """A predictor wrapper that counts encode_image calls."""

    def __init__(self, inner):
        self.inner, self.model, self.encodes = inner, inner.model, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_image(self, image, key=None, size=None):
        self.encodes += 1
        return self.inner.encode_image(image, key=key, size=size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    ap.add_argument("--targets", type=int, default=40, help="target images per set")
    ap.add_argument("--zoom", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--sets", nargs="+", default=None, help="train sets (default: all)")
    ap.add_argument("--no-flip", action="store_true")
    add_model_args(ap)
    args = ap.parse_args(argv)
    model = load_model(args)
    sets = args.sets or [name for name, _ in train_sets(args.train_root)]
    print(f"{'set':14s} {'zoom':>4s} {'rescale':8s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'MAE':>6s} {'encodes/img':>11s}")
    with tempfile.TemporaryDirectory(prefix="bench-rescale-") as tmp:
        for name in sets:
            images, prompts, truth = make_set(os.path.join(args.train_root, name), os.path.join(tmp, name),
                                              args.targets)
            for zoom in args.zoom:
                folder, gt = images, truth
                if zoom != 1:
                    folder, gt = zoom_targets(images, truth, os.path.join(tmp, name, f"zoom{zoom:g}"), zoom)
                for rescale in (False, True):
                    out = os.path.join(tmp, f"{name}-{zoom:g}-{rescale}.json")
                    pred = Counting(trex2.Predictor(model, flip=not args.no_flip))
                    batch.run(folder, prompts, out, predictor=pred, progress=False, warn=lambda m: None,
                              rescale=rescale)
                    r = evaluate(gt, json.load(open(out)))
                    n = len(gt["images"])
                    print(f"{name:14s} {zoom:4g} {'on' if rescale else 'off':8s} {r['AP']:6.3f} {r['AP50']:6.3f} "
                          f"{r['AP75']:6.3f} {r['count_mae']:6.2f} {pred.encodes / n:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
