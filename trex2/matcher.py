"""Prediction-to-target assignment for training, batched over episodes.

Targets of a batch are padded at the end: targets (B, G, 4) cx, cy, w, h in [0, 1] with a mask
valid (B, G) whose True entries come first in each row (see pad_targets). Assignments are returned
as flat index triples (batch, prediction, target) on the predictions' device.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .box_ops import cxcywh_to_xyxy, generalized_box_iou

COST_CLASS, COST_L1, COST_GIOU = 2.0, 5.0, 2.0


def pad_targets(targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(G_b, 4)] -> targets (B, max G_b, 4) zero-padded at the end, valid (B, max G_b) bool."""
    G = max([len(t) for t in targets] + [0])
    ref = targets[0] if targets else torch.zeros(0, 4)
    out = ref.new_zeros(len(targets), G, 4)
    valid = torch.zeros(len(targets), G, dtype=torch.bool, device=ref.device)
    for b, t in enumerate(targets):
        out[b, :len(t)], valid[b, :len(t)] = t, True
    return out, valid


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor,
               alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """logits (..., Q), boxes (..., Q, 4) and targets (..., G, 4) cx, cy, w, h in [0, 1] -> cost
    (..., Q, G) = 2 cls + 5 L1 + 2 (-GIoU). The class cost is the focal-loss difference used by
    Deformable DETR / DINO."""
    p = logits.sigmoid()[..., None]
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()
    c_cls = pos - neg
    c_l1 = torch.cdist(boxes, targets, p=1)
    c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
    return COST_CLASS * c_cls + COST_L1 * c_l1 + COST_GIOU * c_giou


def _empty(device):
    e = torch.zeros(0, dtype=torch.long, device=device)
    return e, e, e


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor):
    """One-to-one assignment minimising match_cost in each episode. logits (B, Q), boxes (B, Q, 4),
    padded targets (B, G, 4) with valid (B, G) -> (batch, pred, target) LongTensors."""
    if targets.shape[1] == 0:
        return _empty(logits.device)
    cost = match_cost(logits.float(), boxes.float(), targets.float()).cpu().numpy()   # one transfer
    n = valid.sum(1).tolist()
    bs, rs, cs = [], [], []
    for b in range(len(cost)):
        if n[b]:
            rows, cols = linear_sum_assignment(cost[b, :, :n[b]])
            bs.append(np.full(len(rows), b))
            rs.append(rows)
            cs.append(cols)
    if not bs:
        return _empty(logits.device)
    return tuple(torch.as_tensor(np.concatenate(x), dtype=torch.long, device=logits.device) for x in (bs, rs, cs))


@torch.no_grad()
def topk_inside_match(logits: torch.Tensor, boxes: torch.Tensor, anchors: torch.Tensor,
                      targets: torch.Tensor, valid: torch.Tensor, k: int = 4):
    """One-to-many assignment for the dense proposals: each target takes the k lowest-cost tokens
    whose anchor centre lies inside it; a token claimed twice keeps its cheapest target.
    logits (B, N), boxes (B, N, 4), anchors (N, 4) cx, cy, w, h, padded targets (B, G, 4) with
    valid (B, G) -> (batch, token, target) LongTensors."""
    B, N = logits.shape
    G = targets.shape[1]
    if G == 0:
        return _empty(logits.device)
    cost = match_cost(logits.float(), boxes.float(), targets.float())      # (B, N, G)
    t = cxcywh_to_xyxy(targets)[:, None]                                     # (B, 1, G, 4)
    cx, cy = anchors[None, :, None, 0], anchors[None, :, None, 1]            # (1, N, 1)
    inside = (cx > t[..., 0]) & (cx < t[..., 2]) & (cy > t[..., 1]) & (cy < t[..., 3]) & valid[:, None]
    cost = cost.masked_fill(~inside, float("inf"))
    kk = min(k, N)
    vals, tok = cost.topk(kk, dim=1, largest=False)                          # (B, k, G)
    ok = torch.isfinite(vals)
    bi = torch.arange(B, device=tok.device)[:, None, None].expand_as(tok)[ok]
    ti = torch.arange(G, device=tok.device)[None, None, :].expand_as(tok)[ok]
    order = torch.argsort(vals[ok])                # cheapest first; keep the first claim of a token
    bi, tok, ti = bi[order], tok[ok][order], ti[order]
    _, first = np.unique((bi * N + tok).cpu().numpy(), return_index=True)
    first = torch.as_tensor(first, dtype=torch.long, device=tok.device)
    return bi[first], tok[first], ti[first]
