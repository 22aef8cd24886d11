"""Benchmark: one folder holding several domains, every class searched on every image.

    python tests/bench_mixed.py [--train-root ../shared/data/train] [--threads 2] [--weights FILE]

The images training holds out (the first 4 labelled images of each train set, never trained on)
go into one folder: 24 images, 23 categories. Each category is prompted cross-image with one
labelled box (seed 0) on each of up to 4 other images of its own set (trained on), and the
folder is labelled with `app.batch.run`, flip off and on. Each category is then scored
(`app.evaluate`, pycocotools) twice: over its own set's images only, and over all 24 images,
where 20 of them lack it. The difference is what boxes on images without the class cost (the
presence bias of "Limits"), as in a folder of everyday photos where most classes are absent
from most images. Prints AP / AP50 / AP75 (means over the categories with objects in the
held-out images) per mode and scoring.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402
from trex2.train import HOLDOUT  # noqa: E402

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


def make_folder(root: str, sets: list[str], out: str) -> tuple[str, str, dict[str, dict]]:
    """Target folder, prompt file and {set: COCO ground truth of its held-out images} under `out`."""
    rng = random.Random(0)
    os.makedirs(os.path.join(out, "images"))
    os.makedirs(os.path.join(out, "prompt_images"))
    prompts: dict = {"images": [], "annotations": [], "categories": []}
    image_ids: dict[str, int] = {}        # prompt image file_name -> id
    truths = {}
    for name in sets:
        gt = json.load(open(os.path.join(root, name, "gt.json")))
        anns: dict[int, list] = {}
        for a in gt["annotations"]:
            if a["bbox"][2] > 1 and a["bbox"][3] > 1:
                anns.setdefault(a["image_id"], []).append(a)
        images = [im for im in gt["images"] if im["id"] in anns]
        held, rest = images[:HOLDOUT], images[HOLDOUT:]
        link = lambda im, sub: os.symlink(  # noqa: E731
            os.path.abspath(os.path.join(root, name, "images", im["file_name"])),
            os.path.join(out, sub, f"{name}__{os.path.basename(im['file_name'])}"))
        for im in held:
            link(im, "images")
        truths[name] = {"images": [dict(im, file_name=f"{name}__{os.path.basename(im['file_name'])}") for im in held],
                        "annotations": [a for im in held for a in anns[im["id"]]],
                        "categories": gt["categories"]}
        for c in gt["categories"]:
            cid = len(prompts["categories"]) + 1
            prompts["categories"].append({"id": cid, "name": c["name"]})
            having = [im for im in rest if any(a["category_id"] == c["id"] for a in anns[im["id"]])]
            for im in rng.sample(having, min(4, len(having))):
                file_name = f"prompt_images/{name}__{os.path.basename(im['file_name'])}"
                if file_name not in image_ids:
                    link(im, "prompt_images")
                    image_ids[file_name] = len(image_ids) + 1
                    prompts["images"].append({"id": image_ids[file_name], "file_name": file_name,
                                              "width": im["width"], "height": im["height"]})
                image_id = image_ids[file_name]
                box = rng.choice([a for a in anns[im["id"]] if a["category_id"] == c["id"]])
                prompts["annotations"].append({"id": len(prompts["annotations"]) + 1, "image_id": image_id,
                                               "category_id": cid, "bbox": box["bbox"]})
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    return os.path.join(out, "images"), os.path.join(out, "prompts.json"), truths


def scores(truths: dict[str, dict], pred: dict) -> dict[str, tuple[float, float, float]]:
    """{"own set": means over categories scored on their own set's images, "all images": over the
    whole folder} of (AP, AP50, AP75)."""
    own, n = [0.0, 0.0, 0.0], 0
    merged: dict = {"images": [], "annotations": [], "categories": []}
    for truth in truths.values():
        r = evaluate(truth, pred)
        k = sum(v is not None for v in r["AP50_per_category"].values())
        own = [o + r[m] * k for o, m in zip(own, ("AP", "AP50", "AP75"))]
        n += k
        ids = {c["id"]: len(merged["categories"]) + i + 1 for i, c in enumerate(truth["categories"])}
        images = {im["id"]: len(merged["images"]) + i + 1 for i, im in enumerate(truth["images"])}
        merged["categories"] += [dict(c, id=ids[c["id"]]) for c in truth["categories"]]
        merged["images"] += [dict(im, id=images[im["id"]]) for im in truth["images"]]
        merged["annotations"] += [dict(a, id=len(merged["annotations"]) + i + 1, image_id=images[a["image_id"]],
                                       category_id=ids[a["category_id"]]) for i, a in enumerate(truth["annotations"])]
    r = evaluate(merged, pred)
    return {"own set": tuple(v / n for v in own), "all images": (r["AP"], r["AP50"], r["AP75"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    add_model_args(ap)
    args = ap.parse_args(argv)
    model = load_model(args)
    sets = sorted(d for d in os.listdir(args.train_root) if os.path.isfile(os.path.join(args.train_root, d, "gt.json")))
    with tempfile.TemporaryDirectory(prefix="bench-mixed-") as tmp:
        images, prompts, truths = make_folder(args.train_root, sets, tmp)
        print(f"{len(os.listdir(images))} images from {len(sets)} sets, "
              f"{sum(len(t['annotations']) for t in truths.values())} objects")
        print(f"{'mode':8s} {'scored over':12s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s}")
        for flip in (False, True):
            out = os.path.join(tmp, f"out-{flip}.json")
            batch.run(images, prompts, out, predictor=trex2.Predictor(model, flip=flip), progress=False,
                      warn=lambda m: None)
            for scope, (a, a50, a75) in scores(truths, json.load(open(out))).items():
                print(f"{'flip' if flip else 'no-flip':8s} {scope:12s} {a:6.3f} {a50:6.3f} {a75:6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
