"""Benchmark: small objects and the tiled small-object mode (`label --canvas`).

    python tests/bench_small_objects.py [--set ../shared/data/dev/tomato-val] [--grid 3]
                                        [--canvas 640 auto 1280] [--threads 1]

Builds grid x grid mosaics of a labelled set's images (each mosaic is grid^2 images pasted side
by side: the objects keep their pixel size while the image gets grid times larger, so at the
model's 640 px they shrink grid times), labels them with the set's cross-image prompt file at
each --canvas setting, and prints AP / AP50 / AP75 (pycocotools, app.evaluate), seconds per
mosaic and encodes per mosaic (tiles, plus the prompt images). A fixed canvas applies to the
mosaics; the prompt images are encoded at the same scale (see same_scale). The mosaics are written
to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402


def build_mosaics(set_dir: str, out_dir: str, grid: int) -> str:
    """<set_dir>/gt.json + images -> <out_dir>/images/mosaicNNN.jpg and <out_dir>/gt.json."""
    gt = json.load(open(os.path.join(set_dir, "gt.json")))
    imgs = gt["images"]
    W, H = max(i["width"] for i in imgs), max(i["height"] for i in imgs)
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = {"images": [], "annotations": [], "categories": gt["categories"]}
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    k = grid * grid
    for m in range(len(imgs) // k):
        canvas = Image.new("RGB", (W * grid, H * grid))
        for t, rec in enumerate(imgs[m * k:(m + 1) * k]):
            ox, oy = (t % grid) * W, (t // grid) * H
            canvas.paste(Image.open(os.path.join(set_dir, "images", rec["file_name"])).convert("RGB"), (ox, oy))
            for a in by_image.get(rec["id"], []):
                x, y, w, h = a["bbox"]
                out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": m + 1,
                                           "category_id": a["category_id"], "bbox": [x + ox, y + oy, w, h],
                                           "area": w * h, "iscrowd": 0})
        name = f"mosaic{m + 1:03d}.jpg"
        canvas.save(os.path.join(out_dir, "images", name), quality=95)
        out["images"].append({"id": m + 1, "file_name": name, "width": W * grid, "height": H * grid})
    path = os.path.join(out_dir, "gt.json")
    json.dump(out, open(path, "w"))
    return path


def same_scale(px: int, long_side: int):
    """Canvas policy for a fixed --canvas: the mosaics (long side `long_side`) at `px`, the prompt
    images (the set's own, smaller images) at the same scale, so that exemplars and targets keep
    one size (`label --canvas PX` would enlarge the prompt images to PX too)."""
    return lambda path, hw: px if max(hw) >= long_side else int(-(-px * max(hw) / long_side // 32) * 32)


def label_and_score(predictor, image_dir: str, prompts: str, canvas, gt: dict, out: str) -> tuple[dict, float, int]:
    """`label` image_dir with the prompt file at `canvas` (a --canvas value or a policy), from a
    cold embedding cache -> (app.evaluate metrics against gt, seconds, encodes)."""
    predictor.cache.clear()
    before, t0 = predictor.encode_count, time.perf_counter()
    batch.run(image_dir, prompts, out, predictor=predictor, progress=False, canvas=canvas, warn=lambda m: None)
    dt = time.perf_counter() - t0
    return evaluate(gt, json.load(open(out))), dt, predictor.encode_count - before


def per_category(r: dict) -> str:
    """'AP50: name value ...' of the categories that have ground truth."""
    return "AP50: " + " ".join(f"{c} {v:.3f}" for c, v in r["AP50_per_category"].items() if v is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--set", default=os.path.join(here, "..", "..", "shared", "data", "dev", "tomato-val"))
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--canvas", nargs="+", default=["640", "auto", "1280"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="model weights (default: the shipped ones)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    prompts = os.path.join(a.set, "prompts-cross-image", "prompts.json")
    predictor = trex2.Predictor(trex2.load_model(a.weights))
    with tempfile.TemporaryDirectory() as tmp:
        gt_path = build_mosaics(a.set, tmp, a.grid)
        gt = json.load(open(gt_path))
        n = len(gt["images"])
        long_side = max(max(i["width"], i["height"]) for i in gt["images"])
        print(f"{os.path.basename(os.path.normpath(a.set))}: {n} mosaics of {a.grid}x{a.grid} images "
              f"({gt['images'][0]['width']}x{gt['images'][0]['height']} px), {len(gt['annotations'])} objects")
        print(f"{'canvas':>8} {'AP':>6} {'AP50':>6} {'AP75':>6} {'s/mosaic':>9} {'encodes/mosaic':>15}")
        for canvas in a.canvas:
            policy = canvas if canvas == "auto" else same_scale(int(canvas), long_side)
            r, dt, tiles = label_and_score(predictor, os.path.join(tmp, "images"), prompts, policy, gt,
                                           os.path.join(tmp, f"pred-{canvas}.json"))
            print(f"{canvas:>8} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP75']:6.3f} {dt / n:9.2f} {tiles / n:15.1f}"
                  f"   {per_category(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
