"""Tests for trex2.synthetic: determinism, box validity and that boxes sit on the pasted objects."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from trex2.synthetic import (ObjectSource, Scene, _mutate, _random_spec, _render_spec, generate_scene,
                             load_object_sources)

TRAIN_ROOT = Path("/work/shared/data/train")
SEEDS = range(16)


def _fake_sources(n: int = 3) -> list[ObjectSource]:
    """Small in-memory 'photos': noise images with a few labelled bright rectangles."""
    rng = np.random.default_rng(123)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
        boxes = np.array([[10, 20, 60, 90], [100, 30, 180, 70], [50, 120, 120, 190]], np.float32)
        for x0, y0, x1, y1 in boxes.astype(int):
            img[y0:y1, x0:x1] = (40 * i, 200, 255 - 40 * i)
        out.append(ObjectSource(img, boxes, [f"fake/a{i}", "fake/b", f"fake/c{i % 2}"]))
    return out


def _box_errors(scene: Scene) -> list[str]:
    """Problems with a scene's boxes, judged against its object-free background layer."""
    img, bg, boxes, occ = scene.image, scene.background, scene.boxes, scene.instance_map
    h, w = img.shape[:2]
    differs = np.abs(img.astype(np.int16) - bg.astype(np.int16)).max(2) > 0
    errors = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            errors.append(f"box {i} {boxes[i]} outside the image or degenerate")
            continue
        ys, xs = np.nonzero(occ == i)
        if len(xs) == 0 or (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) != (x0, y0, x1, y1):
            errors.append(f"box {i} {boxes[i]} is not the tight box of its visible mask")
            continue
        inside = differs[int(y0):int(y1), int(x0):int(x1)]
        own = (occ == i)[int(y0):int(y1), int(x0):int(x1)]
        if inside[own].mean() < 0.5:   # (not 1.0: dark or bright pixels can clip to 0 / 255 on both)
            errors.append(f"box {i}: its object pixels do not differ from the background")
    # Nothing differing from the background may lie far from a labelled object (soft alpha edges
    # below 0.5 and the global blur spread changes < 12 px beyond the visible masks).
    near = cv2.dilate((occ >= 0).astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    stray = int((differs & ~near).sum())
    if stray:
        errors.append(f"{stray} changed pixels far from every labelled object (unlabelled paste?)")
    return errors


def test_deterministic_for_a_seed():
    a = generate_scene(np.random.default_rng(7))
    b = generate_scene(np.random.default_rng(7))
    c = generate_scene(np.random.default_rng(8))
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("with_sources", [False, True])
def test_scene_contract_and_boxes_on_objects(with_sources):
    sources = _fake_sources() if with_sources else None
    for seed in SEEDS:
        s = generate_scene(np.random.default_rng(seed), 320, sources, return_background=True)
        assert s.image.dtype == np.uint8 and s.image.shape == (320, 320, 3)
        assert s.boxes.dtype == np.float32 and s.boxes.shape == (len(s.labels), 4)
        assert s.labels.dtype == np.int64 and len(s.labels) >= 1
        k = int(s.labels.max()) + 1
        assert 1 <= k <= 4 and set(s.labels.tolist()) == set(range(k)), f"seed {seed}: labels not 0..K-1"
        assert s.instance_map.min() >= -1 and s.instance_map.max() == len(s.labels) - 1
        assert _box_errors(s) == [], f"seed {seed}"


def test_box_check_catches_misplaced_boxes():
    s = generate_scene(np.random.default_rng(3), 320, return_background=True)
    assert _box_errors(s) == []
    shifted = s.boxes.copy()
    shifted[:, [0, 2]] = np.clip(shifted[:, [0, 2]] + (shifted[:, 2:3] - shifted[:, 0:1]), 0, 320)
    bad = Scene(s.image, shifted, s.labels, s.instance_map, s.background)
    assert len(_box_errors(bad)) >= len(s.boxes) // 2
    unlabelled = Scene(s.image, s.boxes[:0], s.labels[:0], np.full_like(s.instance_map, -1), s.background)
    assert any("far from every labelled object" in e for e in _box_errors(unlabelled))


def test_size_and_density_ranges():
    long_sides, max_per_label = [], 0
    for seed in range(40):
        s = generate_scene(np.random.default_rng([99, seed]))
        long_sides += np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]).tolist()
        max_per_label = max(max_per_label, int(np.bincount(s.labels).max()))
    assert min(long_sides) < 14 and max(long_sides) > 150
    assert max_per_label >= 30   # dense counting scenes occur


def _square(spec: dict, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Render a prototype centred on a square canvas (keeps its aspect), premultiplied rgb + alpha."""
    rgb, a = _render_spec(spec, side)
    h, w = a.shape
    n = max(h, w)
    big_rgb, big_a = np.zeros((n, n, 3), np.float32), np.zeros((n, n), np.float32)
    big_rgb[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = rgb * a[..., None]
    big_a[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = a
    return cv2.resize(big_rgb, (side, side)), cv2.resize(big_a, (side, side))


def test_mutated_sibling_prototypes_look_different():
    """Siblings are labelled as different classes, so they must never render (nearly) alike."""
    for seed in range(300):
        rng = np.random.default_rng(seed)
        spec = _random_spec(rng)
        sibling = _mutate(spec, rng, small=seed % 2 == 1)
        (ra, aa), (rb, ab) = _square(spec), _square(sibling)
        union = np.maximum(aa, ab) > 0.5
        changed = (np.abs(ra - rb).max(2)[union] > 40).mean()
        assert changed >= 0.04, f"seed {seed}: sibling differs on only {changed:.1%} of the object"


def test_plain_tuple_sources_are_accepted():
    plain = [(s.image, s.boxes) for s in _fake_sources()]
    s = generate_scene(np.random.default_rng(5), 256, plain, return_background=True)
    assert _box_errors(s) == []


def test_load_object_sources_refuses_dev(tmp_path):
    (tmp_path / "dev" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="development"):
        load_object_sources(tmp_path / "dev")
    with pytest.raises(FileNotFoundError):
        load_object_sources(tmp_path)


@pytest.mark.skipif(not TRAIN_ROOT.is_dir(), reason="shared training data not present")
def test_load_object_sources_real_data():
    sources = load_object_sources(TRAIN_ROOT, max_per_set=2, rng=np.random.default_rng(0))
    sets = {p.name for p in TRAIN_ROOT.iterdir() if (p / "gt.json").is_file()}
    assert {n.split("/")[0] for s in sources for n in s.names} == sets
    for s in sources:
        h, w = s.image.shape[:2]
        assert s.image.dtype == np.uint8 and max(h, w) <= 640
        assert len(s.boxes) == len(s.names) >= 1
        assert (s.boxes[:, 2] > s.boxes[:, 0]).all() and (s.boxes[:, 3] > s.boxes[:, 1]).all()
        assert s.boxes[:, [0, 2]].max() <= w + 0.5 and s.boxes[:, [1, 3]].max() <= h + 0.5
    for seed in range(4):
        scene = generate_scene(np.random.default_rng(seed), 320, sources, return_background=True)
        assert _box_errors(scene) == [], f"seed {seed}"
