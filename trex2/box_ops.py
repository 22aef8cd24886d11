"""Box tensor helpers used inside the model. In memory the project's convention is xyxy pixels;
inside the network boxes are (cx, cy, w, h) normalised to [0, 1] of the padded input canvas."""
from __future__ import annotations

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
