"""Dataset formats: COCO, YOLO and prompt files. The only place they are read or written.

    from exports import read_coco, write_coco, read_prompts, write_prompts, write_yolo
"""
from ._io import atomic_write_json, atomic_write_text
from .boxes import clip_xyxy, xywh_to_xyxy, xyxy_to_xywh
from .coco import (Annotation, CocoDataset, ImageRecord, annotations_from_detections, build_coco,
                   coco_results, image_record, parse_coco, read_coco, write_coco)
from .prompts import Prompt, PromptCategory, PromptSet, read_prompts, write_prompts
from .yolo import read_yolo, write_yolo

__all__ = [
    "Annotation", "CocoDataset", "ImageRecord", "Prompt", "PromptCategory", "PromptSet",
    "annotations_from_detections", "atomic_write_json", "atomic_write_text", "build_coco",
    "clip_xyxy", "coco_results", "image_record", "parse_coco", "read_coco", "read_prompts",
    "read_yolo", "write_coco", "write_prompts", "write_yolo", "xywh_to_xyxy", "xyxy_to_xywh",
]
