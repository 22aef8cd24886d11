"""Fitting the box refiner to the boxes accepted in the app, in a background process.

The app exports the accepted boxes as COCO and runs `python -m trex2.train --refiner --labels ...`
(trex2/train_refiner.py) as a child process on one thread, so labeling goes on meanwhile. Its log
gives the progress; the weights are written atomically (TRex2.save), so a cancelled or failed run
leaves an earlier fitted file as it was. One job per app process (the model is shared too).
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_IMAGES = 10     # accepted boxes on at least this many images before fitting is offered
STEPS = 3000        # train_refiner's recipe (README, "The shipped run", item 12)

_STEP = re.compile(r"refiner step (\d+)")
_SCENE = re.compile(r"synthetic scene (\d+) of (\d+)")


@dataclass
class JobStatus:
    """state: "idle", "running", "done", "failed" or "cancelled"; text: one line for the user;
    fraction: progress in [0, 1] while running (None before the training steps start)."""
    state: str
    text: str
    fraction: float | None = None


class RefinerJob:
    """One background fit at a time: start(), status() (polled by the UI), cancel()."""

    def __init__(self, steps: int = STEPS, extra: tuple[str, ...] = ()):
        """steps: training steps; extra: more `train` options (tests make the run tiny)."""
        self.steps = int(steps)
        self.extra = tuple(extra)
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._out: Path | None = None
        self._started = 0.0
        self._ended: float | None = None
        self._cancelled = False
        self._lock = threading.Lock()
        self._exit_hook = False

    @property
    def out(self) -> Path | None:
        """The weights file of the last run started (None: none started)."""
        return self._out

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, labels: Path, images_dir: Path, out: Path, log_path: Path, init: str | None = None) -> None:
        """Fit a refiner to the COCO file `labels` (file names relative to images_dir), starting
        from the weights `init` (None: the shipped ones), saved to `out`; the child's output goes
        to log_path. RuntimeError if a fit is already running."""
        with self._lock:
            if self.running():
                raise RuntimeError("a box refiner is already being fitted: wait for it or stop it")
            cmd = [sys.executable, "-m", "trex2.train", "--refiner", "--labels", str(labels),
                   "--images", str(images_dir), "--out", str(out), "--threads", "1",
                   "--steps", str(self.steps), *self.extra]
            if init:
                cmd += ["--init", str(init)]
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w", encoding="utf-8") as log:
                # its own process group, so that cancel() stops it and anything it started
                self._proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True)
            self._log_path, self._out = Path(log_path), Path(out)
            self._started, self._ended, self._cancelled = time.time(), None, False
            if not self._exit_hook:     # never leave a fit running after the app stops
                atexit.register(self.cancel)
                self._exit_hook = True

    def cancel(self) -> bool:
        """Stop a running fit (its output file is left as it was). True if one was stopped."""
        with self._lock:
            if not self.running():
                return False
            self._cancelled = True
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            return True

    def _log_lines(self) -> list[str]:
        try:
            return self._log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except (OSError, AttributeError):
            return []

    def status(self) -> JobStatus:
        if self._proc is None:
            return JobStatus("idle", "")
        lines = self._log_lines()
        code = self._proc.poll()
        if code is not None and self._ended is None:
            self._ended = time.time()
        minutes = ((self._ended or time.time()) - self._started) / 60
        if code is None:
            steps = [int(m.group(1)) for m in map(_STEP.search, lines) if m]
            scenes = [m for m in map(_SCENE.search, lines) if m]
            if steps:
                f = steps[-1] / self.steps
                text = f"fitting: step {steps[-1]} of {self.steps} ({minutes:.0f} min so far)"
                return JobStatus("running", text, f)
            if scenes:
                text = (f"preparing: synthetic scene {scenes[-1].group(1)} of {scenes[-1].group(2)} "
                        f"({minutes:.0f} min so far)")
            else:
                text = f"preparing: reading your labelled images ({minutes:.0f} min so far)"
            return JobStatus("running", text, None)
        if self._cancelled:
            return JobStatus("cancelled", "stopped; no refiner was saved by this run")
        if code == 0 and self._out is not None and self._out.is_file():
            return JobStatus("done", f"fitted in {minutes:.0f} min: {self._out}", 1.0)
        last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        return JobStatus("failed", f"the fit failed (exit code {code}): {last.strip()[-300:]} "
                                   f"(full log: {self._log_path})")
