"""Train T-Rex2 on cached backbone features: `python app.py train` (or python -m trex2.train).

Seeded and reproducible. Data: synthetic repeated-object scenes (synthetic.py) and the labelled train
sets (never the dev sets). Loss: per decoder layer, Hungarian-matched focal classification + L1 +
GIoU; the dense proposals get the same losses with a one-to-many assignment; optionally (--denoise)
noised target boxes as extra queries to be boxed back (denoising_losses). A few train images per
set are held out to calibrate the recommended score threshold (best F1 at IoU 0.5).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from .backbone import TUNABLE_BLOCKS
from .box_ops import box_iou, cxcywh_to_xyxy, greedy_match, postprocess
from .data import (SYNTHETIC_GROUP, CachedImage, EpisodeSampler, cache_image, hflip_boxes, random_crop,
                   random_turn, read_coco_set, train_sets)
from .losses import contrastive_alignment_loss, detection_loss
from .matcher import hungarian_match, pad_targets, topk_inside_match
from .model import DEFAULT_WEIGHTS, ModelConfig, TRex2, load_model
from .synthetic import DEFAULT_TRAIN_ROOT

HOLDOUT = 4       # first labelled images of each real set kept out of training (calibration)
_SOURCES = None   # object sources shared with forked synthetic-scene workers


def _scene(args):
    """Synthetic scene number s, drawn from its own seeded generator (same scenes for any worker count)."""
    from . import synthetic
    seed, s, size = args
    scene = synthetic.generate_scene(np.random.default_rng([seed, s]), size, _SOURCES)
    return scene.image, scene.boxes, scene.labels


def build_cache(model, train_root: str, n_synthetic: int, size: int, seed: int, log, holdout: int = HOLDOUT,
                zoom_out: int = 0, zoom_in: int = 0, workers: int = 1, max_images: int | None = None,
                turn: int = 0):
    """Backbone features of every training image -> (train, held). The first `holdout` images of each
    real set are kept apart (no augmentation) to calibrate the score threshold. Each other real image
    also gets `zoom_out` shrunk copies (zoom 0.35..0.8 of the canvas), `zoom_in` random crops and
    `turn` copies turned by 90, 180 or 270 degrees (data.random_turn, drawn from their own generator
    and appended after all other views, so the other views do not change with `turn`; the train sets
    are nearly all upright landscape photos, while aerial or microscope images have no up).
    max_images: read only this many images of each real set (smoke tests)."""
    from . import synthetic
    global _SOURCES
    _SOURCES = synthetic.load_object_sources(train_root, rng=np.random.default_rng(seed))
    jobs = [(seed, s, size) for s in range(n_synthetic)]
    pool = None
    if workers > 1:   # scenes are drawn in the background while the real images are cached
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers)
        scenes = pool.imap(_scene, jobs, chunksize=8)
    else:
        scenes = map(_scene, jobs)
    try:
        rng, turn_rng = np.random.default_rng(seed), np.random.default_rng([seed, 0, 90])
        train, held, turned = [], [], []
        for name, set_dir in train_sets(train_root):
            n0, t0 = len(train), len(turned)
            for n, (image, boxes, labels) in enumerate(read_coco_set(set_dir)):
                if max_images is not None and n >= max_images:
                    break
                if n < holdout:
                    held.append(cache_image(model, image, boxes, labels, name, size))
                    continue
                train.append(cache_image(model, image, boxes, labels, name, size))
                for _ in range(zoom_out):
                    zoom = float(rng.uniform(0.35, 0.8))
                    train.append(cache_image(model, image, boxes, labels, name, size, zoom))
                for _ in range(zoom_in):
                    crop = random_crop(rng, image, boxes, labels)
                    if crop is not None:
                        train.append(cache_image(model, *crop, name, size))
                turned.extend(cache_image(model, *random_turn(turn_rng, image, boxes, labels), name, size)
                              for _ in range(turn))
            log(f"cached {len(train) - n0} training views and {len(turned) - t0} turned ones of {name}")
        for s, (image, boxes, labels) in enumerate(scenes):
            if len(boxes):
                train.append(cache_image(model, image, boxes, labels, f"{SYNTHETIC_GROUP}{s}", size))
            if (s + 1) % 500 == 0:
                log(f"cached {s + 1} synthetic scenes")
    finally:
        if pool is not None:
            pool.terminate()
    return train + turned, held


def save_cache(train: list[CachedImage], held: list[CachedImage], path: str) -> None:
    rec = lambda im, h: {"features": [f.cpu() for f in im.features], "boxes": im.boxes, "labels": im.labels,
                         "group": im.group, "valid_wh": list(im.valid_wh), "held": h}
    torch.save([rec(im, False) for im in train] + [rec(im, True) for im in held], path + ".tmp")
    os.replace(path + ".tmp", path)


def load_cache(path: str, device: str = "cpu") -> tuple[list[CachedImage], list[CachedImage]]:
    train, held = [], []
    for d in torch.load(path, weights_only=True):
        if "held" not in d:
            raise ValueError(f"{path} is a feature cache of an older format: delete it to rebuild")
        im = CachedImage([f.to(device) for f in d["features"]], d["boxes"], d["labels"], d["group"],
                         tuple(d["valid_wh"]))
        (held if d["held"] else train).append(im)
    return train, held


def feature_levels(model, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cached backbone maps [(B, C_l, h_l, w_l)] -> the maps the model sees: with a fine-tuned backbone
    the stride-16 and stride-32 maps are recomputed from the stride-8 one, feats[0] (with gradients;
    the other cached maps are ignored)."""
    if not model.cfg.tune_backbone:
        return feats
    return [feats[0]] + model.backbone.upper(feats[0])


DN_NOISE = 0.4      # denoising: a positive query's box is its target moved by up to this share of the
                    # target's size (centre: half of it), a negative one by 1-2 times as much
DN_MAX_TARGETS = 30  # ... for at most this many targets per episode (one positive, one negative each)


def noised_boxes(targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(G, 4) cx, cy, w, h in [0, 1] -> boxes moved by `scale` (G, 1) times a random share of their
    size: centres by up to scale / 2 of w and h, sides by a factor 1 +- up to scale (torch's RNG)."""
    sign = torch.randint(0, 2, targets.shape, device=targets.device) * 2 - 1
    amount = torch.rand(targets.shape, device=targets.device) * scale
    wh = targets[:, 2:].repeat(1, 2)
    moved = targets + sign * amount * torch.cat([wh[:, :2] / 2, wh[:, 2:]], 1)
    return torch.cat([moved[:, :2].clamp(0, 1), moved[:, 2:].clamp(1e-3, 1)], 1)


def denoising_losses(model, memory, shapes, pre, class_emb, targets: list[torch.Tensor]) -> dict:
    """Denoising queries (DN-DETR / DINO), run through the decoder layers apart from the matched
    queries (so neither sees the other): per episode, up to DN_MAX_TARGETS targets each give a
    positive query at its box moved by up to DN_NOISE of its size, to be boxed back onto it (L1 +
    GIoU, classification target its IoU), and a negative one moved 1-2 times as far, to be scored
    0 (left out where it still overlaps any target by IoU > 0.5). Query content: the token of the
    stride-8 map under the noised box's centre, as for the selected proposals."""
    dev = memory.device
    h0, w0 = shapes[0]
    B = len(targets)
    picks = [t[torch.randperm(len(t), device=dev)[:DN_MAX_TARGETS]] for t in targets]
    M = max([len(t) for t in picks] + [0])
    if M == 0:
        return {}
    gt = torch.zeros(B, M, 4, device=dev)
    ref = torch.full((B, 2 * M, 4), 0.5, device=dev)
    use = torch.zeros(B, 2 * M, dtype=torch.bool, device=dev)
    for b, t in enumerate(picks):
        if not len(t):
            continue
        n = len(t)
        gt[b, :n] = t
        ref[b, :n] = noised_boxes(t, torch.full((n, 1), DN_NOISE, device=dev))
        neg = noised_boxes(t, DN_NOISE * (1 + torch.rand(n, 1, device=dev)))
        ref[b, M:M + n] = neg
        use[b, :n] = True
        far = box_iou(cxcywh_to_xyxy(neg), cxcywh_to_xyxy(targets[b]))[0].max(1).values <= 0.5
        use[b, M:M + n] = far
    col = (ref[..., 0] * w0).long().clamp(0, w0 - 1)
    row = (ref[..., 1] * h0).long().clamp(0, h0 - 1)
    feat = pre["feat"].expand(B, -1, -1)
    q = feat[torch.arange(B, device=dev)[:, None], row * w0 + col].detach()
    outputs, _ = model.decoder.refine(memory, shapes, class_emb, q, ref)
    bi, pi = torch.nonzero(use[:, :M], as_tuple=True)
    num = max(1.0, float(len(pi)))
    total: dict[str, torch.Tensor] = {}
    for logits, boxes in outputs:
        logits = torch.where(use, logits, torch.full_like(logits, -30.0))  # unused slots: no loss
        part = detection_loss(logits, boxes, gt, (bi, pi, pi), num)
        for k, v in part.items():
            total[f"dn_{k}"] = total.get(f"dn_{k}", 0) + v
    return total


def episode_losses(model, images: list[CachedImage], episodes: list[dict], flips: list[bool],
                   num_queries: int = 300, class_names: list[str | None] | None = None,
                   denoise: bool = False):
    """Forward a batch of episodes and return the summed loss dict. With a text encoder attached
    and class_names given (None for a nameless class), the text embeddings of the named classes
    are aligned with their visual embeddings by InfoNCE (other classes of the batch are the
    negatives). denoise: add denoising_losses."""
    dev = next(model.parameters()).device
    needed = sorted({e["target"] for e in episodes} | {e["source"] for e in episodes})
    slot = {i: n for n, i in enumerate(needed)}
    # a fine-tuned backbone recomputes the stride-16/32 maps from the stride-8 one (feature_levels)
    levels = 1 if model.cfg.tune_backbone else 3
    feats = [torch.stack([images[i].features[lvl].float() for i in needed]) for lvl in range(levels)]
    flip_img = {i: False for i in needed}
    for e, f in zip(episodes, flips):
        if f:
            flip_img[e["target"]] = flip_img[e["source"]] = True
    flip_rows = torch.tensor([flip_img[i] for i in needed], device=dev)
    feats = [torch.where(flip_rows[:, None, None, None], f.flip(-1), f) for f in feats]
    memory, shapes = model.encode_features(feature_levels(model, feats))

    B = len(episodes)
    K = max(len(e["prompts"]) for e in episodes)
    boxes = torch.zeros(B, K, 4)
    is_point = torch.zeros(B, K, dtype=torch.bool)
    valid = torch.zeros(B, K, dtype=torch.bool)
    targets = []
    for b, e in enumerate(episodes):
        p, t = e["prompts"], e["targets"]
        if flip_img[e["source"]]:
            p = hflip_boxes(p)
        if flip_img[e["target"]]:
            t = hflip_boxes(t)
        boxes[b, :len(p)], is_point[b, :len(p)], valid[b, :len(p)] = p, e["is_point"], True
        targets.append(t.to(dev))
    src = torch.tensor([slot[e["source"]] for e in episodes], device=dev)
    tgt = torch.tensor([slot[e["target"]] for e in episodes], device=dev)
    class_emb = model.encode_prompts(memory[src], shapes, boxes.to(dev), is_point.to(dev), valid.to(dev))
    align = None
    if model.text_encoder is not None and class_names and any(class_names):
        named = [b for b, n in enumerate(class_names) if n]
        names = sorted({class_names[b] for b in named})
        text = model.text_encoder(names)
        # one visual embedding per distinct name: the mean over the batch's episodes of that class
        vis = torch.stack([class_emb[[b for b in named if class_names[b] == n]].mean(0) for n in names])
        if len(names) > 1:
            align = contrastive_alignment_loss(vis, text)
    valid_wh = torch.tensor([images[e["target"]].valid_wh for e in episodes], device=dev)
    pre = model.decoder.precompute(memory[tgt], shapes)
    outputs, (enc_logits, _), _ = model.decode(memory[tgt], shapes, class_emb, valid_wh, num_queries, pre)

    tg, tv = pad_targets(targets)
    num = max(1.0, float(sum(len(t) for t in targets)))
    parts = []
    for logits, bx in outputs:
        parts.append(detection_loss(logits, bx, tg, hungarian_match(logits.detach(), bx.detach(), tg, tv), num))
    # dense proposals (one-to-many: the k cheapest tokens inside each target)
    all_tokens = torch.arange(enc_logits.shape[1], device=dev).expand(B, -1)
    prop = model.decoder.proposal_boxes(pre["feat"], pre["anchors"], all_tokens)
    match = topk_inside_match(enc_logits.detach(), prop.detach(), pre["anchors"][0], tg, tv)
    parts.append({f"enc_{k}": v for k, v in detection_loss(enc_logits, prop, tg, match, num).items()})
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    if denoise:
        total.update(denoising_losses(model, memory[tgt], shapes, pre, class_emb, targets))
    if align is not None:
        total["align"] = align
    return total


@torch.no_grad()
def calibrate_threshold(model, images: list[CachedImage], seed: int = 1, episodes: int = 200) -> dict:
    """Best-F1 score threshold (IoU 0.5 greedy matching) on held-out images, per-image prompts."""
    sampler = EpisodeSampler(images, seed=seed, cross_image_prob=0.0, point_prob=0.0)
    scores, hits, n_gt = [], [], 0
    for _ in range(episodes):
        e = sampler.sample()
        im = images[e["target"]]
        memory, shapes = model.encode_features(feature_levels(model, [f[None].float() for f in im.features]))
        K = len(e["prompts"])
        cls = model.encode_prompts(memory, shapes, e["prompts"][None], torch.zeros(1, K, dtype=torch.bool),
                                   torch.ones(1, K, dtype=torch.bool))
        outputs, _, _ = model.decode(memory, shapes, cls, torch.tensor([im.valid_wh]))
        keep, s, bx = postprocess(outputs[-1][0][0], outputs[-1][1][0], model.cfg.nms_iou, 0.01)
        gt = cxcywh_to_xyxy(e["targets"])
        n_gt += len(gt)
        order = torch.argsort(s, descending=True)
        match = greedy_match(box_iou(cxcywh_to_xyxy(bx[order]), gt)[0])
        scores += s[order].tolist()
        hits += (match >= 0).tolist()
    order = np.argsort(-np.array(scores))
    tp = np.cumsum(np.array(hits)[order])
    fp = np.cumsum(~np.array(hits)[order])
    f1 = 2 * tp / (tp + fp + n_gt)
    best = int(np.argmax(f1))
    return {"score_threshold": float(np.array(scores)[order][best]), "f1": float(f1[best]),
            "precision": float(tp[best] / (tp[best] + fp[best])), "recall": float(tp[best] / n_gt)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="app.py train", description=__doc__)
    ap.add_argument("--out", default=None, help="weights to write (default: the shipped weights' file; "
                    "required with --labels)")
    ap.add_argument("--train-root", default=DEFAULT_TRAIN_ROOT)
    ap.add_argument("--cache", default="cache/train_features.pt",
                    help="feature cache (built if missing; '' to build in memory only)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a machine with a GPU")
    ap.add_argument("--workers", type=int, default=1, help="processes generating synthetic scenes")
    ap.add_argument("--zoom-out", type=int, default=1, help="shrunk copies of each real training image")
    ap.add_argument("--zoom-in", type=int, default=1, help="random crops of each real training image")
    ap.add_argument("--turn", type=int, default=0,
                    help="copies of each real training image turned by 90, 180 or 270 degrees")
    ap.add_argument("--absent", type=float, default=0.0,
                    help="share of episodes prompting a category the target image lacks (no targets)")
    ap.add_argument("--balance-sets", action="store_true",
                    help="draw every real train set equally often (synthetic scenes keep their share)")
    ap.add_argument("--exclude-sets", default="",
                    help="comma-separated train sets to leave out (leave-one-domain-out experiments)")
    ap.add_argument("--tune-backbone", action="store_true",
                    help="also fine-tune the backbone blocks after stride 8 (saved with the weights)")
    ap.add_argument("--backbone-lr-scale", type=float, default=0.1,
                    help="learning rate of the fine-tuned backbone blocks, as a fraction of --lr")
    ap.add_argument("--synthetic", type=int, default=None, help="number of synthetic scenes (default 800; "
                    "600 with --refiner)")
    ap.add_argument("--holdout", type=int, default=HOLDOUT, help="images per real set kept for calibration")
    ap.add_argument("--max-images", type=int, default=None, help="read only this many images per real set (smoke tests)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: until --minutes; "
                    "3000 with --refiner)")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop after this much training time")
    ap.add_argument("--deadline", type=float, default=None,
                    help="also stop training at this Unix time (leaves time to calibrate and save)")
    ap.add_argument("--batch", type=int, default=None, help="episodes per step (default 4; with --refiner, "
                    "images of 16 boxes, default 16)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; 1e-3 with --refiner)")
    ap.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 200; 100 with --refiner)")
    ap.add_argument("--queries", type=int, default=300, help="decoder queries per episode in training "
                    "and per class at inference (saved in the weights' config)")
    ap.add_argument("--denoise", action="store_true",
                    help="add denoising queries (noised target boxes to be boxed back, DN-DETR / DINO)")
    ap.add_argument("--init", default=None, help="start from these weights (with --refiner, default: the "
                    "shipped weights)")
    ap.add_argument("--class-queries", action="store_true",
                    help="condition the decoder queries on the class embedding (new layers start at zero, "
                         "so --init weights without them start from their own outputs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-only", action="store_true", help="build the feature cache and stop")
    ap.add_argument("--refiner", action="store_true",
                    help="train only the box refiner (box_refiner.py) of the --init weights, on the "
                         "--labels files or the --train-root sets, plus --synthetic procedural scenes "
                         "(--batch images of 16 boxes per step; --lr, --warmup, --steps, --minutes)")
    ap.add_argument("--labels", action="append", default=[], metavar="COCO.json",
                    help="with --refiner: train it on these labels of your own (repeatable; e.g. the app's "
                         "COCO export of accepted boxes) instead of --train-root; boxes with a score are "
                         "left out")
    ap.add_argument("--images", default=None, metavar="DIR",
                    help="folder the --labels file names are relative to (default: the file's folder)")
    ap.add_argument("--refiner-cache", default=None,
                    help="backbone maps the refiner trains on, built if missing (default: "
                         "cache/refiner_views.pt for --train-root, none for --labels; '' for none)")
    ap.add_argument("--clip-dir", default=None,
                    help="local CLIP text model: also train the text projection (contrastive alignment "
                         "of category names with visual class embeddings)")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--enc-layers", type=int, default=ModelConfig.enc_layers)
    ap.add_argument("--dec-layers", type=int, default=ModelConfig.dec_layers)
    ap.add_argument("--d-model", type=int, default=ModelConfig.d_model)
    args = ap.parse_args(argv)
    defaults = (dict(synthetic=600, steps=3000, batch=16, lr=1e-3, warmup=100) if args.refiner else
                dict(synthetic=800, steps=100000, batch=4, lr=2e-4, warmup=200))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.refiner and not args.init:
        args.init = DEFAULT_WEIGHTS   # the trained weights to add a box refiner to
    if (args.labels or args.images) and not args.refiner:
        ap.error("--labels and --images train the box refiner: add --refiner")
    if args.out is None:
        if args.labels:
            ap.error("with --labels, say where to save the weights with your refiner: --out FILE.safetensors")
        args.out = DEFAULT_WEIGHTS
    if args.steps < 1 or args.minutes <= 0:
        ap.error(f"--steps and --minutes must be positive (got {args.steps} and {args.minutes})")
    from exports import read_coco   # dataset formats live in exports/
    from exports._io import output_file_problem
    problem = output_file_problem(args.out)
    if problem:
        ap.error(f"--out: {problem}")
    for path in args.labels:
        if not os.path.isfile(path):
            ap.error(f"--labels: no such file: {path}")
        try:
            labels = read_coco(path)
        except ValueError as e:   # also json.JSONDecodeError
            ap.error(f"--labels: {e}")
        if not labels.annotations:
            ap.error(f"--labels: {path} has no boxes")
        if not any(a.score is None for a in labels.annotations):
            ap.error(f"--labels: {path} has no labels: every box in it has a score, so all are "
                     f"detections (e.g. 'label' output); accept boxes in the app and export them")
    if args.images and not os.path.isdir(args.images):
        ap.error(f"--images: no such folder: {args.images}")
    if args.refiner_cache is None:
        args.refiner_cache = "" if args.labels else "cache/refiner_views.pt"
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.init:
        model = load_model(args.init)
    else:
        model = TRex2(ModelConfig(d_model=args.d_model, enc_layers=args.enc_layers,
                                  dec_layers=args.dec_layers, image_size=args.size))
    model.cfg.num_queries = args.queries
    if args.class_queries and model.decoder.query_cond is None:
        model.cfg.class_queries = True
        model.decoder.add_class_queries()
    if args.tune_backbone:
        model.cfg.tune_backbone = True
        for i in TUNABLE_BLOCKS:
            model.backbone._blocks[i].requires_grad_(True)
    if args.refiner:
        from .train_refiner import train_refiner
        train_refiner(model.eval(), args, log)
        return 0
    model.refiner.requires_grad_(False)   # trained apart (--refiner), on the finished model
    model.to(args.device)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.cache and os.path.isfile(args.cache):
        train, held = load_cache(args.cache, args.device)
        log(f"loaded {len(train)} training and {len(held)} held-out cached images from {args.cache} "
            "(the views it was built with: --synthetic, --zoom-out, --zoom-in and --turn do not change it)")
    else:
        train, held = build_cache(model, args.train_root, args.synthetic, args.size, args.seed, log,
                                  args.holdout, args.zoom_out, args.zoom_in, args.workers, args.max_images,
                                  args.turn)
        if args.cache:
            os.makedirs(os.path.dirname(args.cache) or ".", exist_ok=True)
            save_cache(train, held, args.cache)
    if args.cache_only:
        return 0
    exclude = {n for n in args.exclude_sets.split(",") if n}
    if exclude:
        train = [im for im in train if im.group not in exclude]
        held = [im for im in held if im.group not in exclude]
        log(f"left out the train sets {sorted(exclude)}")
    log(f"{len(train)} training images, {len(held)} held out for calibration")

    names_of: dict[str, list[str]] = {}
    if args.clip_dir:
        model.attach_text_encoder(args.clip_dir, require_trained=False)
        for name, set_dir in train_sets(args.train_root):
            names_of[name] = read_coco(os.path.join(set_dir, "gt.json")).categories
    sampler = EpisodeSampler(train, seed=args.seed, absent_prob=args.absent, balance_sets=args.balance_sets)
    params = [p for p in model.parameters() if p.requires_grad]
    tuned = [p for p in model.backbone.parameters() if p.requires_grad]
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": heads, "scale": 1.0}]
    if tuned:
        groups.append({"params": tuned, "scale": args.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4, foreach=True)
    model.train()
    t0, step, avg = time.time(), 0, {}
    budget = args.minutes * 60
    if args.deadline:
        budget = min(budget, args.deadline - t0)
    rng = np.random.default_rng(args.seed + 1)
    while step < args.steps and time.time() - t0 < budget:
        frac = min(1.0, max((time.time() - t0) / budget, step / args.steps))  # cosine over the run
        lr = args.lr * (min(1.0, (step + 1) / args.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        episodes = [sampler.sample() for _ in range(args.batch)]
        flips = [bool(rng.random() < 0.5) and train[e["target"]].valid_wh == (1.0, 1.0)
                 and train[e["source"]].valid_wh == (1.0, 1.0) for e in episodes]
        names = [names_of[e["group"]][e["label"]] if e["group"] in names_of else None for e in episodes]
        losses = episode_losses(model, train, episodes, flips, args.queries, names, denoise=args.denoise)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        step += 1
        if step % 50 == 0 and args.device == "cpu":  # share the 2 cores politely when other work runs
            torch.set_num_threads(1 if os.getloadavg()[0] > 3 else args.threads)
        for k, v in losses.items():
            v = float(v.detach())
            avg[k] = 0.98 * avg.get(k, v) + 0.02 * v
        if step % 25 == 0:
            log(f"step {step} lr {lr:.2e} " + " ".join(f"{k} {v:.3f}" for k, v in avg.items())
                + f" total {sum(avg.values()):.3f} ({(time.time() - t0) / step:.2f} s/step)")
        if step % 250 == 0:
            model.save(args.out, {"steps": step})
    model.cpu().eval()   # calibration and the saved weights are on the CPU, where inference runs
    for im in held:
        im.features = [f.cpu() for f in im.features]
    cal = calibrate_threshold(model, held) if held else {}
    if cal:
        model.cfg.score_threshold = round(cal["score_threshold"], 3)
        log(f"calibration on {len(held)} held-out images: {cal}")
    model.save(args.out, {"steps": step, "minutes": round((time.time() - t0) / 60, 1),
                          "calibration": cal, "seed": args.seed, "batch": args.batch,
                          "synthetic_scenes": sum(im.group.startswith(SYNTHETIC_GROUP) for im in train),
                          "zoom_out": args.zoom_out, "zoom_in": args.zoom_in, "turn": args.turn, "lr": args.lr,
                          "absent": args.absent,
                          "train_images": len(train), "tune_backbone": args.tune_backbone, "denoise": args.denoise,
                          "backbone_lr_scale": args.backbone_lr_scale if args.tune_backbone else None,
                          "exclude_sets": sorted(exclude),
                          "class_queries": model.cfg.class_queries,
                          "balance_sets": args.balance_sets})
    log(f"saved {args.out} after {step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
