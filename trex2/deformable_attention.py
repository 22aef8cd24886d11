"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in pure PyTorch with grid_sample.

Each query looks at `n_points` sampled locations per head and per feature level around its reference
box (cx, cy, w, h normalised): offsets are predicted from the query and scaled by half the box size,
attention weights are a softmax over all levels x points.

The value projection is linear, so it commutes with bilinear sampling and the weighted sum: with
`sample_first` the raw tokens are sampled and each head's slice of the projection is applied to the
few sampled vectors. That is much cheaper when queries are few (decoder, prompt encoder) and the
image has many tokens; the encoder (one query per token) projects first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 128, n_levels: int = 3, n_heads: int = 4, n_points: int = 4,
                 sample_first: bool = False):
        super().__init__()
        self.d, self.L, self.H, self.P = d_model, n_levels, n_heads, n_points
        self.sample_first = sample_first
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # initial offsets spread in n_heads directions, growing with the point index
        theta = torch.arange(self.H, dtype=torch.float32) * (2 * torch.pi / self.H)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.H, 1, 1, 2).repeat(1, self.L, self.P, 1)
        grid = grid * torch.arange(1, self.P + 1, dtype=torch.float32).view(1, 1, -1, 1) / self.P
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, ref_boxes: torch.Tensor, value: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, d); ref_boxes (B, Q, 4) cx, cy, w, h in [0, 1]; value (B, N, d) the flattened
        levels with N = sum(h * w) over `shapes` [(h, w), ...] (batch 1 is broadcast). -> (B, Q, d)."""
        B, Q, _ = query.shape
        H, L, P, dh = self.H, self.L, self.P, self.d // self.H
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        loc = ref_boxes[:, :, None, None, None, :2] + offsets * ref_boxes[:, :, None, None, None, 2:] * 0.5
        grids = 2 * loc - 1                                                 # grid_sample frame [-1, 1]
        if self.sample_first:
            return self.output_proj(self._sample_then_project(value, grids, weights, shapes))
        v = self.value_proj(value.expand(B, -1, -1)).view(B, -1, H, dh)
        out = query.new_zeros(B * H, dh, Q, P)
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            v_l = v[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * H, dh, h, w)
            start += h * w
            g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * H, Q, P, 2)
            s = F.grid_sample(v_l, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            out = out + s * weights[:, :, :, lvl].transpose(1, 2).reshape(B * H, 1, Q, P)
        out = out.sum(-1).view(B, H * dh, Q).transpose(1, 2)
        return self.output_proj(out)

    def _sample_then_project(self, value, grids, weights, shapes):
        """Sample raw d-channel tokens for every head's points, weight, then project per head."""
        B, Q, H, L, P, _ = grids.shape
        d, dh = self.d, self.d // self.H
        value = value.expand(B, -1, -1)
        acc = 0
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            # a (B, d, h, w) view of channels-last tokens: grid_sample reads each point's d values at once
            v_l = value[:, start:start + h * w].transpose(1, 2).reshape(B, d, h, w)
            start += h * w
            s = F.grid_sample(v_l, grids[:, :, :, lvl].reshape(B, Q, H * P, 2), mode="bilinear",
                              padding_mode="zeros", align_corners=False)            # (B, d, Q, H*P)
            # weighted sum over the points as a batched (d, P) @ (P, 1) product per query and head
            acc = acc + (s.view(B, d, Q * H, P).transpose(1, 2) @ weights[:, :, :, lvl].reshape(B, Q * H, P, 1))
        W = self.value_proj.weight.view(H, dh, d)
        out = torch.einsum("bqhd,hed->bqhe", acc.view(B, Q, H, d), W) + self.value_proj.bias.view(H, dh)
        return out.reshape(B, Q, d)
