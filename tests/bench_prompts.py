"""Benchmark: how much the kind and number of exemplars matter (per-image protocol).

    python tests/bench_prompts.py [--sets ../shared/data/dev/bccd-val ../shared/data/dev/tomato-val]
                                  [--weights FILE] [--threads 1] [--skip-kinds] [--skip-correction]

1. Prompt kinds. From each set's prompts-per-image.json (3 boxes per image and class) four prompt
   files are derived: the 3 boxes, the first box only, the 3 box centres as points, the first
   centre only. Each labels the set like `app.py label --per-image`; AP50 per category is scored
   with the 3 original exemplars always excluded, so every variant is scored on the same objects.
2. Correction loop. On every image with at least 4 objects of a class, at a 640 px canvas: one
   box prompt on a random object -> detect; the user then boxes the object the model missed
   worst (lowest best-matching score) as a second exemplar -> detect. Printed: how many of the
   objects missed at the first step (no box at IoU >= 0.5 above the recommended threshold) are
   found at the second, false positives above the threshold, and AP50 (VOC-style, detections on
   the two exemplars ignored), for three ways to use the two examples: one prompt set (as the
   app does), each example encoded alone and the embeddings averaged, and the union of each
   example's own detections (NMS at the model's IoU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trex2  # noqa: E402
from bench_common import add_model_args, load_model  # noqa: E402
from app.batch import run  # noqa: E402
from app.evaluate import evaluate, load_json  # noqa: E402
from exports import read_coco, read_prompts, write_prompts  # noqa: E402
from exports.prompts import Prompt, PromptSet  # noqa: E402
from trex2.box_ops import box_iou, greedy_match  # noqa: E402
from trex2.image_io import load_image  # noqa: E402
from trex2.box_ops import nms  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "dev")


def variants(ps: PromptSet) -> dict[str, PromptSet]:
    """The per-image prompt set -> {"3 boxes", "1 box", "3 points", "1 point": PromptSet}."""
    def centre(p: Prompt) -> Prompt:
        x1, y1, x2, y2 = p.box
        return Prompt(p.image, p.category, point=((x1 + x2) / 2, (y1 + y2) / 2))

    boxes = [p for p in ps.prompts if p.box is not None and not p.negative]
    seen, first = set(), []
    for p in boxes:
        if (p.image, p.category) not in seen:
            seen.add((p.image, p.category))
            first.append(p)
    make = lambda prompts: PromptSet(ps.categories, prompts, dict(ps.image_sizes))  # noqa: E731
    return {"3 boxes": make(boxes), "1 box": make(first),
            "3 points": make([centre(p) for p in boxes]), "1 point": make([centre(p) for p in first])}


def prompt_kinds(set_dir: str, predictor, tmp: str) -> None:
    gt = load_json(os.path.join(set_dir, "gt.json"), "GT")
    exemplars = load_json(os.path.join(set_dir, "prompts-per-image.json"), "prompts")
    ps = read_prompts(os.path.join(set_dir, "prompts-per-image.json"))
    name = os.path.basename(os.path.normpath(set_dir))
    for kind, variant in variants(ps).items():
        path = os.path.join(tmp, f"{name}-{kind.replace(' ', '')}.json")
        write_prompts(path, variant)
        out = path[:-5] + "-out.json"
        run(os.path.join(set_dir, "images"), path, out, per_image=True, predictor=predictor, progress=False,
            warn=lambda m: None)
        r = evaluate(gt, load_json(out, "PRED"), exemplars=exemplars)
        per_cat = ", ".join(f"{c} {v:.3f}" for c, v in r["AP50_per_category"].items() if v is not None)
        print(f"{name:12s} {kind:9s} AP {r['AP']:.3f} AP50 {r['AP50']:.3f} ({per_cat})", flush=True)


def voc_ap50(scores: list[float], hits: list[bool], n: int) -> float:
    """Area under the interpolated precision-recall curve of pooled detections."""
    if not n or not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores))
    h = np.asarray(hits, bool)[order]
    tp, fp = np.cumsum(h), np.cumsum(~h)
    precision, recall = tp / (tp + fp), tp / n
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * envelope))


def correction(set_dir: str, predictor, rng: np.random.Generator) -> None:
    gt = read_coco(os.path.join(set_dir, "gt.json"))
    thr, iou_nms = predictor.score_threshold, predictor.model.cfg.nms_iou
    name = os.path.basename(os.path.normpath(set_dir))
    modes = ("one prompt set", "mean of embeddings", "union of detections")
    for cat in gt.categories:
        stats = {m: {"scores": [], "hits": [], "n": 0, "found": 0, "fp": 0} for m in ("first",) + modes}
        missed_total = images = 0
        for rec in gt.images:
            G = np.asarray([a.box for a in gt.annotations_for(rec.file_name) if a.category == cat],
                           np.float32).reshape(-1, 4)
            if len(G) < 4:
                continue
            images += 1
            emb = predictor.encode_image(load_image(os.path.join(set_dir, "images", rec.file_name)), size=640)
            e1 = int(rng.integers(len(G)))
            first = predictor.detect(emb, {cat: predictor.embed_prompts([(emb, G[e1:e1 + 1])])})
            iou = box_iou(torch.as_tensor(first.xyxy), torch.as_tensor(G))[0].numpy()
            best = np.array([first.confidence[iou[:, j] >= 0.5].max(initial=0.0) for j in range(len(G))])
            best[e1] = np.inf
            e2 = int(np.argmin(best))
            ex = G[[e1, e2]]
            rest = [j for j in range(len(G)) if j not in (e1, e2)]
            missed = {k for k, j in enumerate(rest) if best[j] < thr}
            missed_total += len(missed)
            singles = [predictor.detect(emb, {cat: predictor.embed_prompts([(emb, ex[i:i + 1])])}) for i in (0, 1)]
            xyxy = np.concatenate([d.xyxy for d in singles])
            conf = np.concatenate([d.confidence for d in singles])
            keep = nms(torch.as_tensor(xyxy), torch.as_tensor(conf), iou_nms).numpy()
            outs = {"first": (first.xyxy, first.confidence),
                    modes[0]: _xy_conf(predictor.detect(emb, {cat: predictor.embed_prompts([(emb, ex)])})),
                    modes[1]: _xy_conf(predictor.detect(emb, {cat: predictor.embed_prompts([(emb, ex[:1]), (emb, ex[1:])])})),
                    modes[2]: (xyxy[keep], conf[keep])}
            for mode, (bx, sc) in outs.items():
                order = np.argsort(-sc)
                bx, sc = bx[order], sc[order]
                on_exemplar = (box_iou(torch.as_tensor(bx), torch.as_tensor(ex))[0].numpy() >= 0.5).any(1)
                bx, sc = bx[~on_exemplar], sc[~on_exemplar]
                match = greedy_match(box_iou(torch.as_tensor(bx), torch.as_tensor(G[rest]))[0]).numpy()
                s = stats[mode]
                s["scores"] += sc.tolist()
                s["hits"] += (match >= 0).tolist()
                s["n"] += len(rest)
                s["found"] += len(missed & set(match[(match >= 0) & (sc >= thr)].tolist()))
                s["fp"] += int(((match < 0) & (sc >= thr)).sum())
        if not images:
            continue
        print(f"{name:12s} {cat}: {images} images, {missed_total} objects missed after one box; "
              f"AP50 after one box {voc_ap50(stats['first']['scores'], stats['first']['hits'], stats['first']['n']):.3f}")
        for mode in modes:
            s = stats[mode]
            print(f"    + a box on the worst miss, {mode:20s}: found {s['found']:4d} of the {missed_total} missed, "
                  f"{s['fp']:4d} false positives >= {thr:.3f}, AP50 {voc_ap50(s['scores'], s['hits'], s['n']):.3f}",
                  flush=True)


def _xy_conf(d):
    return d.xyxy, d.confidence


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=[os.path.join(DEV, "bccd-val"), os.path.join(DEV, "tomato-val")])
    add_model_args(ap)
    ap.add_argument("--skip-kinds", action="store_true")
    ap.add_argument("--skip-correction", action="store_true")
    args = ap.parse_args(argv)
    predictor = trex2.Predictor(load_model(args))
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.sets:
            if not args.skip_kinds:
                prompt_kinds(s, predictor, tmp)
            if not args.skip_correction:
                correction(s, predictor, np.random.default_rng(0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
