"""Sine-cosine position embeddings for feature-map cells and for box / point coordinates."""
from __future__ import annotations

import math

import torch


def sine_embed(coords: torch.Tensor, dim_per_coord: int = 64, temperature: float = 10000.0) -> torch.Tensor:
    """Embed normalised coordinates. coords (..., C) in [0, 1] -> (..., C * dim_per_coord):
    for each coordinate, interleaved sin/cos of coord * 2pi / temperature^(2i / dim_per_coord)."""
    half = dim_per_coord // 2
    freq = temperature ** (torch.arange(half, dtype=coords.dtype, device=coords.device) * 2 / dim_per_coord)
    angles = coords[..., None] * (2 * math.pi) / freq                  # (..., C, half)
    emb = torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)    # (..., C, dim_per_coord)
    return emb.flatten(-2)


def grid_sine_embed(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Position embedding of an h x w map of cell centres -> (h * w, dim), dim split between y and x."""
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return sine_embed(torch.stack([xx, yy], -1).reshape(-1, 2), dim // 2)
