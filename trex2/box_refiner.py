"""Box refiner: a second-stage box head on the decoder's detections (not part of T-Rex2; the idea of
Cascade R-CNN's refinement stage and IoU-Net's localisation score). The decoder sees each query's
neighbourhood through a few deformable sampling points on stride-8..32 maps; the refiner looks at
a dense grid of backbone features (strides 4, 8, 16) over a window around each box and predicts a
correction of its centre and size, plus the IoU of the corrected box with its object.
Class-agnostic: it learns where the edges of the object under a box are, not what the object is,
and how the labels it trained on draw them; off unless trained (ModelConfig.refine_iters)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import OUT_CHANNELS, STRIDE4_CHANNELS

DELTA_STD = (0.1, 0.1, 0.2, 0.2)   # scale of the regression targets (R-CNN's normalisation)


def encode_deltas(boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K, 4) cx, cy, w, h boxes and their targets -> (K, 4) normalised deltas (dx / w, dy / h,
    log of the size ratios, each divided by DELTA_STD)."""
    d = torch.cat([(targets[:, :2] - boxes[:, :2]) / boxes[:, 2:],
                   torch.log(targets[:, 2:] / boxes[:, 2:])], 1)
    return d / d.new_tensor(DELTA_STD)


def apply_deltas(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_deltas: (K, 4) boxes + (K, 4) deltas -> (K, 4) cx, cy, w, h."""
    d = deltas * deltas.new_tensor(DELTA_STD)
    return torch.cat([boxes[:, :2] + d[:, :2] * boxes[:, 2:],
                      boxes[:, 2:] * torch.exp(d[:, 2:].clamp(max=2.0))], 1)


class BoxRefiner(nn.Module):
    """maps [(1, C_l, H/s_l, W/s_l)] of one square canvas + boxes (K, 4) cx, cy, w, h in [0, 1] of
    the canvas -> refined boxes (K, 4), IoU logits (K,)."""

    def __init__(self, in_channels=(STRIDE4_CHANNELS, *OUT_CHANNELS[:2]), width: int = 64, grid: int = 12,
                 context: float = 1.5, hidden: int = 256):
        super().__init__()
        self.grid, self.context = grid, context
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.convs = nn.Sequential(
            nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU())
        side = (grid + 1) // 2
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 5))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def sample_points(self, boxes: torch.Tensor) -> torch.Tensor:
        """(K, 4) canvas boxes -> (1, K, G*G, 2) grid_sample coordinates in [-1, 1]: a G x G grid of
        cell centres over the box enlarged `context` times about its centre."""
        g = self.grid
        t = (torch.arange(g, dtype=boxes.dtype, device=boxes.device) + 0.5) / g - 0.5
        ys, xs = torch.meshgrid(t, t, indexing="ij")
        win = boxes[:, None, 2:] * self.context
        pts = boxes[:, None, :2] + torch.stack([xs.flatten(), ys.flatten()], -1)[None] * win
        return (pts * 2 - 1)[None]

    def roi_features(self, maps: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """-> (K, width, G, G): each level sampled on the box's grid, projected and summed."""
        pts = self.sample_points(boxes)
        x = 0
        for m, conv in zip(maps, self.reduce):
            s = F.grid_sample(m.float(), pts, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = x + conv(s[0].permute(1, 0, 2).reshape(len(boxes), -1, self.grid, self.grid))
        return x

    def predict(self, x: torch.Tensor, boxes: torch.Tensor):
        """roi_features' (K, width, G, G) for boxes (K, 4) -> refined boxes (K, 4), IoU logits (K,)."""
        out = self.head(self.convs(x))
        return apply_deltas(boxes, out[:, :4]), out[:, 4]

    def forward(self, maps: list[torch.Tensor], boxes: torch.Tensor):
        if len(boxes) == 0:
            return boxes, boxes.new_zeros(0)
        return self.predict(self.roi_features(maps, boxes), boxes)
