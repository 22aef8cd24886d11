"""The one place images are read from disk (DESIGN.md section 1).

Every image read in the project goes through :func:`load_image`, which returns
RGB ``uint8`` pixels of shape ``(H, W, 3)`` in the frame the user sees (EXIF
orientation applied). Anything that cannot be read raises :class:`ImageLoadError`
(a ``ValueError``) whose message names the file.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageLoadError",
    "image_size",
    "is_image_file",
    "list_images",
    "load_image",
]

#: File extensions (lower case, with the dot) treated as images by :func:`list_images`.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp",
)

#: Largest image accepted, in pixels (W * H). Guards against decompression bombs while taking the
#: largest phone photos (200 MP, 16320 x 12240).
MAX_PIXELS: int = 256_000_000
_PIL_LIMIT = threading.Lock()


@contextmanager
def _pil_limit_lifted():
    """PIL's own decompression-bomb check off (it is global state) while the block runs: MAX_PIXELS
    is checked instead, by _open."""
    with _PIL_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit

# EXIF orientations that flip or rotate the stored pixels; 5-8 also swap width and height.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

# Pixels are copied out of PIL in strips of about this many bytes (see _pixels).
_STRIP_BYTES = 1 << 24

# Modes that carry an alpha channel; composited onto white.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageLoadError(ValueError):
    """An image file could not be read (missing, empty, corrupt, not an image, too large)."""


def is_image_file(name: str | os.PathLike) -> bool:
    """True if ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageLoadError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) and enforce :data:`MAX_PIXELS`.

    PIL's own decompression-bomb check (a warning above 89 MP, an error above 179 MP) is replaced
    by ours: it is lifted while the header is read, and the size checked against MAX_PIXELS.
    """
    _check_file(path)
    try:
        with _pil_limit_lifted():
            im = Image.open(path)
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not a recognised image file") from e
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file
        raise ImageLoadError(f"{path}: cannot open image ({type(e).__name__}: {e})") from e
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise ImageLoadError(f"{path}: image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageLoadError(
            f"{path}: image too large ({w}x{h} = {w * h} pixels), refused as a possible "
            f"decompression bomb; limit is {MAX_PIXELS} pixels (trex2.image_io.MAX_PIXELS)")
    return im


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Single-channel modes I;16*, I (32-bit int) and F (float) -> 8-bit RGB.

    I;16*: 0..65535 scaled to 0..255 (rounded). I: treated as 16-bit if any value exceeds 255,
    else as 8-bit. F: values in [0, 1] are scaled by 255, others clipped to 0..255.
    Integer modes are scaled in 4-byte integers, F in float32: a large image costs a few
    bytes per pixel, not the several float64 copies (8 bytes each) of a naive conversion.
    """
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr *= 255.0
        grey = np.clip(np.rint(arr, out=arr), 0, 255, out=arr).astype(np.uint8)
    else:
        arr = arr.astype(np.int32)                       # I;16* are uint16, I is int32
        np.clip(arr, 0, 65535, out=arr)
        if im.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr += 128
            arr //= 257                                 # == rint(v / 257) for integers v
        grey = arr.astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode.startswith("I") or im.mode == "F":
        return _high_bit_depth_to_rgb(im)
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, ...
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8), or None when absent or the EXIF block is malformed."""
    try:
        return im.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - malformed EXIF: no orientation
        return None


def _pixels(im: Image.Image) -> np.ndarray:
    """An RGB image -> a new writable (H, W, 3) uint8 array, copied in strips of rows: the
    pixels are held about twice at the peak (np.array(im) holds them three times, through
    Image.tobytes, e.g. 0.9 GB more for a 100-megapixel photo)."""
    w, h = im.size
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, _STRIP_BYTES // (3 * w))
    for y in range(0, h, step):
        with _pil_limit_lifted():   # crop repeats PIL's bomb check, done already by _open
            strip = im.crop((0, y, w, min(h, y + step)))
        out[y:y + step] = np.asarray(strip)
    return out


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB uint8 pixels, shape ``(H, W, 3)``, EXIF orientation applied.

    Greyscale, palette, CMYK, 16-bit and float images are converted to RGB; alpha is
    composited onto white; for multi-frame files the first frame is used.
    Raises :class:`ImageLoadError` (naming the file) for a missing, empty, corrupt or
    non-image file, or one with more than :data:`MAX_PIXELS` pixels. Each intermediate
    image is released as soon as the next exists, so a large file costs about twice its
    decoded size at the peak.
    """
    path = Path(path)
    im = _open(path)
    try:
        im.load()
        steps = [_to_rgb]
        if _orientation(im) in _TRANSPOSING_ORIENTATIONS:
            steps.insert(0, ImageOps.exif_transpose)
        for step in steps:
            new = step(im)
            if new is not im:
                im.close()
                im = new
        arr = _pixels(im)
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        im.close()
    return arr


def check_decodes(path: str | os.PathLike) -> None:
    """Raise :class:`ImageLoadError` if the file's pixel data cannot be decoded (a JPEG cut short
    whose header still reads), as :func:`load_image` would. JPEGs are decoded at 1/8 scale (DCT
    scaling, every byte still parsed): about 5x faster than a full decode."""
    path = Path(path)
    im = _open(path)
    try:
        if im.format == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        im.close()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(W, H)`` of the image as the user sees it (EXIF orientation applied).

    Reads only the header (no pixel decoding). Raises :class:`ImageLoadError` like
    :func:`load_image` for unreadable or over-large files.
    """
    path = Path(path)
    im = _open(path)
    with im:
        w, h = im.size
        orientation = _orientation(im)
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return int(w), int(h)


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under ``root``, recursively, as sorted POSIX paths relative to ``root``.

    Only files with :data:`IMAGE_EXTENSIONS` are listed; hidden files and folders
    (names starting with ".", e.g. macOS "._x.jpg" resource forks) are skipped. Linked folders
    are followed, each real folder once (a link back up the tree is not a loop).
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found: list[str] = []
    seen: set[str] = set()
    links: list[Path] = []

    def walk(top: Path, follow: bool) -> None:
        """List `top`'s images; folders already seen (by real path) are skipped; without
        `follow`, linked folders are kept in `links` for later."""
        if os.path.realpath(top) in seen:
            return
        for dirpath, dirnames, filenames in os.walk(top, followlinks=follow):
            seen.add(os.path.realpath(dirpath))
            keep = []
            for d in sorted(dirnames):
                sub = os.path.join(dirpath, d)
                if d.startswith(".") or os.path.realpath(sub) in seen:
                    continue
                if not follow and os.path.islink(sub):
                    links.append(Path(sub))
                else:
                    keep.append(d)
            dirnames[:] = keep
            rel_dir = Path(dirpath).relative_to(root)
            found.extend((rel_dir / name).as_posix() for name in filenames
                         if not name.startswith(".") and is_image_file(name))

    walk(root, follow=False)   # the real folders first: their own paths win over links to them
    for link in links:
        walk(link, follow=True)
    return sorted(found)
