"""Fitting the box refiner to your labels and checking it: in the app's background, or headless.

    python app.py refine --labels L.json --images DIR --out W.safetensors [--prompts P.json --check-share 0.2]

It runs `train --refiner --labels` (trex2/train_refiner.py) on one thread, then, with a check set,
the check: the labelled images kept out of the fit are labelled like `label` does (cross-image,
with the prompts given) with the weights before and after, and scored against their labels
(app.evaluate); the result goes to the log and beside the weights (check_path). `--check-share`
keeps a share of the labelled images without prompts out of the fit for that. The app's *Box
refiner* tab runs it as a child process (RefinerJob, `--check CHECK.json`), so labeling goes on
meanwhile, and reads its log for the progress. The weights are written atomically (TRex2.save),
so a stopped or failed run leaves an earlier fitted file as it was. One job per app process.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_IMAGES = 10     # accepted boxes on at least this many images before fitting is offered
MAX_IMAGES = 400    # at most this many are fitted on (spread over the folder): each image and a crop
                    # of it keep ~5 MB of backbone maps in memory (peak 2.2 GB measured for 20 images and
                    # the 600 synthetic scenes; ~4 GB expected at 400)
STEPS = 3000        # train_refiner's recipe (README, "The shipped run", item 12)

# lines of the child's log (trex2/train_refiner.py and main() below) that tell its progress
_STEP = re.compile(r"refiner step (\d+)")
_SCENE = re.compile(r"synthetic scene (\d+) of (\d+)")
_CHECKING = "refiner: checking"
_CHECK = re.compile(r"refiner check: (.*)")
CLEAR_CHANGE = 0.01   # the check calls an AP difference smaller than this "no clear change"


@dataclass
class JobStatus:
    """state: "idle", "running", "done", "failed" or "cancelled"; text: one line for the user;
    fraction: progress in [0, 1] while running (None before the training steps start)."""
    state: str
    text: str
    fraction: float | None = None


def progress(lines: list[str], steps: int, minutes: float) -> JobStatus:
    """A running fit's status from its log lines so far (steps: the fit's training steps;
    minutes since it started)."""
    so_far = f"({minutes:.0f} min so far)"
    if any(_CHECKING in ln for ln in lines):
        return JobStatus("running", f"fitted; now checking it on the labelled images kept out {so_far}", 1.0)
    done = [int(m.group(1)) for m in map(_STEP.search, lines) if m]
    if done:
        return JobStatus("running", f"step {done[-1]} of {steps} {so_far}", min(1.0, done[-1] / steps))
    scenes = [m for m in map(_SCENE.search, lines) if m]
    if scenes:
        return JobStatus("running", f"preparing: synthetic scene {scenes[-1].group(1)} of "
                                    f"{scenes[-1].group(2)} {so_far}")
    return JobStatus("running", f"preparing: reading your labelled images {so_far}")


def _mtime_ns(path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, TypeError):
        return None


class RefinerJob:
    """One background fit at a time, shared by the app's sessions: start(), status() (polled by
    the UI), cancel(). The child exits when the app does (its stdin is a pipe from the app)."""

    def __init__(self, steps: int = STEPS, extra: tuple[str, ...] = ()):
        """steps: training steps; extra: more `train` options (tests make the run tiny)."""
        self.steps = int(steps)
        self.extra = tuple(extra)
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._out: Path | None = None
        self._out_before: int | None = None   # the output file's mtime (ns) when the run started
        self._started = 0.0                   # time.time() seconds at start()
        self._ended: float | None = None      # ... when status() first saw the child gone
        self._cancelled = False
        self._lock = threading.Lock()
        self._exit_hook = False

    def running(self) -> bool:
        """Whether a fit started here is still running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, labels: Path, images_dir: Path, out: Path, log_path: Path, init: str | None = None,
              check: Path | None = None, prompts: Path | None = None) -> None:
        """Fit a refiner to the COCO file `labels` (file names relative to images_dir), starting
        from the weights `init` (None: the shipped ones), saved to `out`; then, given `check` (COCO
        labels of images kept out of `labels`) and `prompts` (a prompt file), score the weights
        before and after on them. The child's output goes to log_path. RuntimeError if a fit is
        already running."""
        with self._lock:
            if self.running():
                raise RuntimeError("a box refiner is already being fitted: wait for it or stop it")
            cmd = [sys.executable, "-m", "app.refiner_job", "--labels", str(labels),
                   "--images", str(images_dir), "--out", str(out), "--steps", str(self.steps),
                   "--exit-with-parent"]
            if init:
                cmd += ["--init", str(init)]
            if check and prompts:
                cmd += ["--check", str(check), "--prompts", str(prompts)]
            cmd += list(self.extra)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self._log_path, self._out, self._out_before = Path(log_path), Path(out), _mtime_ns(out)
            self._started, self._ended, self._cancelled = time.time(), None, False
            with open(log_path, "w", encoding="utf-8") as log:
                # its own process group, so that cancel() stops it and anything it started
                self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.PIPE, start_new_session=True)
            if not self._exit_hook:     # never leave a fit running after the app stops
                atexit.register(self.cancel)
                self._exit_hook = True

    def cancel(self) -> bool:
        """Stop a running fit. True if one was stopped. A fit stopped before it saved leaves the
        output file as it was; one stopped during its check has saved it (status() says which)."""
        with self._lock:
            if not self.running():
                return False
            self._cancelled = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self._proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    self._proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return True

    def _log_lines(self) -> list[str]:
        try:
            return self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, AttributeError):
            return []

    def status(self) -> JobStatus:
        """Where the last fit started here stands (JobStatus)."""
        with self._lock:
            proc, out, log_path = self._proc, self._out, self._log_path
        if proc is None:
            return JobStatus("idle", "")
        lines = self._log_lines()
        code = proc.poll()
        if code is not None and self._ended is None:
            self._ended = time.time()
        minutes = ((self._ended or time.time()) - self._started) / 60
        if code is None:
            return progress(lines, self.steps, minutes)
        saved = out is not None and out.is_file() and _mtime_ns(out) != self._out_before
        if self._cancelled:
            return JobStatus("cancelled", "stopped during the check: the fitted refiner was saved, unchecked"
                             if saved else "stopped; no refiner was saved by this run")
        if code == 0 and saved:
            check = [m.group(1) for m in map(_CHECK.search, lines) if m]
            return JobStatus("done", f"fitted in {minutes:.0f} min: {out}"
                             + (f". Check: {check[-1]}" if check else ""), 1.0)
        if code < 0:
            why = f"it was killed by signal {-code} (out of memory?)"
        else:
            last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
            why = f"exit code {code}: {last.strip()[-300:]}"
        return JobStatus("failed", f"the fit failed ({why}; full log: {log_path})")


def split_for_check(items: list, prompted: set, min_fit: int = MIN_IMAGES, share: float = 0.2
                    ) -> tuple[list, list]:
    """Labelled images in folder order (each item a tuple, its file name first) -> (fitted on,
    checked on): up to `share` of them, taken from those whose file is not in `prompted` (images
    with prompts) and spread over the list, are kept out to check the refiner on, while at least
    min_fit are left to fit; fewer than 2 to check: none is kept out."""
    pool = [x for x in items if x[0] not in prompted]
    n = min(len(pool), int(len(items) * share), len(items) - min_fit)
    if n < 2:
        return list(items), []
    out = {pool[int((k + 0.5) * len(pool) / n)][0] for k in range(n)}
    return [x for x in items if x[0] not in out], [x for x in items if x[0] in out]


def split_labels(labels: Path, images_dir: Path, prompts: Path, share: float, work: Path) -> tuple[Path, Path | None]:
    """`app.py refine --check-share`: the COCO file `labels` (file names relative to images_dir) ->
    (COCO file to fit on, COCO file to check on or None), written into `work`. The check file holds
    only the categories with a positive exemplar in the prompt file `prompts`."""
    from exports._io import atomic_write_json
    from exports.prompts import read_prompts

    gt = json.loads(Path(labels).read_text(encoding="utf-8"))
    ps = read_prompts(prompts)
    on_prompts = {Path(q.image).resolve() for q in ps.prompts}
    boxed = {a["image_id"] for a in gt["annotations"] if "score" not in a}
    items = [(im["file_name"],) for im in gt["images"] if im["id"] in boxed]
    prompted = {f for f, in items if (Path(images_dir) / f).resolve() in on_prompts}
    fit, check = split_for_check(items, prompted, min_fit=1, share=share)
    if not check:
        return Path(labels), None
    work.mkdir(parents=True, exist_ok=True)
    parts = {work / "fit.coco.json": coco_subset(gt, {f for f, in fit}),
             work / "check.coco.json": coco_subset(gt, {f for f, in check},
                                                   {q.category for q in ps.prompts if not q.negative})}
    for path, data in parts.items():
        atomic_write_json(path, data)
    return tuple(parts)


def coco_subset(gt: dict, files: set[str] | None = None, categories: set[str] | None = None) -> dict:
    """A COCO dict cut down to the images named in `files` and the annotations, on them, of the
    categories named in `categories` (None: all of either)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = [im for im in gt["images"] if files is None or im["file_name"] in files]
    ids = {im["id"] for im in images}
    return {**gt, "images": images, "annotations": [
        a for a in gt["annotations"]
        if a["image_id"] in ids and (categories is None or names[a["category_id"]] in categories)]}


def check_path(weights: str | os.PathLike) -> Path:
    """Where the check of a fitted refiner's weights file is kept (JSON beside it)."""
    return Path(weights).with_suffix(".check.json")


def read_check(weights: str | os.PathLike) -> str | None:
    """The check's one-line result for this weights file, or None (never checked, or the check
    was of an earlier file: the file's size and time are recorded with it)."""
    try:
        saved = json.loads(check_path(weights).read_text(encoding="utf-8"))
        st = os.stat(weights)
        if (saved["weights_mtime_ns"], saved["weights_size"]) == (st.st_mtime_ns, st.st_size):
            return str(saved["result"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def check_weights(check: Path, images_dir: Path, prompts: Path, weights: dict[str, str | None], work: Path,
                  log) -> dict:
    """Score each of `weights` ({arm: weights file, None: shipped}) on the images of the COCO file
    `check` (labels; file names relative to images_dir), labelled like `label` with the prompt file
    `prompts` (cross-image, flip, text prompts ignored) -> {arm: app.evaluate.evaluate's result}.
    The images are copied into `work` first, so that only they are labelled."""
    from app.batch import run
    from app.evaluate import evaluate, load_json

    gt = load_json(str(check), "GT")
    root = Path(images_dir)
    folder = Path(work) / "check-images"
    for im in gt["images"]:
        dest = folder / im["file_name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / im["file_name"], dest)
    out = {}
    for arm, w in weights.items():
        pred = Path(work) / f"check-{arm}.json"
        run(str(folder), str(prompts), str(pred), weights=w, progress=False, warn=log, ignore_text=True)
        out[arm] = evaluate(gt, load_json(str(pred), "PRED"))
    return out


def main(argv: list[str] | None = None) -> int:
    """The child process RefinerJob starts (module docstring). Options it does not know go to
    `train --refiner`."""
    ap = argparse.ArgumentParser(prog="app.py refine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Other options go to 'app.py train --refiner' (e.g. --synthetic, "
                                        "--batch, --lr, --seed).")
    ap.add_argument("--labels", required=True, help="COCO file of your labels (boxes with a score are "
                    "detections and are left out)")
    ap.add_argument("--images", required=True, help="folder the --labels file names are relative to")
    ap.add_argument("--out", required=True, help="weights file to write (with the fitted refiner)")
    ap.add_argument("--init", default=None, help="weights to start from (default: the shipped ones)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--check", default=None, help="COCO labels of images kept out of --labels")
    ap.add_argument("--prompts", default=None, help="prompt file to label the check images with")
    ap.add_argument("--check-share", type=float, default=None, metavar="F",
                    help="with --prompts: keep up to this share of the labelled images (those without "
                         "prompts, spread over the file) out of the fit and check on them, e.g. 0.2")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="exit when standard input closes (the app that started it is gone)")
    args, train_args = ap.parse_known_args(argv)
    from exports._io import atomic_write_json
    from trex2.train import main as train_main

    if args.check_share is not None:
        if not args.prompts or args.check:
            ap.error("--check-share needs --prompts (and replaces --check)")
        if not 0.0 < args.check_share < 1.0:
            ap.error(f"--check-share is a share between 0 and 1, got {args.check_share}")
        work = Path(args.out).with_name(Path(args.out).stem + "-check")
        fit, check = split_labels(Path(args.labels), Path(args.images), Path(args.prompts), args.check_share, work)
        if check is None:
            print("app.py refine: too few labelled images without prompts to keep some out: no check",
                  file=sys.stderr)
        args.labels, args.check = str(fit), (str(check) if check else None)

    if args.exit_with_parent:
        def watch():
            sys.stdin.read()      # returns when the parent's end of the pipe closes
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    work = Path(args.check).parent / "check" if args.check else None
    if work is not None and args.init:   # "before" must survive --out overwriting --init
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.init, work / "before.safetensors")
    code = train_main(["--refiner", "--labels", args.labels, "--images", args.images, "--out", args.out,
                       "--threads", "1", "--steps", str(args.steps)]
                      + (["--init", args.init] if args.init else []) + train_args)
    if code or not (args.check and args.prompts):
        return code
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{_CHECKING} it on the labelled images kept out of the fit")
    before = str(work / "before.safetensors") if args.init else None
    try:
        gt = json.loads(Path(args.check).read_text(encoding="utf-8"))
        if not gt["annotations"]:
            raise ValueError("the images kept out have no boxes of a class with prompts")
        r = check_weights(Path(args.check), Path(args.images), Path(args.prompts),
                          {"before": before, "after": args.out}, work, log)
    except Exception as e:  # noqa: BLE001 - the refiner is saved; say why it could not be checked
        log(f"refiner check: not done ({type(e).__name__}: {e})")
        return 0
    b, a = r["before"], r["after"]
    verdict = ("it helped there" if a["AP"] >= b["AP"] + CLEAR_CHANGE else
               "it did not help there: keep the weights you have" if a["AP"] <= b["AP"] - CLEAR_CHANGE else
               f"no clear change (less than {CLEAR_CHANGE} AP)")
    result = (f"on {len(gt['images'])} of your labelled images not used for fitting "
              f"({len(gt['annotations'])} boxes), AP {b['AP']:.3f} -> {a['AP']:.3f}, "
              f"AP50 {b['AP50']:.3f} -> {a['AP50']:.3f}, AP75 {b['AP75']:.3f} -> {a['AP75']:.3f}: {verdict}")
    st = os.stat(args.out)
    atomic_write_json(check_path(args.out), {"weights_mtime_ns": st.st_mtime_ns, "weights_size": st.st_size,
                                             "result": result})
    log(f"refiner check: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
