"""Class embeddings: what a set of prompts becomes, and how it is saved for reuse on other folders."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class ClassEmbedding:
    """embedding (d,): the class embedding (mean over prompt images, and with text if given);
    negatives (K, d): embeddings of "not this" examples, one per image they were drawn on;
    object_px: median side sqrt(w * h) of the exemplar boxes in canvas pixels, the size the model
    saw them at (None: unknown, e.g. text only; see trex2.predictor.rescaled_size);
    object_side: the same median in the prompt images' own pixels (what picks the canvas of an
    image searched with a saved class: trex2.predictor.canvas_groups)."""
    embedding: torch.Tensor
    negatives: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    object_px: float | None = None
    object_side: float | None = None


def save_class_embeddings(path: str, classes: dict[str, ClassEmbedding]) -> None:
    """Write {name: ClassEmbedding} to a safetensors file (names in the JSON metadata), atomically."""
    tensors = {}
    for i, ce in enumerate(classes.values()):
        tensors[f"{i}.embedding"] = ce.embedding.detach().float().clone().contiguous()
        if ce.negatives.numel():
            tensors[f"{i}.negatives"] = ce.negatives.detach().float().clone().contiguous()
    meta = {"format": "trex2-class-embeddings", "names": json.dumps(list(classes)),
            "object_px": json.dumps([ce.object_px for ce in classes.values()]),
            "object_side": json.dumps([ce.object_side for ce in classes.values()])}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_class_embeddings(path: str) -> dict[str, ClassEmbedding]:
    """Read a file written by save_class_embeddings -> {name: ClassEmbedding}."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "trex2-class-embeddings":
                raise ValueError(f"{path}: not a class-embedding file")
            names = json.loads(meta["names"])
            if not isinstance(names, list):
                raise ValueError(f"{path}: damaged class-embedding file (names are not a list)")
            # older files: sizes unknown
            sizes = [json.loads(meta.get(k, "null")) or [None] * len(names) for k in ("object_px", "object_side")]
            for v in sizes:
                if not isinstance(v, list) or len(v) != len(names):
                    raise ValueError(f"{path}: damaged class-embedding file ({len(names)} names, "
                                     f"{len(v) if isinstance(v, list) else 'no'} sizes)")
            keys = set(f.keys())
            out = {}
            for i, name in enumerate(names):
                neg = f.get_tensor(f"{i}.negatives") if f"{i}.negatives" in keys else torch.zeros(0, 0)
                out[name] = ClassEmbedding(f.get_tensor(f"{i}.embedding"), neg, sizes[0][i], sizes[1][i])
            return out
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read class embeddings: {e}") from e
    except Exception as e:  # safetensors raises its own error type for non-safetensors files
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"{path}: not a class-embedding file ({e})") from e
