"""Speed and memory benchmark, side by side with the template-matching baseline (DESIGN.md section 5).

    python app.py bench [--images DIR --prompts PROMPTS.json] [--n-images 20] [--repeat 5]
                        [--baseline PATH] [--json]
    python app.py bench --memory [--memory-images 2000]

Default data: the dev set ../shared/data/dev/tomato-val (relative to the repo root) if present,
else demo/images/tomato with demo/prompts-tomato.json. Figures are medians over --repeat runs
on this machine:
  encode ms        image -> embedding, at 640 px (long side) and at the image's native size;
                   at 640 px with its mirror too (flip TTA, `label`'s default)
  prompt ms        prompts -> detections on an already encoded image, with 1 and 5 classes
                   (baseline: template matching of the same exemplars, 1 and 5 classes); 1 class
                   with flip
  images/s         `label` over --n-images images, cross-image prompts; "steady" excludes
                   start-up (in process), without and with flip; "cli" is the whole command
                   (flip) run as a subprocess
  peak RSS MiB     of that subprocess (its own ru_maxrss, measured from a small launcher)
--memory labels a generated folder of --memory-images small images with the real CLI and prints
its RSS after 200, 1000, ... images: flat if labeling streams.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = REPO.parent / "shared" / "tools" / "baseline_template.py"
DEV_SET = REPO.parent / "shared" / "data" / "dev" / "tomato-val"


def default_data() -> tuple[Path, Path]:
    """(image folder, cross-image prompt file): the dev set if present, else the demo folder."""
    if (DEV_SET / "images").is_dir():
        return DEV_SET / "images", DEV_SET / "prompts-cross-image" / "prompts.json"
    return REPO / "demo" / "images" / "tomato", REPO / "demo" / "prompts-tomato.json"


def load_baseline(path: Path):
    """Import the baseline script as a module (its run() and match_category())."""
    if not path.is_file():
        raise SystemExit(f"app.py bench: baseline not found: {path} (use --baseline PATH)")
    spec = importlib.util.spec_from_file_location("baseline_template", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_ms(fn, repeat: int) -> float:
    """Median wall time of fn() in ms over `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def resize_long(image: np.ndarray, side: int) -> np.ndarray:
    import cv2
    h, w = image.shape[:2]
    f = side / max(h, w)
    return cv2.resize(image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


# Runs the command from a small fresh interpreter, so the peak RSS reported by wait4 is the
# command's own (a child forked straight from this process starts with this process's high-water mark).
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "print('maxrss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(rc)")


def run_timed(cmd: list[str]) -> tuple[float, float]:
    """Run cmd -> (wall seconds, peak RSS MiB of cmd's process). SystemExit with its stderr if it fails."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"app.py bench: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    rss = [ln for ln in p.stderr.splitlines() if ln.startswith("maxrss_kib ")][-1]
    return wall, int(rss.split()[1]) / 1024


def bench_speed(a) -> dict:
    import trex2
    from app.batch import PromptSource, label_folder
    from trex2.image_io import list_images, load_image

    images_dir, prompts_path = (Path(a.images), Path(a.prompts)) if a.images else default_data()
    files = list_images(images_dir)[: a.n_images]
    if not files:
        raise SystemExit(f"app.py bench: no images under {images_dir}")
    base = load_baseline(Path(a.baseline))
    predictor = trex2.Predictor(trex2.load_model(a.weights))
    flipped = trex2.Predictor(predictor.model, flip=True)   # label's default: flip TTA
    image = load_image(images_dir / files[0])
    r: dict = {"load_avg_1min_at_start": round(os.getloadavg()[0], 2), "data": str(images_dir), "prompts": str(prompts_path), "n_images": len(files),
               "repeat": a.repeat, "native_size": list(image.shape[:2]), "torch_threads": _threads()}

    # encode: a fresh key each call so the cache never answers
    counter = iter(range(10 ** 9))
    for label, img in (("640", resize_long(image, 640)), ("native", image)):
        r[f"encode_ms_{label}"] = median_ms(lambda: predictor.encode_image(img, key=("bench", next(counter))), a.repeat)
    r["encode_size_640"] = list(resize_long(image, 640).shape[:2])
    img640 = resize_long(image, 640)
    r["encode_ms_640_flip"] = median_ms(lambda: flipped.encode_image(img640, key=("bench", next(counter))), a.repeat)

    # prompt -> detections on a cached image: exemplar boxes of the prompt file, drawn on image 0
    prompts = PromptSource.load(str(prompts_path))
    ps = prompts.prompt_set
    boxes = np.concatenate([ps.boxes(im, c) for im in ps.images() for c in ps.category_names])[:5]
    emb = predictor.encode_image(image, key="bench-cached")
    for k in (1, 5):
        def prompt_to_dets(k=k):
            classes = {f"c{i}": predictor.embed_prompts([(emb, boxes[i % len(boxes)][None])]) for i in range(k)}
            return predictor.detect(emb, classes)
        r[f"prompt_ms_{k}class"] = median_ms(prompt_to_dets, a.repeat)
    emb_flip = flipped.encode_image(image, key="bench-cached")
    r["prompt_ms_1class_flip"] = median_ms(
        lambda: flipped.detect(emb_flip, {"c0": flipped.embed_prompts([(emb_flip, boxes[:1])])}), a.repeat)

    # baseline: same exemplar boxes as crops of image 0, template matching with its defaults
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    crops = [bgr[int(b[1]):int(b[3]), int(b[0]):int(b[2])] for b in boxes]
    sc = base.DEFAULTS["cross-image"]["scales"]
    for k in (1, 5):
        r[f"baseline_prompt_ms_{k}class"] = median_ms(
            lambda k=k: [base.match_category(bgr, [crops[i % len(crops)]], sc, 0.3, 0.4, 1000, 40.0)
                         for i in range(k)], a.repeat)

    # end to end over a folder
    with tempfile.TemporaryDirectory(prefix="trex2-bench-") as tmp:
        folder = Path(tmp) / "images"
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(images_dir / f, folder / f)
        classes = prompts.cross_image_classes(predictor)
        for flip, key in ((False, "images_per_s_steady"), (True, "images_per_s_steady_flip")):
            steady = []
            for _ in range(max(1, a.repeat // 2)):
                fresh = trex2.Predictor(predictor.model, flip=flip)  # empty cache: every image is new
                t0 = time.perf_counter()
                for _res in label_folder(fresh, str(folder), files, classes):
                    pass
                steady.append(len(files) / (time.perf_counter() - t0))
            r[key] = statistics.median(steady)
        t0 = time.perf_counter()
        base.run(str(folder), str(prompts_path), str(Path(tmp) / "b.json"), quiet=True)
        r["baseline_images_per_s_steady"] = len(files) / (time.perf_counter() - t0)
        ours, theirs = [], []
        for i in range(max(1, a.repeat // 2)):
            cmd = [sys.executable, "app.py", "label", str(folder), "--prompts", str(prompts_path), "--quiet",
                   "--out", str(Path(tmp) / f"o{i}.json")] + (["--weights", a.weights] if a.weights else []) \
                + (["--threads", str(a.threads)] if a.threads else [])
            ours.append(run_timed(cmd))
            theirs.append(run_timed([sys.executable, str(a.baseline), str(folder), "--prompts", str(prompts_path),
                                     "--out", str(Path(tmp) / f"b{i}.json"), "--quiet"]))
        r["images_per_s_cli"] = statistics.median(len(files) / w for w, _ in ours)
        r["peak_rss_mib"] = statistics.median(m for _, m in ours)
        r["baseline_images_per_s_cli"] = statistics.median(len(files) / w for w, _ in theirs)
        r["baseline_peak_rss_mib"] = statistics.median(m for _, m in theirs)
    return r


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def format_speed(r: dict) -> str:
    n = "x".join(str(v) for v in r["native_size"][::-1])
    s640 = "x".join(str(v) for v in r["encode_size_640"][::-1])
    rows = [("image encode, 640 px (%s)" % s640, f"{r['encode_ms_640']:.0f} ms", "n/a (no encoder)"),
            ("image encode, 640 px, with its mirror (flip)", f"{r['encode_ms_640_flip']:.0f} ms", "n/a"),
            (f"image encode, native ({n})", f"{r['encode_ms_native']:.0f} ms", "n/a (no encoder)"),
            ("prompt -> detections, cached image, 1 class", f"{r['prompt_ms_1class']:.0f} ms",
             f"{r['baseline_prompt_ms_1class']:.0f} ms"),
            ("prompt -> detections, cached image, 5 classes", f"{r['prompt_ms_5class']:.0f} ms",
             f"{r['baseline_prompt_ms_5class']:.0f} ms"),
            ("prompt -> detections, 1 class, with flip", f"{r['prompt_ms_1class_flip']:.0f} ms", "n/a"),
            (f"label, {r['n_images']} images, steady (in process), --no-flip", f"{r['images_per_s_steady']:.2f} img/s",
             f"{r['baseline_images_per_s_steady']:.2f} img/s"),
            (f"label, {r['n_images']} images, steady, flip (default)", f"{r['images_per_s_steady_flip']:.2f} img/s",
             "n/a"),
            (f"label, {r['n_images']} images, whole CLI run (flip)", f"{r['images_per_s_cli']:.2f} img/s",
             f"{r['baseline_images_per_s_cli']:.2f} img/s"),
            ("peak RSS of the CLI run", f"{r['peak_rss_mib']:.0f} MiB", f"{r['baseline_peak_rss_mib']:.0f} MiB")]
    w = max(len(x[0]) for x in rows)
    head = (f"data: {r['data']} ({r['n_images']} images), medians of {r['repeat']} runs, "
            f"{os.cpu_count()} CPUs, torch threads {r['torch_threads']}, "
            f"load average at start {r['load_avg_1min_at_start']}")
    lines = [head, f"{'':<{w}}  {'trex2':>14}  {'baseline':>16}"]
    lines += [f"{a:<{w}}  {b:>14}  {c:>16}" for a, b, c in rows]
    return "\n".join(lines)


def _proc_mib(pid: int, field: str) -> float:
    """VmRSS (current) or VmHWM (peak so far) of a running process, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_memory(a) -> dict:
    """Label a generated folder with the CLI; RSS (MiB) sampled when 200, 1000, ... images are done."""
    import cv2
    from trex2.synthetic import generate_scene

    n = a.memory_images
    checkpoints = sorted({c for c in (50, 200, 500, 1000, 2000, 5000, 10000, n) if c <= n})
    with tempfile.TemporaryDirectory(prefix="trex2-membench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        uniques = []
        for i in range(min(50, n)):  # 50 distinct scenes, hard-linked under n names
            scene = generate_scene(rng, size=a.memory_size)
            p = folder / f"s{i:05d}.jpg"
            cv2.imwrite(str(p), np.ascontiguousarray(scene.image[:, :, ::-1]))
            uniques.append((p, scene))
        for i in range(len(uniques), n):
            os.link(uniques[i % len(uniques)][0], folder / f"s{i:05d}.jpg")
        p0, s0 = uniques[0]
        keep = s0.labels == 0
        anns = [{"id": j + 1, "image_id": 1, "category_id": 1,
                 "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                for j, b in enumerate(s0.boxes[keep][:3])]
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps({"images": [{"id": 1, "file_name": f"images/{p0.name}", "width": a.memory_size,
                                                   "height": a.memory_size}],
                                       "categories": [{"id": 1, "name": "object"}], "annotations": anns}))
        out = Path(tmp) / "out.json"
        side = Path(str(out) + ".partial.jsonl")
        cmd = [sys.executable, "app.py", "label", str(folder), "--prompts", str(prompts), "--out", str(out),
               "--quiet"] + (["--weights", a.weights] if a.weights else []) \
            + (["--threads", str(a.threads)] if a.threads else [])
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        samples, t0, pending = [], time.perf_counter(), list(checkpoints)
        while proc.poll() is None and pending:
            done = side.read_bytes().count(b"\n") - 1 if side.exists() else 0
            if done >= pending[0]:
                samples.append({"images": done, "rss_mib": round(_proc_mib(proc.pid, "VmRSS"), 1),
                                "peak_mib": round(_proc_mib(proc.pid, "VmHWM"), 1),
                                "s": round(time.perf_counter() - t0, 1)})
                print(f"after {done:>6} images: RSS {samples[-1]['rss_mib']:.1f} MiB, peak so far "
                      f"{samples[-1]['peak_mib']:.1f} MiB ({samples[-1]['s']:.0f} s)", flush=True)
                pending.pop(0)
            time.sleep(0.05)
        err = proc.stderr.read()
        if proc.wait():
            raise SystemExit(f"app.py bench: label failed:\n{err.decode()[-2000:]}")
        return {"images": n, "image_size": a.memory_size, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    from app.evaluate import positive_int_arg
    ap = argparse.ArgumentParser(prog="app.py bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", metavar="DIR", help="image folder (default: see above)")
    ap.add_argument("--prompts", metavar="PROMPTS.json", help="cross-image prompt file for --images")
    ap.add_argument("--n-images", type=positive_int_arg, default=20, help="images for the end-to-end figures (default 20)")
    ap.add_argument("--repeat", type=positive_int_arg, default=5, help="runs per timing; medians are reported (default 5)")
    ap.add_argument("--baseline", default=str(DEFAULT_BASELINE), metavar="PATH",
                    help="baseline_template.py (default: ../shared/tools/baseline_template.py from the repo root)")
    ap.add_argument("--weights", metavar="PATH", default=None, help="model weights (default: shipped)")
    ap.add_argument("--threads", type=positive_int_arg, default=None, metavar="N",
                    help="torch CPU threads, here and in the label runs (default: torch's)")
    ap.add_argument("--memory", action="store_true", help="memory-flatness run instead of the speed figures")
    ap.add_argument("--memory-images", type=positive_int_arg, default=2000, help="images in the --memory folder (default 2000)")
    ap.add_argument("--memory-size", type=positive_int_arg, default=256, help="side of the --memory images in px (default 256)")
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    a = ap.parse_args(argv)
    if bool(a.images) != bool(a.prompts):
        ap.error("--images and --prompts go together")
    if a.threads is not None:
        import torch
        torch.set_num_threads(a.threads)
    if a.memory:
        r = bench_memory(a)
    else:
        r = bench_speed(a)
        print(format_speed(r))
    if a.json:
        print(json.dumps(r))
    return 0
