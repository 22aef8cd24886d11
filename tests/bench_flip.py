"""Benchmark: flip test-time augmentation (`label`'s default) against one look (`--no-flip`).

    python tests/bench_flip.py [--train-root ../shared/data/train] [--targets 40] [--threads 1]
                               [--weights FILE]

Cross-image runs on each train set: the prompts are up to 3 labelled boxes of each category,
drawn (seed 0) from the first 4 labelled images of the set (the images training holds out), and
the targets are the next --targets images. Those were trained on, by both arms alike: the figures
compare the two modes, they are not a held-out score. Each set is labelled with `app.batch.run`
twice (flip off, on) and scored with `app.evaluate` (pycocotools AP; categories without an
exemplar are left out). Prints AP / AP50 / AP75 and counting MAE per set and mode.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")
HELD = 4  # the first labelled images of each set: trex2.train holds these out


def make_set(set_dir: str, out: str, n_targets: int) -> tuple[str, str, dict]:
    """Prompt file (held-out images) + target folder + GT dict under `out` -> (images, prompts, gt)."""
    gt = json.load(open(os.path.join(set_dir, "gt.json")))
    anns: dict[int, list] = {}
    for a in gt["annotations"]:
        if a["bbox"][2] > 1 and a["bbox"][3] > 1:
            anns.setdefault(a["image_id"], []).append(a)
    images = [im for im in gt["images"] if im["id"] in anns]
    held, targets = images[:HELD], images[HELD:HELD + n_targets]
    rng, by_cat = random.Random(0), {}
    for im in held:
        for a in anns[im["id"]]:
            by_cat.setdefault(a["category_id"], []).append(a)
    exemplars = [a for _, group in sorted(by_cat.items()) for a in rng.sample(group, min(3, len(group)))]
    cats = [c for c in gt["categories"] if c["id"] in by_cat]
    for sub, group in (("prompt_images", held), ("images", targets)):
        os.makedirs(os.path.join(out, sub))
        for im in group:
            os.symlink(os.path.abspath(os.path.join(set_dir, "images", im["file_name"])),
                       os.path.join(out, sub, os.path.basename(im["file_name"])))
    prompts = {"images": [dict(im, file_name="prompt_images/" + os.path.basename(im["file_name"])) for im in held],
               "annotations": [dict(a, id=i + 1) for i, a in enumerate(exemplars)], "categories": cats}
    with open(os.path.join(out, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    ids = {im["id"] for im in targets}
    truth = {"images": [dict(im, file_name=os.path.basename(im["file_name"])) for im in targets],
             "annotations": [a for a in gt["annotations"] if a["image_id"] in ids and a["category_id"] in by_cat],
             "categories": cats}
    return os.path.join(out, "images"), os.path.join(out, "prompts.json"), truth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    ap.add_argument("--targets", type=int, default=40, help="target images per set")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = trex2.load_model(args.weights)
    sets = sorted(d for d in os.listdir(args.train_root) if os.path.isfile(os.path.join(args.train_root, d, "gt.json")))
    print(f"{'set':14s} {'mode':8s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'MAE':>6s}")
    with tempfile.TemporaryDirectory(prefix="bench-flip-") as tmp:
        for name in sets:
            images, prompts, truth = make_set(os.path.join(args.train_root, name), os.path.join(tmp, name),
                                              args.targets)
            for flip in (False, True):
                out = os.path.join(tmp, f"{name}-{flip}.json")
                batch.run(images, prompts, out, predictor=trex2.Predictor(model, flip=flip), progress=False,
                          warn=lambda m: None)
                r = evaluate(truth, json.load(open(out)))
                print(f"{name:14s} {'flip' if flip else 'no-flip':8s} {r['AP']:6.3f} {r['AP50']:6.3f} "
                      f"{r['AP75']:6.3f} {r['count_mae']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
