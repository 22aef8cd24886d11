"""Visual prompt encoder (T-Rex2 section 3.2).

Each box (cx, cy, w, h) or point (cx, cy) prompt becomes a sine-cosine embedding and a linear layer
(separate layers for boxes and points); a learnable content embedding is added to every prompt, and a
learnable global token is appended. Prompt queries gather image evidence with deformable
cross-attention around their box (a point is treated as a small box), then self-attention mixes the
prompts and the global token, then an FFN. The global token's output is the class embedding of that
image's exemplars; exemplars on several images are averaged into one class embedding (predictor).
"""
from __future__ import annotations

import torch
from torch import nn

from .deformable_attention import MSDeformAttn
from .position_encoding import sine_embed

POINT_BOX_SIZE = 0.05  # side (fraction of the canvas) of the region a point prompt looks at


class PromptLayer(nn.Module):
    def __init__(self, d: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int):
        super().__init__()
        self.cross = MSDeformAttn(d, n_levels, n_heads, n_points, sample_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d_ffn), nn.ReLU(), nn.Linear(d_ffn, d))
        self.norm3 = nn.LayerNorm(d)

    def forward(self, q, pos, ref, memory, shapes, mask):
        q = self.norm1(q + self.cross(q + pos, ref, memory, shapes))
        k = q + pos
        q = self.norm2(q + self.self_attn(k, k, q, key_padding_mask=mask, need_weights=False)[0])
        return self.norm3(q + self.ffn(q))


class PromptEncoder(nn.Module):
    """memory (B, N, d) image tokens; boxes (B, K, 4) cx, cy, w, h in [0, 1]; is_point (B, K) bool
    (for points w, h are ignored); valid (B, K) bool -> class embedding (B, d), one per image row."""

    def __init__(self, d: int = 128, n_levels: int = 3, layers: int = 2, n_heads: int = 4,
                 n_points: int = 4, d_ffn: int = 512):
        super().__init__()
        self.box_proj = nn.Linear(4 * (d // 2), d)
        self.point_proj = nn.Linear(2 * (d // 2), d)
        self.content = nn.Parameter(torch.randn(d) * 0.02)
        self.global_token = nn.Parameter(torch.randn(d) * 0.02)
        self.layers = nn.ModuleList(PromptLayer(d, n_levels, n_heads, n_points, d_ffn) for _ in range(layers))
        self.d = d

    def forward(self, memory, shapes, boxes, is_point, valid):
        B, K, _ = boxes.shape
        d = self.d
        point_boxes = torch.cat([boxes[..., :2], torch.full_like(boxes[..., 2:], POINT_BOX_SIZE)], -1)
        ref = torch.where(is_point[..., None], point_boxes, boxes)
        pos = torch.where(is_point[..., None], self.point_proj(sine_embed(boxes[..., :2], d // 2)),
                          self.box_proj(sine_embed(boxes, d // 2)))
        # the global token looks at the mean of this image's prompt boxes
        w = valid.float()[..., None]
        g_ref = (ref * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        q = torch.cat([self.content.expand(B, K, d), self.global_token.expand(B, 1, d)], 1)
        pos = torch.cat([pos, pos.new_zeros(B, 1, d)], 1)
        ref = torch.cat([ref, g_ref], 1)
        mask = torch.cat([~valid, valid.new_zeros(B, 1)], 1)   # True = ignore
        for layer in self.layers:
            q = layer(q, pos, ref, memory, shapes, mask)
        return q[:, -1]
