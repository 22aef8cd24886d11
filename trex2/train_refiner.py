"""Training the box refiner (box_refiner.py) on a frozen, trained model: `python app.py train --refiner`.

Views: every labelled image (the train sets', the first `holdout` of each kept out as in train.py;
or the user's own labels, `--labels`) in its square canvas, plus one random crop of it enlarged to
the canvas (larger objects), plus procedural synthetic scenes (exact boxes: human labels alone
taught it to box flat shapes loosely); the backbone's stride-4, -8 and -16 maps are kept as
float16. A step jitters labelled boxes (centre moved by N(0, s) of the side, s up to 0.15; sides
scaled by exp(N(0, s)), s up to 0.25), assigns each jittered box the labelled box it overlaps most
(IoU >= 0.35) and trains the refiner to move it there: smooth L1 on the normalised deltas + GIoU,
and BCE of the predicted IoU against the IoU the refined box reaches. It learns the box conventions
of the sets it trains on; on domains left out of its training it lowered AP (README, item 12 of
"The shipped run"), so train it on your own.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou
from .box_refiner import BoxRefiner, encode_deltas
from .data import cache_image, random_crop, read_labelled, train_sets

MIN_IOU = 0.35                  # a jittered box trains toward the labelled box it overlaps this much
CENTRE_JITTER, SIZE_JITTER = 0.15, 0.25   # largest jitter sigmas (fraction of the side; log size)


def refiner_views(model, sources: list, seed: int, log, max_images: int | None = None,
                  n_synthetic: int = 0) -> list:
    """[(maps [(C, h, w) float16 at strides 4, 8, 16], boxes (N, 4) canvas cx, cy, w, h)] of every
    labelled image and one enlarged random crop of each, then n_synthetic procedural scenes
    (synthetic.py without photo crops: flat and textured shapes whose boxes are exact).
    sources: [(name, COCO file, images folder, images kept out)], see label_sources()."""
    from . import synthetic
    rng = np.random.default_rng(seed)
    views = []

    def add(image, boxes):
        im = cache_image(model, image, boxes, np.zeros(len(boxes), int), "", model.cfg.image_size, stride4=True)
        views.append((im.features[:3], im.boxes))

    for name, gt_path, images_dir, holdout in sources:
        for n, (image, boxes, labels) in enumerate(read_labelled(gt_path, images_dir, warn=log)):
            if max_images is not None and n >= max_images:
                break
            if n < holdout:
                continue
            add(image, boxes)
            crop = random_crop(rng, image, boxes, labels, min_side=0.4)
            if crop is not None:
                add(crop[0], crop[1])
        log(f"refiner views: {len(views)} after {name}")
    for i in range(n_synthetic):
        scene = synthetic.generate_scene(np.random.default_rng([seed, i]), model.cfg.image_size)
        add(scene.image, scene.boxes)
        if (i + 1) % 100 == 0 and i + 1 < n_synthetic:
            log(f"refiner views: synthetic scene {i + 1} of {n_synthetic}")
    log(f"refiner views: {len(views)} with {n_synthetic} synthetic scenes")
    return views


def label_sources(args) -> list:
    """What the refiner trains on: each --labels COCO file (file names relative to --images, or to
    the file's own folder; all its images), else every set under --train-root (the first --holdout
    images of each kept out, as in train.py)."""
    if args.labels:
        return [(os.path.basename(p), p, args.images or os.path.dirname(os.path.abspath(p)), 0)
                for p in args.labels]
    return [(name, os.path.join(d, "gt.json"), os.path.join(d, "images"), args.holdout)
            for name, d in train_sets(args.train_root)]


def jitter(boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(K, 4) cx, cy, w, h -> randomly displaced and rescaled copies, each with its own sigmas."""
    n = len(boxes)
    sc = torch.rand(n, 1, generator=generator) * CENTRE_JITTER
    ss = torch.rand(n, 1, generator=generator) * SIZE_JITTER
    centre = boxes[:, :2] + torch.randn(n, 2, generator=generator) * sc * boxes[:, 2:]
    size = boxes[:, 2:] * torch.exp(torch.randn(n, 2, generator=generator) * ss)
    return torch.cat([centre, size], 1)


def refiner_loss(refiner: BoxRefiner, views: list, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Losses of one batch: views [(maps, boxes)], each contributing its jittered boxes."""
    feats, inputs, targets = [], [], []
    for maps, gt in views:
        gt = gt.float()
        jb = jitter(gt, generator)
        best, arg = box_iou(cxcywh_to_xyxy(jb), cxcywh_to_xyxy(gt))[0].max(1)
        ok = (best >= MIN_IOU) & (jb[:, 2:] > 1e-3).all(1)
        if ok.any():
            feats.append(refiner.roi_features([m[None] for m in maps], jb[ok]))
            inputs.append(jb[ok])
            targets.append(gt[arg[ok]])
    if not feats:
        zero = sum(p.sum() for p in refiner.parameters()) * 0
        return {"reg": zero, "giou": zero, "iou": zero}
    jb, gt = torch.cat(inputs), torch.cat(targets)
    out, iou_logit = refiner.predict(torch.cat(feats), jb)
    reg = F.smooth_l1_loss(encode_deltas(jb, out), encode_deltas(jb, gt), beta=0.11)
    po, pg = cxcywh_to_xyxy(out), cxcywh_to_xyxy(gt)
    giou = generalized_box_iou(po[:, None], pg[:, None])[:, 0, 0]
    with torch.no_grad():
        reached = box_iou(po[:, None], pg[:, None])[0][:, 0, 0]
    return {"reg": reg, "giou": (1 - giou).mean(),
            "iou": F.binary_cross_entropy_with_logits(iou_logit, reached)}


def train_refiner(model, args, log) -> None:
    """Train model.refiner (everything else frozen) and save the whole model to args.out."""
    if args.refiner_cache and os.path.isfile(args.refiner_cache):
        views = torch.load(args.refiner_cache, weights_only=True)
        log(f"loaded {len(views)} refiner views from {args.refiner_cache}")
    else:
        with torch.no_grad():
            views = refiner_views(model, label_sources(args), args.seed, log, args.max_images, args.synthetic)
        if args.refiner_cache:
            os.makedirs(os.path.dirname(args.refiner_cache) or ".", exist_ok=True)
            torch.save(views, args.refiner_cache + ".tmp")
            os.replace(args.refiner_cache + ".tmp", args.refiner_cache)
    views = [v for v in views if len(v[1])]
    if not views:
        raise SystemExit("no labelled boxes to train the box refiner on (annotations with a score are "
                         "detections, not labels, and are left out)")
    refiner = model.refiner.train()
    opt = torch.optim.AdamW(refiner.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    per_view = 16
    start, step, history = time.time(), 0, []
    budget = args.minutes * 60
    while step < args.steps and time.time() - start < budget:
        timed = args.steps >= 100000          # no --steps given: the schedule follows --minutes
        progress = (time.time() - start) / budget if timed else step / args.steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * min(progress, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = []
        for i in rng.integers(0, len(views), args.batch):
            maps, boxes = views[i]
            pick = torch.as_tensor(rng.choice(len(boxes), min(per_view, len(boxes)), replace=False))
            batch.append((maps, boxes[pick]))
        losses = refiner_loss(refiner, batch, gen)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        history.append([v.item() for v in losses.values()])
        if step % 200 == 0:
            h = np.mean(history[-200:], 0)
            log(f"refiner step {step}: reg {h[0]:.3f} giou {h[1]:.3f} iou {h[2]:.3f} (lr {lr:.1e})")
    refiner.eval()
    if not model.cfg.refine_iters:
        model.cfg.refine_iters = 2
    model.extra = {**model.extra, "refiner": {
        "steps": step, "views": len(views), "labels": [os.path.basename(p) for p in args.labels],
        "synthetic": args.synthetic, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "minutes": round((time.time() - start) / 60, 1)}}
    model.save(args.out, model.extra)
    log(f"saved {args.out} (refiner: {step} steps)")
