"""Hungarian matching between predictions and targets (DETR), cost = 2 cls + 5 L1 + 2 GIoU."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .box_ops import cxcywh_to_xyxy, generalized_box_iou

COST_CLASS, COST_L1, COST_GIOU = 2.0, 5.0, 2.0


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """logits (Q,), boxes (Q, 4) and targets (G, 4) cx, cy, w, h in [0, 1] -> cost (Q, G).
    The class cost is the focal-loss difference used by Deformable DETR / DINO."""
    p = logits.sigmoid()[:, None]
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    c_cls = pos - neg
    c_l1 = torch.cdist(boxes, targets, p=1)
    c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
    return COST_CLASS * c_cls + COST_L1 * c_l1 + COST_GIOU * c_giou


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor):
    """One-to-one assignment minimising match_cost -> (pred indices, target indices), LongTensors."""
    if targets.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty
    cost = match_cost(logits.float(), boxes.float(), targets.float())
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.long, device=logits.device),
            torch.as_tensor(cols, dtype=torch.long, device=logits.device))


@torch.no_grad()
def topk_inside_match(logits: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor,
                      targets: torch.Tensor, k: int = 4):
    """One-to-many assignment for the dense proposals: each target takes the k lowest-cost tokens
    whose anchor centre lies inside it; a token claimed twice keeps its cheapest target.
    anchors (N, 4) cx, cy, w, h -> (token indices, target indices)."""
    if targets.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty
    cost = match_cost(logits.float(), boxes.float(), targets.float())       # (N, G)
    t = cxcywh_to_xyxy(targets)
    cx, cy = anchors[:, 0:1], anchors[:, 1:2]
    inside = (cx > t[:, 0]) & (cx < t[:, 2]) & (cy > t[:, 1]) & (cy < t[:, 3])
    cost = cost.masked_fill(~inside, float("inf"))
    kk = min(k, cost.shape[0])
    vals, idx = cost.topk(kk, dim=0, largest=False)                           # (k, G)
    ok = torch.isfinite(vals)
    tok, tgt = idx[ok], torch.arange(cost.shape[1], device=idx.device).expand(kk, -1)[ok]
    c = vals[ok]
    order = torch.argsort(c)                       # cheapest first; keep first occurrence per token
    tok, tgt = tok[order], tgt[order]
    first = torch.ones_like(tok, dtype=torch.bool)
    seen = set()
    for i, t_i in enumerate(tok.tolist()):
        first[i] = t_i not in seen
        seen.add(t_i)
    return tok[first], tgt[first]
