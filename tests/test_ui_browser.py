"""The labeling app in a real browser (headless Debian Chromium via Playwright).

Starts the app (real model) on a free port on a tiny folder, draws a box prompt with the
mouse, detects in this image and in all images, reviews with the keyboard, accepts, exports
COCO through the download link and loads it with pycocotools; checks that a second tab on the
same folder never overwrites the first one's work; checks the page made no
request to another host, and prints the detect-click-to-boxes-on-screen latency for an
already-encoded image.

    python -m pytest -q tests/test_ui_browser.py -s
    python tests/test_ui_browser.py --screenshot docs/screenshot.png   # demo-folder screenshot
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if not Path(CHROMIUM).exists() and not IN_CI:
    pytest.skip(f"{CHROMIUM} is missing (install Debian's 'chromium' package); outside CI the "
                f"browser test is skipped", allow_module_level=True)

DEMO = REPO / "demo"
SRC_IMAGES = ["images/blood/BloodImage_00113.jpg", "images/blood/BloodImage_00264.jpg",
              "images/tomato/31_jpeg.rf.23cfb9d20b384c46382d4b3dcadda0b6.jpg"]
SIDE = 320  # test images are downscaled to this long side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_folder(dest: Path) -> dict[str, list[list[float]]]:
    """Copy 3 demo images at SIDE px into dest; returns {file: GT boxes xyxy at that size}."""
    from PIL import Image

    from exports import read_coco
    from trex2.image_io import load_image

    gt = read_coco(DEMO / "gt-blood.json")
    dest.mkdir(parents=True, exist_ok=True)
    boxes = {}
    for k, rel in enumerate(SRC_IMAGES):
        im = Image.fromarray(load_image(DEMO / rel))
        scale = SIDE / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR)
        name = f"img{k}.jpg"
        im.save(dest / name, quality=92)
        boxes[name] = [[v * scale for v in a.box] for a in gt.annotations
                       if a.image == Path(rel).name and a.category == "RBC"]
    return boxes


def _launch(images: Path, project: Path, engine=None):
    from app import ui

    port = _free_port()
    demo, url = ui.launch(images, project, "127.0.0.1", port, engine=engine,
                          prevent_thread_lock=True, quiet=True)
    return demo, url


@contextlib.contextmanager
def _served(images: Path, project: Path, engine=None):
    """The app running on images (its URL); closed after, GRADIO_TEMP_DIR as it was."""
    saved_env = os.environ.get("GRADIO_TEMP_DIR")
    demo, url = _launch(images, project, engine)
    try:
        yield url
    finally:
        demo.close()
        if saved_env is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_env


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def _wait_view(page, cond: str, timeout: float = 60_000):
    """Wait until the canvas's current view satisfies the JS expression ``cond`` over
    ``v`` (the view) and ``r`` (window.trexCanvas.lastRender)."""
    page.wait_for_function(
        f"() => {{ const a = window.trexCanvas; if (!a || !a.getView) return false;"
        f" const v = a.getView(), r = a.lastRender; return !!(v && r && ({cond})); }}",
        timeout=timeout)


def _view(page) -> dict:
    return page.evaluate("window.trexCanvas.getView()")


def _to_page(page, x: float, y: float) -> tuple[float, float]:
    """Image pixel (x, y) -> page coordinates of the canvas point showing it."""
    box = page.locator("#tx-canvas canvas").bounding_box()
    xf = page.evaluate("window.trexCanvas.getState().transform")
    return box["x"] + x * xf["s"] + xf["ox"], box["y"] + y * xf["s"] + xf["oy"]


def _draw_box(page, xyxy):
    x1, y1 = _to_page(page, xyxy[0], xyxy[1])
    x2, y2 = _to_page(page, xyxy[2], xyxy[3])
    page.mouse.move(x1, y1)
    page.mouse.down()
    page.mouse.move((x1 + x2) / 2, (y1 + y2) / 2, steps=4)
    page.mouse.move(x2, y2, steps=4)
    page.mouse.up()


def _click_and_time(page, button_id: str, action: str, timeout: float = 120_000) -> float:
    """Click a button from inside the page and return ms until the canvas rendered the
    view produced by ``action`` (boxes on screen)."""
    seq = page.evaluate("window.trexCanvas.getView().seq")
    page.evaluate(f"() => {{ window.__t0 = performance.now();"
                  f" document.getElementById('{button_id}').click(); }}")
    _wait_view(page, f"v.seq > {seq} && v.action === '{action}' && r.seq === v.seq", timeout)
    return page.evaluate("window.trexCanvas.lastRender.t - window.__t0")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser")
    boxes = _make_folder(root / "images")
    with _served(root / "images", root / "project.json") as url:
        yield url, root, boxes


def test_label_folder_in_browser(app_server):
    from playwright.sync_api import sync_playwright
    from pycocotools.coco import COCO

    url, root, gt_boxes = app_server
    own = urlparse(url).netloc
    foreign, errors = [], []
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.on("request", lambda r: urlparse(r.url).scheme in ("http", "https", "ws", "wss")
                and urlparse(r.url).netloc != own and foreign.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        _wait_view(page, "v.image && r.imageReady", 60_000)
        assert _view(page)["image"]["file"] == "img0.jpg"

        # a class, then a box prompt drawn with the mouse around a red blood cell
        page.locator("#tx-class-name input, #tx-class-name textarea").first.fill("cell")
        page.click("#tx-class-add")
        _wait_view(page, "v.active_class === 'cell'")
        exemplar = gt_boxes["img0.jpg"][0]
        _draw_box(page, exemplar)
        _wait_view(page, "v.prompts.length === 1")
        drawn = _view(page)["prompts"][0]
        assert drawn["kind"] == "box" and drawn["cls"] == "cell" and not drawn["negative"]
        assert all(abs(a - b) <= 2.0 for a, b in zip(drawn["coords"], exemplar)), drawn

        # detect in this image; the second run is on an already-encoded image
        first_ms = _click_and_time(page, "tx-detect-this", "detect")
        runs = []                                   # (click -> boxes on screen, model) ms
        for _ in range(3):
            total = _click_and_time(page, "tx-detect-this", "detect")
            v = _view(page)
            runs.append((total, float(re.search(r"\((\d+) ms\)", v["message"]).group(1))))
        latency_ms, model_ms = sorted(runs)[1]      # the median run
        print(f"\ndetect click -> boxes on screen: first {first_ms:.0f} ms; already-encoded image, "
              f"median of 3: {latency_ms:.0f} ms (goal <= 300 ms; runs "
              f"{', '.join(f'{t:.0f}' for t, _ in runs)} ms), of which model (prompt embedding "
              f"+ detect) {model_ms:.0f} ms, UI round trip and drawing {latency_ms - model_ms:.0f} ms")
        assert v["boxes"], "the model returned no box at all"
        shown = int(page.locator("#tx-canvas .tx-wrap").get_attribute("data-visible-boxes"))
        assert shown == sum(b["score"] >= v["threshold"] for b in v["boxes"])

        # with "detect after each prompt change" on, a point prompt re-runs detection
        page.locator("#tx-auto input").check()
        page.locator("#tx-canvas .tx-wrap").focus()
        page.keyboard.press("p")
        second = gt_boxes["img0.jpg"][1]
        seq = _view(page)["seq"]
        page.mouse.click(*_to_page(page, (second[0] + second[2]) / 2, (second[1] + second[3]) / 2))
        _wait_view(page, f"v.seq > {seq} && v.prompts.length === 2 && v.action === 'detect'")
        assert _view(page)["prompts"][1]["kind"] == "point"
        page.locator("#tx-auto input").uncheck()
        page.keyboard.press("b")

        # the threshold slider filters the boxes on screen without running the model; set it
        # so the 3 best boxes show (what a user does when the model scores low)
        v = _view(page)
        scores = sorted((b["score"] for b in v["boxes"]), reverse=True)
        t_new = math.floor(scores[min(2, len(scores) - 1)] * 100) / 100
        if abs(t_new - v["threshold"]) < 1e-6:
            t_new = round(t_new - 0.01, 2)
        slider = page.locator("#tx-threshold input[type=number]")
        slider.fill(str(t_new))
        slider.press("Enter")
        _wait_view(page, f"v.action === 'threshold' && Math.abs(v.threshold - {t_new}) < 1e-6")
        shown = int(page.locator("#tx-canvas .tx-wrap").get_attribute("data-visible-boxes"))
        assert shown == sum(sc >= t_new for sc in scores) >= 1

        # review with the keyboard: Tab selects the next pending box, A accepts it
        page.locator("#tx-canvas .tx-wrap").focus()
        page.keyboard.press("Tab")
        sel = page.evaluate("window.trexCanvas.getState().selected")
        assert sel and sel["type"] == "box"
        page.keyboard.press("a")
        _wait_view(page, f"v.action === 'accept' && v.boxes.some(b => b.id === {sel['id']}"
                         f" && b.state === 'accepted')")
        page.keyboard.press("Control+z")
        _wait_view(page, f"v.action === 'undo' && v.boxes.some(b => b.id === {sel['id']}"
                         f" && b.state === 'pending')")
        page.keyboard.press("Control+y")
        _wait_view(page, f"v.action === 'redo' && v.boxes.some(b => b.id === {sel['id']}"
                         f" && b.state === 'accepted')")

        # edit: with the select tool, drag the accepted box's bottom-right corner
        page.keyboard.press("v")
        box = next(b for b in _view(page)["boxes"] if b["id"] == sel["id"])
        x1, y1, x2, y2 = box["xyxy"]
        # (selected through the canvas API: the exemplar prompt may overlap this box)
        page.evaluate(f"window.trexCanvas.select('box', {sel['id']})")
        page.mouse.move(*_to_page(page, x2, y2))
        page.mouse.down()
        page.mouse.move(*_to_page(page, x2 - 6, y2 - 5), steps=3)
        page.mouse.up()
        _wait_view(page, f"v.action === 'move' && v.boxes.some(b => b.id === {sel['id']}"
                         f" && Math.abs(b.xyxy[2] - {x2 - 6}) < 1.5 && b.state === 'accepted')")
        page.keyboard.press("b")

        # Caps Lock on: 'A' without Shift accepts the selected box only (not all boxes), and
        # a class key on the box A jumped to says that it relabelled it
        page.locator("#tx-canvas .tx-wrap").focus()
        page.keyboard.press("Tab")
        n_accepted = sum(b["state"] == "accepted" for b in _view(page)["boxes"])
        seq = _view(page)["seq"]
        page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'A'}))")
        _wait_view(page, f"v.seq > {seq} && v.action === 'accept'")
        assert sum(b["state"] == "accepted" for b in _view(page)["boxes"]) == n_accepted + 1
        seq = _view(page)["seq"]
        page.keyboard.press("1")
        _wait_view(page, f"v.seq > {seq} && v.action === 'set_class'")
        assert "relabelled the selected box" in _view(page)["message"]
        # E turns the selected box into an exemplar prompt and accepts it, in one undo step
        # (a box no box prompt of its class covers yet: E on one that is reuses that prompt)
        from app.project import _box_iou
        v = _view(page)
        drawn = [q for q in v["prompts"] if q["kind"] == "box"]
        free = next(b for b in v["boxes"] if b["state"] != "rejected" and not any(
            q["cls"] == b["cls"] and _box_iou(q["coords"], b["xyxy"]) > 0.5 for q in drawn))
        page.locator("#tx-canvas .tx-wrap").focus()
        page.evaluate(f"window.trexCanvas.select('box', {free['id']})")
        sel = page.evaluate("window.trexCanvas.getState().selected")
        assert sel and sel["id"] == free["id"]
        n_prompts = len(v["prompts"])
        page.keyboard.press("e")
        _wait_view(page, f"v.action === 'promote' && v.prompts.length === {n_prompts + 1}"
                         f" && v.boxes.some(b => b.id === {sel['id']} && b.state === 'accepted')")
        page.keyboard.press("Control+z")
        _wait_view(page, f"v.action === 'undo' && v.prompts.length === {n_prompts}")
        # Space over the image pans; it must not press the focused 'Detect in all images'
        seq = _view(page)["seq"]
        page.focus("#tx-detect-all")
        page.mouse.move(*_to_page(page, 5, 5))
        page.keyboard.press(" ")
        time.sleep(2)
        assert _view(page)["seq"] == seq

        # detect in all images (prompts of every image averaged per class), with progress
        _click_and_time(page, "tx-detect-all", "detect_all", 180_000)
        statuses = page.locator("#tx-stats").inner_text()
        assert "predicted" in statuses

        # accept all above threshold here (button), then on the next image (Shift+A)
        _click_and_time(page, "tx-accept-all", "accept_all")
        page.keyboard.press("ArrowRight")
        _wait_view(page, "v.image.file === 'img1.jpg' && r.imageReady")
        page.locator("#tx-canvas .tx-wrap").focus()
        page.keyboard.press("Shift+A")
        _wait_view(page, "v.action === 'accept_all'")
        assert _view(page)["image"]["status"] == "reviewed"

        # a second browser session has its own state (same project file, own navigation)
        other = browser.new_context().new_page()
        other.goto(url)
        _wait_view(other, "v.image && r.imageReady", 60_000)
        assert _view(other)["image"]["file"] == "img1.jpg"        # resumed from the autosave
        other.locator("#tx-canvas .tx-wrap").focus()
        other.keyboard.press("ArrowRight")
        _wait_view(other, "v.image.file === 'img2.jpg'")
        _click_and_time(page, "tx-accept-all", "accept_all")
        assert _view(page)["image"]["file"] == "img1.jpg"
        # an edit that reaches Python after the image changed (drawn, then Next at once) is refused,
        # not put on the image now shown
        seq = _view(page)["seq"]
        page.evaluate("window.trexCanvas.send('add_box', {coords: [2, 2, 30, 30], file: 'img0.jpg'})")
        _wait_view(page, f"v.seq > {seq} && v.action === 'error'")
        assert "made on img0.jpg" in _view(page)["message"]
        assert not any(b["xyxy"] == [2, 2, 30, 30] for b in _view(page)["boxes"])
        # the first tab labels by hand; the second (its copy now stale) then saves by navigating:

        # the box must survive on disk and show in the second tab
        page.locator("#tx-canvas .tx-wrap").focus()
        page.keyboard.press("m")
        seq = _view(page)["seq"]
        _draw_box(page, [12, 12, 70, 60])
        _wait_view(page, f"v.seq > {seq} && v.action === 'add_box'")
        page.keyboard.press("b")
        manual = [b["id"] for b in _view(page)["boxes"] if b["source"] == "manual"]
        assert len(manual) == 1
        other.keyboard.press("ArrowLeft")
        _wait_view(other, "v.image.file === 'img1.jpg'")
        assert [b["id"] for b in _view(other)["boxes"] if b["source"] == "manual"] == manual
        on_disk = json.loads((root / "project.json").read_text())
        assert [b["id"] for im in on_disk["images"] for b in im["boxes"]
                if b["source"] == "manual"] == manual
        preview_url = urljoin(url, _view(page)["image"]["url"])

        # export COCO and download it
        page.click("#tx-export")
        link = page.locator("#tx-export-file a").first
        link.wait_for(timeout=30_000)
        with page.expect_download() as dl:
            link.click()
        coco_path = root / "downloaded.coco.json"
        dl.value.save_as(coco_path)

        # import a COCO file of detections (as `app.py label` writes): pending boxes to review
        from exports import write_coco
        dets = root / "detections.coco.json"
        v = _view(page)
        write_coco(dets, [(v["image"]["file"], v["image"]["width"], v["image"]["height"])], ["nucleus"],
                   [(v["image"]["file"], "nucleus", (5, 5, 40, 40), 0.9)])
        page.get_by_role("tab", name="Import").click()
        page.locator("#tx-import input[type=file]").set_input_files(str(dets))
        _wait_view(page, "v.action === 'import' && v.boxes.some(b => b.cls === 'nucleus'"
                         " && b.state === 'pending' && b.score === 0.9)")
        assert "1 detections" in _view(page)["message"]
        # the upload box is emptied once read: the same file can go in again at once (merged, no new box)
        seq = _view(page)["seq"]
        page.locator("#tx-import input[type=file]").set_input_files(str(dets), timeout=30_000)
        _wait_view(page, f"v.action === 'import' && v.seq > {seq}")

        # 'Save prompt set' does not replace a file the session never loaded or saved
        keep = root / "keep.json"
        keep.write_text('{"mine": 1}')
        page.get_by_role("tab", name="Prompts & class embeddings").click()
        box = page.locator("#tx-prompt-path input, #tx-prompt-path textarea").first
        for _ in range(20):   # a tab shown for the first time may mount after the first fill (under load)
            box.fill(str(keep))
            box.blur()   # the typed path reaches the app's state before the click reads it
            time.sleep(0.5)
            if box.input_value() == str(keep):
                break
        page.get_by_role("button", name="Save prompt set").click()
        msg = page.locator("#tx-files-msg")
        try:   # the refusal stays in the tab's message box (the toast goes after a while)
            msg.get_by_text("already exists and was not loaded here").wait_for(timeout=60_000)
        except Exception as e:
            raise AssertionError(f"no refusal shown: message box {msg.inner_text()!r}, path box "
                                 f"{box.input_value()!r}, toasts "
                                 f"{page.locator('.toast-body').all_inner_texts()!r}") from e
        assert keep.read_text() == '{"mine": 1}'

        # the Box refiner tab: too few labelled images is refused in the tab's own message box
        page.get_by_role("tab", name="Box refiner").click()
        page.locator("#tx-fit-refiner").click()
        page.locator("#tx-refiner-msg").get_by_text("fit the refiner once 10 or more images").wait_for(
            timeout=30_000)
        assert "Weights now" in page.locator("#tx-refiner-msg").inner_text()
        browser.close()

    # only the app's own files are served: previews yes; originals, /etc, traversal no
    assert urlparse(url).hostname == "127.0.0.1"
    assert _http_status(preview_url) == 200
    for path in (root / "images" / "img0.jpg", Path("/etc/passwd"), root / "project.json"):
        assert _http_status(urljoin(url, f"gradio_api/file={path}")) in (403, 404), path
    sneaky = preview_url.rsplit("/", 1)[0] + "/../../../../../../etc/passwd"
    assert _http_status(sneaky) in (403, 404)

    saved = json.loads((root / "project.json").read_text())        # the autosaved project
    accepted = [(im["file"], b["xyxy"]) for im in saved["images"] for b in im["boxes"]
                if b["state"] == "accepted"]
    assert accepted, "nothing was accepted"
    coco = COCO(str(coco_path))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(accepted)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cell"]
    files = {im["id"]: im["file_name"] for im in coco.dataset["images"]}
    assert sorted(files.values()) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    got = sorted((files[a["image_id"]], a["bbox"]) for a in anns)
    want = sorted((f, [b[0], b[1], b[2] - b[0], b[3] - b[1]]) for f, b in accepted)
    assert all(g[0] == w[0] and all(abs(x - y) <= 0.011 for x, y in zip(g[1], w[1]))
               for g, w in zip(got, want)), (got, want)
    assert not errors, errors
    assert not foreign, f"the page requested other hosts: {foreign}"


class _NoModel:
    """Predictor stand-in for tests that only page through a folder: never encodes."""
    score_threshold = 0.3
    flip = False

    def cached(self, key, size=None):
        return object()


@pytest.fixture
def slow_paging_server(tmp_path):
    """The app on 8 plain images, each page change held 400 ms on the server (a large image
    on a slow disk), so that key presses arrive while one is still running."""
    from PIL import Image

    from app.project import Engine

    images = tmp_path / "images"
    images.mkdir()
    for k in range(8):
        Image.fromarray(np.full((48, 64, 3), 30 * k, np.uint8)).save(images / f"p{k}.png")
    engine = Engine(predictor=_NoModel())
    preview = engine.preview

    def slow_preview(path):
        time.sleep(0.4)
        return preview(path)

    engine.preview = slow_preview
    with _served(images, tmp_path / "project.json", engine) as url:
        yield url


def _settled_view(page, quiet_s: float = 2.0, timeout_s: float = 30.0) -> dict:
    """The view once no new one arrived for quiet_s seconds."""
    end = time.time() + timeout_s
    last, since = None, time.time()
    while time.time() < end:
        seq = _view(page)["seq"]
        if seq != last:
            last, since = seq, time.time()
        elif time.time() - since >= quiet_s:
            return _view(page)
        time.sleep(0.1)
    raise AssertionError(f"the view kept changing for {timeout_s} s")


def test_quick_arrow_presses_all_count(slow_paging_server):
    """→ pressed 5 times while the first page change still runs lands 5 images further (the
    presses made meanwhile were dropped), ← twice 2 back, wrapping as Next/Prev do; a held key
    and quick clicks on Next count every press too."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(slow_paging_server)
        _wait_view(page, "v.image && r.imageReady", 60_000)
        assert _view(page)["image"]["index"] == 0
        page.locator("#tx-canvas .tx-wrap").focus()
        t0 = time.time()
        for _ in range(5):
            page.keyboard.press("ArrowRight")
        v = _settled_view(page)
        print(f"\n5 x \u2192 (400 ms a page change): image {v['image']['index']} after "
              f"{time.time() - t0 - 2:.1f} s")
        assert v["image"]["index"] == 5 and v["image"]["file"] == "p5.png"
        for _ in range(2):
            page.keyboard.press(",")
        assert _settled_view(page)["image"]["index"] == 3
        for _ in range(6):                               # 3 + 6 wraps to 1, as Next does
            page.keyboard.press(".")
        assert _settled_view(page)["image"]["index"] == 1
        seq = _view(page)["seq"]
        for _ in range(12):                              # → held down: the key repeats
            page.keyboard.down("ArrowRight")
            time.sleep(0.03)
        page.keyboard.up("ArrowRight")
        v = _settled_view(page)
        assert v["image"]["index"] == 5
        # the presses made during a page change go together: not a page shown per press
        assert v["seq"] - seq <= 4, v["seq"] - seq
        for _ in range(3):                               # quick clicks on Next count too
            page.click("#tx-next")
        assert _settled_view(page)["image"]["index"] == 0
        browser.close()


def test_a_tab_shows_another_tabs_labels_without_an_action(slow_paging_server):
    """A box saved by a second tab shows in the first within a few seconds, with no action
    there; while the first tab's user is drawing, it waits for the mouse button's release."""
    from playwright.sync_api import sync_playwright

    from app.ui import SYNC_SECONDS

    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(slow_paging_server)
        _wait_view(page, "v.image && r.imageReady", 60_000)
        other = browser.new_context().new_page()
        other.goto(slow_paging_server)
        _wait_view(other, "v.image && r.imageReady", 60_000)
        other.evaluate("window.trexCanvas.send('add_box', {coords: [5, 5, 30, 30]})")
        _wait_view(other, "v.action === 'add_box'")
        t0 = time.time()
        _wait_view(page, "v.action === 'sync' && v.boxes.length === 1", (SYNC_SECONDS + 10) * 1000)
        print(f"\nanother tab's box shown here after {time.time() - t0:.1f} s")
        x, y = _to_page(page, 35, 20)
        page.mouse.move(x, y)
        page.mouse.down()                                # drawing a box prompt here...
        page.mouse.move(x + 20, y + 15, steps=3)
        other.evaluate("window.trexCanvas.send('add_box', {coords: [40, 5, 60, 25]})")
        _wait_view(other, "v.action === 'add_box' && v.boxes.length === 2")
        time.sleep(SYNC_SECONDS + 2)
        assert len(_view(page)["boxes"]) == 1            # ...is not disturbed by it
        page.mouse.move(x + 25, y + 20, steps=2)
        page.mouse.up()
        _wait_view(page, "v.boxes.length === 2 && v.prompts.length === 1")
        browser.close()


def take_screenshot(out: Path) -> None:
    """Screenshot of the app on the demo folder with the demo prompts loaded and detected."""
    import tempfile

    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="trex2-shot-"))
    demo, url = _launch(DEMO / "images", tmp / "project.json")
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1440, "height": 980})
            page.goto(url)
            _wait_view(page, "v.image && r.imageReady", 60_000)
            page.get_by_role("tab", name="Prompts & class embeddings").click()
            page.get_by_role("button", name="Load prompt file").click()
            _wait_view(page, "v.action === 'load_prompts'")
            v = _view(page)
            # go to the image carrying the prompts and detect there
            for _ in range(v["image"]["count"]):
                if _view(page)["prompts"]:
                    break
                page.click("#tx-next")
                time.sleep(0.5)
            _click_and_time(page, "tx-detect-this", "detect", 180_000)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(out))
            browser.close()
        from PIL import Image

        Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)  # smaller file
    finally:
        demo.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", type=Path, required=True)
    a = ap.parse_args()
    a.screenshot.parent.mkdir(parents=True, exist_ok=True)
    take_screenshot(a.screenshot)
    print(f"wrote {a.screenshot}")
