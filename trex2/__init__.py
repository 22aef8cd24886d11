"""trex2: a T-Rex2-style visual-prompt detector (arXiv 2403.14610) that runs on a CPU.

    import trex2
    predictor = trex2.Predictor(trex2.load_model())
    emb = predictor.encode_image(image)
    cls = predictor.embed_prompts([(emb, boxes_xyxy)])
    dets = predictor.detect(emb, {"tomato": cls})
"""
from .class_embedding import ClassEmbedding, load_class_embeddings, save_class_embeddings
from .model import ModelConfig, TRex2, load_model
from .predictor import ImageEmbedding, Predictor
from .text_encoder import TextEncoderUnavailable

__all__ = ["ClassEmbedding", "ImageEmbedding", "ModelConfig", "Predictor", "TRex2", "TextEncoderUnavailable",
           "load_class_embeddings", "load_model", "save_class_embeddings"]
