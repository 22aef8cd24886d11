"""DINO-style box decoder conditioned on a class embedding (T-Rex2 section 3.3).

1. Proposals: every encoder token predicts a box relative to its cell anchor and a class logit (dot
   product of the token and the class embedding).
2. Query selection: the top-K tokens by that logit become the queries; their proposal boxes are the
   initial reference boxes and their features the initial content (detached, as in two-stage DETRs).
3. Decoder layers: self-attention between queries, deformable cross-attention to the image tokens
   around the reference box, FFN; each layer refines the box (iterative refinement in logit space)
   and is classified by the dot product with the class embedding.
Optionally (class_queries, not in T-Rex2) a linear map of the class embedding is added to the queries
before each layer, so that where they look and how they box can depend on the prompt.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .box_ops import inverse_sigmoid
from .deformable_attention import MSDeformAttn
from .image_encoder import cell_boxes
from .position_encoding import sine_embed


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class ClassHead(nn.Module):
    """logit = <W q + w0, c> / sqrt(d) + b: q (B, Q, d) queries, c (B, d) class embeddings -> (B, Q).
    Computed as <q, W^T c> so that the cost per query is one dot product."""

    def __init__(self, d: int, prior: float = 0.01):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.tensor(-math.log((1 - prior) / prior)))
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, q, c):
        w = c @ self.proj.weight                                   # (B, d)
        return (torch.einsum("bqd,bd->bq", q, w) + (c * self.proj.bias).sum(-1, keepdim=True)) \
            * self.scale + self.bias


class DecoderLayer(nn.Module):
    def __init__(self, d, n_levels, n_heads, n_points, d_ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, n_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.cross = MSDeformAttn(d, n_levels, n_heads, n_points, sample_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d_ffn), nn.ReLU(), nn.Linear(d_ffn, d))
        self.norm3 = nn.LayerNorm(d)

    def forward(self, q, pos, ref, memory, shapes):
        k = q + pos
        q = self.norm1(q + self.self_attn(k, k, q, need_weights=False)[0])
        q = self.norm2(q + self.cross(q + pos, ref, memory, shapes))
        return self.norm3(q + self.ffn(q))


class BoxDecoder(nn.Module):
    def __init__(self, d: int = 128, n_levels: int = 3, layers: int = 3, n_heads: int = 4,
                 n_points: int = 4, d_ffn: int = 512, class_queries: bool = False):
        super().__init__()
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_box = MLP(d, d, 4, 3)
        self.class_head = ClassHead(d)
        self.query_pos = MLP(2 * d, d, d, 2)
        self.layers = nn.ModuleList(DecoderLayer(d, n_levels, n_heads, n_points, d_ffn) for _ in range(layers))
        self.box_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(layers))
        for head in [self.enc_box, *self.box_heads]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.d = d
        self.query_cond = None
        if class_queries:
            self.add_class_queries()

    def add_class_queries(self) -> None:
        """Per layer, a linear map (d -> d) of the class embedding added to every query, initialised
        to zero so that trained weights without it give the same outputs. Draws no random numbers."""
        with torch.random.fork_rng(devices=[]):   # leave the seeded stream of a training run alone
            self.query_cond = nn.ModuleList(nn.Linear(self.d, self.d) for _ in self.layers)
        for lin in self.query_cond:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def precompute(self, memory, shapes) -> dict:
        """Class-independent work on an image's tokens (cached per image by the predictor):
        proposal features (B, N, d) and anchors (1, N, 4)."""
        anchors = torch.cat([cell_boxes(h, w, lvl, memory.device) for lvl, (h, w) in enumerate(shapes)], 1)
        return {"feat": self.enc_output(memory), "anchors": anchors}

    def proposal_boxes(self, feat, anchors, idx):
        """Boxes of the proposals at token indices idx (B, M) -> (B, M, 4) cx, cy, w, h."""
        rows = torch.arange(len(idx), device=idx.device)[:, None]
        return (self.enc_box(feat[rows, idx]) + inverse_sigmoid(anchors[0][idx])).sigmoid()

    def forward(self, memory, shapes, class_emb, valid_wh, num_queries: int, pre: dict | None = None):
        """memory (B or 1, N, d); class_emb (B, d); valid_wh (B, 2) the image's extent in the canvas;
        pre: precompute(memory) to skip class-independent work.
        Returns a list over decoder layers of (logits (B, K), boxes (B, K, 4) cx, cy, w, h in [0, 1]),
        the proposal logits (B, N) with the selected indices (B, K), and the last queries (B, K, d).
        Proposal boxes of other tokens: proposal_boxes(pre["feat"], pre["anchors"], idx)."""
        B = class_emb.shape[0]
        pre = pre or self.precompute(memory, shapes)
        feat, anchors = pre["feat"].expand(B, -1, -1), pre["anchors"]
        enc_logits = self.class_head(feat, class_emb)
        inside = (anchors[..., 0] < valid_wh[:, None, 0]) & (anchors[..., 1] < valid_wh[:, None, 1])
        enc_logits = enc_logits.masked_fill(~inside, float("-inf"))
        k = min(num_queries, memory.shape[1])
        idx = enc_logits.topk(k, dim=1).indices
        q = feat[torch.arange(B, device=idx.device)[:, None], idx].detach()
        ref = self.proposal_boxes(feat, anchors, idx).detach()
        outputs, q = self.refine(memory, shapes, class_emb, q, ref)
        return outputs, (enc_logits.masked_fill(enc_logits.isinf(), -30.0), idx), q

    def refine(self, memory, shapes, class_emb, q, ref):
        """The decoder layers from initial queries q (B, K, d) at reference boxes ref (B, K, 4)
        cx, cy, w, h -> ([(logits (B, K), boxes (B, K, 4)) per layer], last queries (B, K, d)).
        forward() starts them from the selected proposals; training also starts them from noised
        target boxes (denoising, as in DN-DETR / DINO)."""
        outputs = []
        for i, (layer, box_head) in enumerate(zip(self.layers, self.box_heads)):
            if self.query_cond is not None:
                q = q + self.query_cond[i](class_emb)[:, None]
            pos = self.query_pos(sine_embed(ref, self.d // 2))
            q = layer(q, pos, ref, memory, shapes)
            boxes = (box_head(q) + inverse_sigmoid(ref)).sigmoid()
            outputs.append((self.class_head(q, class_emb), boxes))
            ref = boxes.detach()
        return outputs, q
