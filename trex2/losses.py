"""Training losses (T-Rex2 section 3.4): sigmoid focal classification, L1 + GIoU boxes, and the
InfoNCE alignment between text and visual class embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou

W_CLASS, W_L1, W_GIOU = 2.0, 5.0, 2.0


def sigmoid_focal_loss(logits, labels, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed focal loss over all elements; labels are 0/1 floats of logits' shape."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    a_t = alpha * labels + (1 - alpha) * (1 - labels)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def detection_loss(logits, boxes, targets, match, num_boxes: float,
                   soft_labels: bool = True) -> dict[str, torch.Tensor]:
    """logits (B, Q), boxes (B, Q, 4), padded targets (B, G, 4) cx, cy, w, h; match = (batch, pred,
    target) index triples from matcher.py. Classification target of a matched query is its IoU with
    the target (IoU-aware, helps score calibration) when soft_labels, else 1; unmatched queries
    are negatives. Losses are summed and normalised by num_boxes."""
    bi, pi, ti = match
    labels = torch.zeros_like(logits)
    if len(pi):
        pb, tb = cxcywh_to_xyxy(boxes[bi, pi]), cxcywh_to_xyxy(targets[bi, ti])
        giou = generalized_box_iou(pb[:, None], tb[:, None])[:, 0, 0]
        if soft_labels:
            labels[bi, pi] = box_iou(pb.detach()[:, None], tb[:, None])[0][:, 0, 0].clamp(min=0.01)
        else:
            labels[bi, pi] = 1.0
        l1 = F.l1_loss(boxes[bi, pi], targets[bi, ti], reduction="sum") / num_boxes
        lg = (1 - giou).sum() / num_boxes
    else:
        l1 = lg = boxes.sum() * 0
    lc = sigmoid_focal_loss(logits, labels) / num_boxes
    return {"cls": W_CLASS * lc, "l1": W_L1 * l1, "giou": W_GIOU * lg}


def contrastive_alignment_loss(visual: torch.Tensor, text: torch.Tensor, temperature: float = 0.07):
    """InfoNCE between visual (C, d) and text (C, d) class embeddings of C classes: each visual
    embedding must pick its own class's text among the batch's classes (the other classes are
    the negatives)."""
    v = F.normalize(visual, dim=-1)
    t = F.normalize(text, dim=-1)
    logits = v @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(v), device=v.device))
