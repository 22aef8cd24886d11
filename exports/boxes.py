"""Box conversions: the only place xyxy <-> COCO xywh happens (DESIGN.md section 1).

All boxes are float pixels in the EXIF-corrected image frame, as arrays of shape (N, 4).
"""
from __future__ import annotations

import numpy as np

__all__ = ["as_boxes", "clip_xyxy", "xywh_to_xyxy", "xyxy_to_xywh"]


def as_boxes(boxes) -> np.ndarray:
    """Array-like of boxes -> float64 array (N, 4); a single box of 4 numbers gives (1, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {np.shape(boxes)}")
    return arr


def xyxy_to_xywh(boxes) -> np.ndarray:
    """(N, 4) [x1, y1, x2, y2] -> (N, 4) COCO [x, y, w, h] (top-left corner, width, height)."""
    b = as_boxes(boxes).copy()
    b[:, 2:] -= b[:, :2]
    return b


def xywh_to_xyxy(boxes) -> np.ndarray:
    """(N, 4) COCO [x, y, w, h] -> (N, 4) [x1, y1, x2, y2]."""
    b = as_boxes(boxes).copy()
    b[:, 2:] += b[:, :2]
    return b


def clip_xyxy(boxes, width: float, height: float) -> np.ndarray:
    """Clip (N, 4) xyxy boxes to the image [0, width] x [0, height]. Degenerate boxes are kept."""
    b = as_boxes(boxes).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0.0, float(width))
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0.0, float(height))
    return b
