"""Predictor: encode an image once (cached), turn prompts into class embeddings, detect.

    predictor = Predictor(load_model())
    emb = predictor.encode_image(image)                 # ~backbone + encoder, cached
    cls = predictor.embed_prompts([(emb, boxes_xyxy)])  # prompt path only: cheap
    dets = predictor.detect(emb, {"tomato": cls})       # decoder only: cheap

Boxes and points are in pixels of the image as given (xyxy / xy); inside, everything is in the
normalised frame of the padded canvas the image is resized into (see TRex2.preprocess).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import supervision as sv
import torch

from .box_ops import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from .class_embedding import ClassEmbedding
from .model import TRex2

SCORE_FLOOR = 0.05  # detections below this are never returned


@dataclass
class ImageEmbedding:
    memory: torch.Tensor              # (1, N, d) encoded image tokens
    shapes: list[tuple[int, int]]     # (h, w) of each level
    scale: float                      # canvas pixels per image pixel
    canvas_hw: tuple[int, int]        # padded canvas size in pixels
    valid_wh: tuple[float, float]     # image extent in the canvas, fractions
    image_size: tuple[int, int]       # (H, W) of the original image
    decoder_pre: dict                 # BoxDecoder.precompute(memory): class-independent decoder work

    def _clip(self, b: torch.Tensor) -> torch.Tensor:
        """Clip (K, 4) xyxy pixel boxes to the image."""
        H, W = self.image_size
        return torch.stack([b[:, 0].clamp(0, W), b[:, 1].clamp(0, H), b[:, 2].clamp(0, W), b[:, 3].clamp(0, H)], -1)

    def to_canvas(self, boxes_xyxy: np.ndarray) -> torch.Tensor:
        """(K, 4) xyxy image pixels -> (K, 4) cx, cy, w, h in [0, 1] of the canvas."""
        b = self._clip(torch.as_tensor(np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)))
        ch, cw = self.canvas_hw
        b = b * self.scale / torch.tensor([cw, ch, cw, ch], dtype=torch.float32)
        return xyxy_to_cxcywh(b)

    def to_pixels(self, boxes_cxcywh: torch.Tensor) -> np.ndarray:
        """(K, 4) canvas cx, cy, w, h -> (K, 4) xyxy image pixels, clipped to the image."""
        ch, cw = self.canvas_hw
        b = cxcywh_to_xyxy(boxes_cxcywh) * torch.tensor([cw, ch, cw, ch], dtype=torch.float32) / self.scale
        b = self._clip(b)
        return b.numpy().astype(np.float32)


def nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression -> kept indices, best first."""
    order = torch.argsort(scores, descending=True)
    if len(order) == 0:
        return order
    overlap = (box_iou(boxes_xyxy[order], boxes_xyxy[order])[0] > iou).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def postprocess(logits: torch.Tensor, boxes: torch.Tensor, nms_iou: float, floor: float,
                neg_logits: torch.Tensor | None = None):
    """Queries of one class -> (kept indices, scores, boxes cx, cy, w, h). A negative prompt scales
    each score by sigmoid(logit - negative logit): queries closer to a "not this" example than to the
    class lose most of their score."""
    scores = logits.sigmoid()
    if neg_logits is not None:
        scores = scores * torch.sigmoid(logits - neg_logits)
    idx = torch.nonzero(scores >= floor).flatten()
    keep = idx[nms(cxcywh_to_xyxy(boxes[idx]), scores[idx], nms_iou)]
    return keep, scores[keep], boxes[keep]


class Predictor:
    def __init__(self, model: TRex2, cache_size: int = 32):
        self.model = model.eval()
        self.cache: OrderedDict = OrderedDict()
        self.cache_size = cache_size
        self.encode_count = 0  # number of real (uncached) encodes, for tests and benchmarks

    @property
    def score_threshold(self) -> float:
        return float(self.model.cfg.score_threshold)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray, key=None) -> ImageEmbedding:
        """RGB uint8 (H, W, 3) -> ImageEmbedding, cached by `key` (or by a hash of the pixels)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8):
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {getattr(image, 'shape', type(image))}")
        if key is None:
            key = hashlib.sha1(np.ascontiguousarray(image).data).hexdigest() + str(image.shape)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        x, scale, valid = self.model.preprocess(image)
        memory, shapes = self.model.encode_features(self.model.backbone(x))
        emb = ImageEmbedding(memory, shapes, scale, tuple(x.shape[2:]), valid, image.shape[:2],
                             self.model.decoder.precompute(memory, shapes))
        self.encode_count += 1
        self.cache[key] = emb
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return emb

    @torch.no_grad()
    def _visual_embeddings(self, prompts) -> torch.Tensor:
        """[(emb, boxes, points?), ...] -> (n_images, d): one global-token output per image."""
        out = []
        for item in prompts:
            emb, boxes = item[0], item[1]
            points = item[2] if len(item) > 2 else None
            b = emb.to_canvas(np.zeros((0, 4)) if boxes is None else boxes)
            p = np.zeros((0, 2)) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
            if len(p):
                pb = emb.to_canvas(np.concatenate([p, p], 1))
                b = torch.cat([b, pb], 0)
            if len(b) == 0:
                continue
            is_point = torch.arange(len(b)) >= len(b) - len(p)
            valid = torch.ones(1, len(b), dtype=torch.bool)
            out.append(self.model.encode_prompts(emb.memory, emb.shapes, b[None], is_point[None], valid)[0])
        return torch.stack(out) if out else torch.zeros(0, self.model.cfg.d_model)

    @torch.no_grad()
    def embed_prompts(self, prompts=(), negatives=None, text: str | None = None) -> ClassEmbedding:
        """Exemplars on one or many images -> one ClassEmbedding (mean over images; mean with the
        text embedding when text is given). See the module docstring for the tuple form."""
        visual = self._visual_embeddings(prompts or [])
        parts = []
        if len(visual):
            parts.append(visual.mean(0))
        if text:
            if self.model.text_encoder is None:
                self.model.attach_text_encoder()
            parts.append(self.model.text_encoder([text])[0])
        if not parts:
            raise ValueError("no prompt given: draw at least one box or point, or give a text phrase")
        neg = self._visual_embeddings(negatives or [])
        return ClassEmbedding(torch.stack(parts).mean(0), neg)

    def _decode(self, emb: ImageEmbedding, names, classes, cls, num_queries: int, floor: float):
        """Decoder + postprocess for the classes `names` (embeddings cls (C, d)) -> [(scores, boxes)]."""
        valid = torch.tensor([emb.valid_wh] * len(names))
        outputs, _, queries = self.model.decode(emb.memory, emb.shapes, cls, valid, num_queries,
                                                pre=emb.decoder_pre)
        logits, boxes = outputs[-1]
        out = []
        for c, name in enumerate(names):
            neg = classes[name].negatives
            neg_logits = None
            if neg.numel():
                head = self.model.decoder.class_head
                neg_logits = torch.stack([head(queries[c:c + 1], n[None])[0] for n in neg]).max(0).values
            _, s, b = postprocess(logits[c], boxes[c], self.model.cfg.nms_iou, floor, neg_logits)
            out.append((s, b))
        return out

    @torch.no_grad()
    def detect(self, emb: ImageEmbedding, classes: dict[str, ClassEmbedding],
               score_threshold: float | None = None) -> sv.Detections:
        """Find every instance of each class -> sv.Detections (xyxy image pixels, confidence,
        class_id = index in `classes`, data["class_name"])."""
        floor = max(SCORE_FLOOR, score_threshold or 0.0)
        names = list(classes)
        if not names:
            return sv.Detections.empty()
        cls = torch.stack([classes[n].embedding for n in names])
        cfg = self.model.cfg
        results = self._decode(emb, names, classes, cls, cfg.num_queries, floor)
        # a dense scene: if a class fills half of its queries with confident boxes, look again
        # with more queries (no fixed cap on the number of objects)
        dense = [c for c, (s, _) in enumerate(results)
                 if (s >= self.score_threshold).sum() > 0.5 * cfg.num_queries]
        if dense and cfg.dense_queries > cfg.num_queries:
            again = self._decode(emb, [names[c] for c in dense], classes, cls[dense], cfg.dense_queries, floor)
            for c, r in zip(dense, again):
                results[c] = r
        xyxy = [emb.to_pixels(b) for _, b in results]
        conf = [s.numpy() for s, _ in results]
        ids = [np.full(len(s), c) for c, (s, _) in enumerate(results)]
        xyxy = np.concatenate(xyxy).astype(np.float32)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        class_id = np.concatenate(ids).astype(int)[keep]
        return sv.Detections(xyxy=xyxy[keep], confidence=np.concatenate(conf).astype(np.float32)[keep],
                             class_id=class_id, data={"class_name": np.array(names, dtype=object)[class_id]
                                                      if len(class_id) else np.array([], dtype=object)})
