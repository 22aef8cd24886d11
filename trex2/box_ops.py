"""Box tensor helpers used inside the model. In memory the project's convention is xyxy pixels;
inside the network boxes are (cx, cy, w, h) normalised to [0, 1] of the padded input canvas."""
from __future__ import annotations

import numpy as np
import torch


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2 (same units)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) cx, cy, w, h (same units)."""
    x1, y1, x2, y2 = b.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...) area."""
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes a (..., N, 4), b (..., M, 4) -> (..., N, M), (..., N, M)."""
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU of xyxy boxes a (..., N, 4), b (..., M, 4) -> (..., N, M) in [-1, 1]."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.max(a[..., :, None, 2:], b[..., None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Logit of x clamped to [eps, 1 - eps]."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def greedy_match(iou: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Detections (rows, in descending score order) to ground truths (columns) of an (N, M) IoU
    matrix, as in detection AP: each detection takes the best still-free ground truth with IoU >=
    threshold -> (N,) matched column index, -1 for a false positive."""
    match = torch.full((iou.shape[0],), -1, dtype=torch.long)
    free = torch.ones(iou.shape[1], dtype=torch.bool)
    for i in range(iou.shape[0]):
        if not free.any():
            break
        cand = torch.where(free, iou[i], torch.full_like(iou[i], -1.0))
        j = int(cand.argmax())
        if cand[j] >= threshold:
            match[i] = j
            free[j] = False
    return match


def nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression -> kept indices, best first."""
    order = torch.argsort(scores, descending=True)
    if len(order) == 0:
        return order
    overlap = (box_iou(boxes_xyxy[order], boxes_xyxy[order])[0] > iou).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def postprocess(logits: torch.Tensor, boxes: torch.Tensor, nms_iou: float, floor: float,
                neg_logits: torch.Tensor | None = None):
    """Queries of one class -> (kept indices, scores, boxes cx, cy, w, h). A negative prompt scales
    each score by min(1, 2 sigmoid(logit - negative logit)): a query closer to a "not this" example
    than to the class loses score (about half at a logit gap of 1, nine tenths at 3); one closer to
    the class keeps its score, so the recommended threshold still holds (plain sigmoid(logit -
    negative logit) damped every score: README, "Negative prompts")."""
    scores = logits.sigmoid()
    if neg_logits is not None:
        scores = scores * (2 * torch.sigmoid(logits - neg_logits)).clamp(max=1.0)
    idx = torch.nonzero(scores >= floor).flatten()
    keep = idx[nms(cxcywh_to_xyxy(boxes[idx]), scores[idx], nms_iou)]
    return keep, scores[keep], boxes[keep]


def mirror_boxes(b: torch.Tensor, valid_w: float) -> torch.Tensor:
    """(..., 4) cx, cy, w, h in a canvas holding an image of width valid_w (fraction, left-aligned)
    -> the same boxes in the canvas of the image flipped left-right (and back: its own inverse)."""
    return torch.cat([valid_w - b[..., :1], b[..., 1:]], -1)


def fuse_mirrored(sa: torch.Tensor, ba: torch.Tensor, sb: torch.Tensor, bb: torch.Tensor,
                  floor: float, iou: float = 0.55) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted box fusion of two detection sets of one class on one image (scores (Ka,), (Kb,);
    boxes (Ka, 4), (Kb, 4) cx, cy, w, h in one frame), e.g. the image and its mirror. In descending
    score order each box takes the best-overlapping free box of the other set (IoU > iou): the pair
    becomes one box, their score-weighted mean, scored by the mean score; an unpaired box keeps half
    its score (the other set scored it 0). Results under floor are dropped -> scores (K,), boxes (K, 4)."""
    s, b = torch.cat([sa, sb]), torch.cat([ba, bb])
    n = len(s)
    if n == 0:
        return s, b
    overlap = box_iou(cxcywh_to_xyxy(b), cxcywh_to_xyxy(b))[0].numpy()
    other = (np.arange(n) >= len(sa))
    overlap[other[:, None] == other[None, :]] = 0.0      # pairs only across the two sets
    sn, free = s.numpy(), np.ones(n, dtype=bool)
    out_s, out_b = [], []
    for i in np.argsort(-sn, kind="stable"):
        if not free[i]:
            continue
        free[i] = False
        cand = np.where(free, overlap[i], 0.0)
        j = int(cand.argmax())
        if cand[j] > iou:
            free[j] = False
            out_b.append((b[i] * s[i] + b[j] * s[j]) / (s[i] + s[j]))
            out_s.append((s[i] + s[j]) / 2)
        else:
            out_b.append(b[i])
            out_s.append(s[i] / 2)
    scores, boxes = torch.stack(out_s), torch.stack(out_b)
    keep = torch.nonzero(scores >= floor).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True)]
    return scores[keep], boxes[keep]
