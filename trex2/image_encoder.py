"""Image encoder: projects the backbone's multi-scale maps to a common width and refines them with
multi-scale deformable self-attention layers (Deformable DETR encoder). Run once per image.

To keep it affordable on a CPU, as in Lite DETR, only the tokens of levels >= `first_query_level`
are updated by the attention layers (they still sample all levels, the fine stride-8 map included);
the stride-8 tokens, 3/4 of all tokens, keep their projected backbone features."""
from __future__ import annotations

import torch
from torch import nn

from .deformable_attention import MSDeformAttn
from .position_encoding import grid_sine_embed


class EncoderLayer(nn.Module):
    def __init__(self, d: int, n_levels: int, n_heads: int, n_points: int, d_ffn: int, dropout: float):
        super().__init__()
        self.attn = MSDeformAttn(d, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d_ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ffn, d))
        self.norm2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, q, pos, ref, value, shapes):
        """q (B, Q, d) the tokens being updated, value (B, N, d) all tokens."""
        x = self.norm1(q + self.drop(self.attn(q + pos, ref, value, shapes)))
        return self.norm2(x + self.drop(self.ffn(x)))


class ImageEncoder(nn.Module):
    """features [(B, C_l, h_l, w_l)] -> memory (B, N, d), pos (B, N, d), shapes [(h_l, w_l)], with
    N = sum of h_l * w_l, levels ordered fine to coarse."""

    def __init__(self, in_channels=(40, 112, 320), d: int = 128, layers: int = 1, n_heads: int = 4,
                 n_points: int = 4, d_ffn: int = 512, dropout: float = 0.0, first_query_level: int = 1):
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in in_channels)
        self.level_embed = nn.Parameter(torch.randn(len(in_channels), d) * 0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(d, len(in_channels), n_heads, n_points, d_ffn, dropout) for _ in range(layers))
        self.d = d
        self.first_query_level = first_query_level

    def forward(self, features: list[torch.Tensor]):
        tokens, pos, refs, shapes = [], [], [], []
        for lvl, (f, proj) in enumerate(zip(features, self.input_proj)):
            B, _, h, w = f.shape
            shapes.append((h, w))
            tokens.append(proj(f).flatten(2).transpose(1, 2))
            pos.append((grid_sine_embed(h, w, self.d, f.device) + self.level_embed[lvl]).expand(B, -1, -1))
            refs.append(cell_boxes(h, w, lvl, f.device).expand(B, -1, -1))
        x, pos, ref = torch.cat(tokens, 1), torch.cat(pos, 1), torch.cat(refs, 1)
        s = sum(h * w for h, w in shapes[:self.first_query_level])
        for layer in self.layers:
            x = torch.cat([x[:, :s], layer(x[:, s:], pos[:, s:], ref[:, s:], x, shapes)], 1)
        return x, pos, shapes


def cell_boxes(h: int, w: int, level: int, device=None) -> torch.Tensor:
    """Anchor box of each cell of an h x w map: centre of the cell, side 0.05 * 2^level of the canvas
    (the scale this level is meant for). -> (1, h * w, 4) cx, cy, w, h in [0, 1]."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    side = torch.full_like(xx, 0.05 * 2 ** level)
    return torch.stack([xx, yy, side, side], -1).view(1, -1, 4)
