"""Repository-level contracts: layout, requirements, README commands, CI script, demo folder,
and that images are only ever read through trex2.image_io."""
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_COMMAND = "pip install -r requirements.txt && python app.py --images demo/images"
TEST_COMMAND = "pip install -r requirements-test.txt && python -m pytest -q tests"


def _code_files():
    for folder in ("app", "trex2", "exports"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield ROOT / "app.py"


def _requirements(name):
    lines = (ROOT / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def test_layout():
    for d in ("app", "trex2", "exports", "tests"):
        assert (ROOT / d).is_dir(), d
    for f in ("app.py", "requirements.txt", "requirements-test.txt", "README.md", ".ci/run",
              "trex2/image_io.py", "exports/coco.py", "exports/prompts.py", "exports/yolo.py"):
        assert (ROOT / f).is_file(), f


def test_requirements():
    req = _requirements("requirements.txt")
    assert "torch==2.13.0" in req
    gradio = [r for r in req if re.match(r"gradio\b", r)]
    assert gradio and re.search(r"(==|~=|>=)\s*6\.", gradio[0]), gradio
    for name in ("supervision", "pycocotools", "safetensors", "pillow", "numpy"):
        assert any(re.match(rf"{name}\b", r, re.I) for r in req), name
    test_req = _requirements("requirements-test.txt")
    assert "-r requirements.txt" in test_req
    assert any(r.startswith("pytest") for r in test_req)
    for r in req + test_req:
        assert not re.match(r"torchvision\b", r, re.I), r


def test_no_torchvision_import():
    pattern = re.compile(r"^\s*(import|from)\s+torchvision\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _code_files() if pattern.search(p.read_text())]
    assert offenders == []


def test_images_are_read_only_through_image_io():
    """DESIGN.md section 1: one image-reading function. No other module decodes image files."""
    pattern = re.compile(r"\b(Image\.open|cv2\.imread|cv2\.imdecode|imageio\.|iio\.imread)\s*\(?")
    offenders = []
    for p in _code_files():
        if p == ROOT / "trex2" / "image_io.py":
            continue
        for n, line in enumerate(p.read_text().splitlines(), start=1):
            code = line.split("#")[0]
            if pattern.search(code):
                offenders.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def _setup_commands():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Set-up.*?$(.*?)^## ", text, re.S | re.M)
    assert m, "README needs a '## Set-up' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", m.group(1), re.S | re.M)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_the_two_setup_commands():
    assert _setup_commands() == [APP_COMMAND, TEST_COMMAND]
    text = (ROOT / "README.md").read_text()
    for section in ("## Command line", "## Prompt files", "## Data and weights", "## Model card",
                    "## Labeling a folder in 5 minutes"):
        assert section in text, section


def test_ci_runs_the_readme_test_command_verbatim():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")
    assert "set -euo pipefail" in text
    lines = [ln.strip() for ln in text.splitlines()]
    assert _setup_commands()[1] in lines
    assert lines.index(TEST_COMMAND) == max(i for i, ln in enumerate(lines) if ln)  # runs last
    assert "/usr/bin/chromium" in text
    subprocess.run(["bash", "-n", str(ci)], check=True)


def test_app_help_works():
    r = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    for command in ("label", "eval", "bench", "train"):
        assert command in r.stdout


def test_bench_refuses_counts_below_one(capsys):
    from app.bench import main

    for option in ("--repeat", "--n-images", "--memory-images"):
        with pytest.raises(SystemExit):
            main([option, "0"])
        assert f"argument {option}: a whole number >= 1, got '0'" in capsys.readouterr().err


def test_demo_folder():
    from pycocotools.coco import COCO

    from exports import read_coco, read_prompts
    from trex2.image_io import list_images, load_image

    demo = ROOT / "demo"
    total = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024
    images = list_images(demo / "images")
    assert len(images) >= 10
    for rel in images:
        arr = load_image(demo / "images" / rel)
        assert arr.ndim == 3 and arr.shape[2] == 3
    attribution = (demo / "ATTRIBUTION.md").read_text()
    for needed in ("MIT", "CC BY 4.0", "shenggan", "pa-iwi1f"):
        assert needed in attribution
    for sub in ("blood", "tomato"):
        with contextlib.redirect_stdout(io.StringIO()):
            COCO(str(demo / f"gt-{sub}.json"))
        gt = read_coco(demo / f"gt-{sub}.json")
        assert sorted(im.file_name for im in gt.images) == list_images(demo / "images" / sub)
        assert len(gt.annotations) > 0
        ps = read_prompts(demo / f"prompts-{sub}.json")
        assert ps.prompts and all(p.is_file() for p in ps.images())
        assert set(ps.category_names) == set(gt.categories)


@pytest.mark.skipif(not Path("/work/shared/data/dev").is_dir(), reason="dev data not present")
def test_demo_uses_no_dev_image():
    import hashlib

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    dev = {digest(p) for p in Path("/work/shared/data/dev").rglob("*.jpg")}
    demo = [p for p in (ROOT / "demo" / "images").rglob("*") if p.is_file()]
    assert demo and not any(digest(p) in dev for p in demo)
