"""Benchmark: large objects and the large-object rule of `label --canvas auto`.

    python tests/bench_large_objects.py [--set ../shared/data/dev/bccd-val] [--zoom 2]
                                        [--canvas 640 auto] [--threads 1]

The mirror of bench_small_objects: each image of a labelled set is replaced by its centre crop
of 1/zoom of each side, enlarged back to the image's size, so the objects get zoom times larger
(objects less than half inside the crop are dropped). Cross-image prompts: 3 exemplars per
category on the first crops that hold it; those crops are left out of the scoring. Each --canvas
setting labels the crops (a number: every image at that long side, prompt crops included;
"auto": trex2.predictor.canvas_size, which shrinks images whose exemplars exceed MAX_OBJECT_PX)
and prints AP / AP50 / AP75 (pycocotools, app.evaluate) and seconds per image.
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
from bench_small_objects import label_and_score, per_category  # noqa: E402


def build_zoomed(set_dir: str, out_dir: str, zoom: float) -> tuple[dict, str]:
    """<set_dir>/gt.json + images -> zoomed crops in <out_dir>/images, a prompt file
    <out_dir>/prompts.json; returns (ground truth of the crops that hold no exemplar, prompt path)."""
    gt = json.load(open(os.path.join(set_dir, "gt.json")))
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = {"images": [], "annotations": [], "categories": gt["categories"]}
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for rec in gt["images"]:
        W, H = rec["width"], rec["height"]
        cw, ch = W / zoom, H / zoom
        x0, y0 = (W - cw) / 2, (H - ch) / 2
        im = Image.open(os.path.join(set_dir, "images", rec["file_name"])).convert("RGB")
        im = im.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch))).resize((W, H), Image.BICUBIC)
        im.save(os.path.join(out_dir, "images", rec["file_name"]), quality=95)
        out["images"].append({"id": rec["id"], "file_name": rec["file_name"], "width": W, "height": H})
        for a in by_image.get(rec["id"], []):
            x, y, w, h = a["bbox"]
            bx0, by0 = max(x, x0), max(y, y0)
            bx1, by1 = min(x + w, x0 + cw), min(y + h, y0 + ch)
            if bx1 <= bx0 or by1 <= by0 or (bx1 - bx0) * (by1 - by0) < 0.5 * w * h:
                continue
            box = [(bx0 - x0) * zoom, (by0 - y0) * zoom, (bx1 - bx0) * zoom, (by1 - by0) * zoom]
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": rec["id"],
                                       "category_id": a["category_id"], "bbox": box,
                                       "area": box[2] * box[3], "iscrowd": 0})
    prompts = {"images": [], "annotations": [], "categories": gt["categories"]}
    used = set()
    for c in gt["categories"]:
        firsts = {}
        for a in out["annotations"]:
            if a["category_id"] == c["id"] and len(firsts) < 3:
                firsts.setdefault(a["image_id"], a)
        for image_id, a in firsts.items():
            if image_id not in used:
                used.add(image_id)
                rec = next(i for i in out["images"] if i["id"] == image_id)
                prompts["images"].append({**rec, "file_name": "images/" + rec["file_name"]})
            prompts["annotations"].append({"id": len(prompts["annotations"]) + 1, "image_id": image_id,
                                           "category_id": c["id"], "bbox": a["bbox"]})
    path = os.path.join(out_dir, "prompts.json")
    json.dump(prompts, open(path, "w"))
    scored = {"images": [i for i in out["images"] if i["id"] not in used], "categories": gt["categories"],
              "annotations": [a for a in out["annotations"] if a["image_id"] not in used]}
    return scored, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--set", default=os.path.join(here, "..", "..", "shared", "data", "dev", "bccd-val"))
    ap.add_argument("--zoom", type=float, default=2.0)
    ap.add_argument("--canvas", nargs="+", default=["640", "auto"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="model weights (default: the shipped ones)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    predictor = trex2.Predictor(trex2.load_model(a.weights))
    with tempfile.TemporaryDirectory() as tmp:
        gt, prompts = build_zoomed(a.set, tmp, a.zoom)
        n = len(gt["images"])
        n_all = len(os.listdir(os.path.join(tmp, "images")))     # the prompt crops are labelled too
        sides = [np.sqrt(x["bbox"][2] * x["bbox"][3]) for x in gt["annotations"]]
        print(f"{os.path.basename(os.path.normpath(a.set))}: {n} crops zoomed {a.zoom:g}x, "
              f"{len(gt['annotations'])} objects, median side {np.median(sides):.0f} px")
        print(f"{'canvas':>8} {'AP':>6} {'AP50':>6} {'AP75':>6} {'s/image':>8}")
        for canvas in a.canvas:
            r, dt, _ = label_and_score(predictor, os.path.join(tmp, "images"), prompts, canvas, gt,
                                       os.path.join(tmp, f"pred-{canvas}.json"))
            print(f"{canvas:>8} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP75']:6.3f} {dt / n_all:8.2f}   {per_category(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
