"""Benchmark: flip test-time augmentation (`label`'s default) against one look (`--no-flip`).

    python tests/bench_flip.py [--train-root ../shared/data/train] [--targets 40] [--threads 1]
                               [--weights FILE]

Cross-image runs on each train set: the prompts are up to 3 labelled boxes of each category,
drawn (seed 0) from the first 4 labelled images of the set (the images training holds out), and
the targets are the next --targets images. Those were trained on, by both arms alike: the figures
compare the two modes, they are not a held-out score. Each set is labelled with `app.batch.run`
twice (flip off, on) and scored with `app.evaluate` (pycocotools AP; categories without an
exemplar are left out). Prints AP / AP50 / AP75 and counting MAE per set and mode.

Then per-image runs on the held-out images themselves (never trained on): for each of them and
each category on it, up to 3 of its labelled boxes (seed 0) prompt, and all its boxes are the
targets (the exemplars included, as when the recommended threshold is calibrated). Prints, per
mode, AP50 (all-point interpolation, IoU 0.5 greedy matching) and the best F1 with its threshold,
and F1 at the recommended threshold.
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

import numpy as np  # noqa: E402

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from bench_exemplars import average_precision, read_boxes  # noqa: E402
from app import batch  # noqa: E402
from app.evaluate import evaluate  # noqa: E402
from trex2.box_ops import box_iou, greedy_match  # noqa: E402
from trex2.image_io import load_image  # noqa: E402
from trex2.train import HOLDOUT as HELD  # noqa: E402  (the first labelled images of each set)

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


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


def held_out_per_image(model, root: str, sets: list[str]) -> None:
    """Per-image prompts on the held-out images, plain and flip: AP50 and F1 (see the docstring)."""
    preds = {"no-flip": trex2.Predictor(model), "flip": trex2.Predictor(model, flip=True)}
    found = {m: ([], []) for m in preds}
    n_gt, rng = 0, random.Random(0)
    for name in sets:
        boxes, images = read_boxes(os.path.join(root, name))
        for im in images[:HELD]:
            image = load_image(os.path.join(root, name, "images", im["file_name"]))
            for _, b in sorted(boxes[im["id"]].items()):
                b = np.array(b, np.float32)
                prompt = b[rng.sample(range(len(b)), min(3, len(b)))]
                n_gt += len(b)
                for mode, p in preds.items():
                    emb = p.encode_image(image)
                    d = p.detect(emb, {"c": p.embed_prompts([(emb, prompt)])}, score_threshold=0.0)
                    order = np.argsort(-d.confidence)
                    hit = greedy_match(box_iou(torch.tensor(d.xyxy[order]), torch.tensor(b))[0]) >= 0
                    found[mode][0].extend(d.confidence[order].tolist())
                    found[mode][1].extend(hit.tolist())
    thr = preds["flip"].score_threshold
    print(f"\nheld-out images, per-image prompts ({n_gt} objects); recommended threshold {thr:.3f}")
    for mode, (scores, hits) in found.items():
        order = np.argsort(-np.array(scores), kind="stable")
        s, h = np.array(scores)[order], np.array(hits, bool)[order]
        tp, fp = np.cumsum(h), np.cumsum(~h)
        f1 = 2 * tp / (tp + fp + n_gt)
        ap50 = average_precision([(x, y, y) for x, y in zip(s, h)], n_gt, 1)
        best, at = int(np.argmax(f1)), int((s >= thr).sum()) - 1
        print(f"{mode:8s} AP50 {ap50:.3f}  best F1 {f1[best]:.3f} at {s[best]:.3f}  "
              f"F1 at the threshold {f1[at] if at >= 0 else 0.0:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-root", default=TRAIN)
    ap.add_argument("--targets", type=int, default=40, help="target images per set")
    add_model_args(ap)
    ap.add_argument("--held-out-only", action="store_true", help="only the per-image runs on the held-out images")
    args = ap.parse_args(argv)
    model = load_model(args)
    sets = sorted(d for d in os.listdir(args.train_root) if os.path.isfile(os.path.join(args.train_root, d, "gt.json")))
    print(f"{'set':14s} {'mode':8s} {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'MAE':>6s}")
    with tempfile.TemporaryDirectory(prefix="bench-flip-") as tmp:
        for name in [] if args.held_out_only else sets:
            images, prompts, truth = make_set(os.path.join(args.train_root, name), os.path.join(tmp, name),
                                              args.targets)
            for flip in (False, True):
                out = os.path.join(tmp, f"{name}-{flip}.json")
                batch.run(images, prompts, out, predictor=trex2.Predictor(model, flip=flip), progress=False,
                          warn=lambda m: None)
                r = evaluate(truth, json.load(open(out)))
                print(f"{name:14s} {'flip' if flip else 'no-flip':8s} {r['AP']:6.3f} {r['AP50']:6.3f} "
                      f"{r['AP75']:6.3f} {r['count_mae']:6.2f}", flush=True)
    held_out_per_image(model, args.train_root, sets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
