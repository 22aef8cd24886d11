"""Text prompt encoder (T-Rex2 section 3.2): CLIP text model pooled output + a linear projection to
the class-embedding width. CLIP weights cannot be downloaded here: they are read from a LOCAL
directory (a Hugging Face `CLIPTextModel` + tokenizer saved with `save_pretrained`), given as an
argument or by the environment variable TREX2_CLIP_DIR."""
from __future__ import annotations

import os

import torch
from torch import nn

CLIP_ENV = "TREX2_CLIP_DIR"


class TextEncoderUnavailable(RuntimeError):
    """Raised when a text prompt is used but no usable CLIP text encoder is configured."""


def resolve_clip_dir(clip_dir: str | None = None) -> str:
    """The CLIP directory to use, or TextEncoderUnavailable saying what is needed."""
    clip_dir = clip_dir or os.environ.get(CLIP_ENV)
    if not clip_dir:
        raise TextEncoderUnavailable(
            "text prompts need a local CLIP text model: set TREX2_CLIP_DIR (or pass clip_dir) to a "
            "directory holding a Hugging Face CLIPTextModel and its tokenizer (save_pretrained output), "
            "e.g. openai/clip-vit-base-patch32 copied from a machine with internet access. "
            "Nothing is downloaded at run time. Visual prompts work without it.")
    if not os.path.isfile(os.path.join(clip_dir, "config.json")):
        raise TextEncoderUnavailable(f"{clip_dir!r} is not a saved CLIP model directory (no config.json)")
    return clip_dir


class TextEncoder(nn.Module):
    """phrases [str] -> (len(phrases), d) text class embeddings."""

    def __init__(self, clip_dir: str, d: int):
        super().__init__()
        from transformers import AutoTokenizer, CLIPTextModel
        clip_dir = resolve_clip_dir(clip_dir)
        try:
            self.clip = CLIPTextModel.from_pretrained(clip_dir, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise TextEncoderUnavailable(f"cannot load the CLIP text model from {clip_dir!r}: {e}") from e
        self.clip.requires_grad_(False).eval()
        self.proj = nn.Linear(self.clip.config.hidden_size, d)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # CLIP stays frozen
        return self

    def forward(self, phrases: list[str]) -> torch.Tensor:
        tok = self.tokenizer(phrases, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            pooled = self.clip(**tok).pooler_output
        return self.proj(pooled)
