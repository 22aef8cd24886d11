"""trex2.image_io: the one image reader. Every input file is generated here in tmp_path."""
import warnings

import numpy as np
import pytest
from PIL import Image

from trex2 import image_io
from trex2.image_io import (IMAGE_EXTENSIONS, ImageLoadError, check_decodes, image_size,
                            is_image_file, list_images, load_image)


def _check_rgb(arr, h, w):
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8
    assert arr.shape == (h, w, 3)
    assert arr.flags.c_contiguous


def test_plain_rgb_png_pixels_exact(tmp_path):
    rng = np.random.default_rng(0)
    pix = rng.integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(pix).save(p)
    arr = load_image(p)
    _check_rgb(arr, 7, 11)
    np.testing.assert_array_equal(arr, pix)
    assert image_size(p) == (11, 7)
    # str paths work too
    np.testing.assert_array_equal(load_image(str(p)), pix)


@pytest.mark.parametrize("orientation, top_red", [(6, True), (8, False)])
def test_exif_rotated_jpeg(tmp_path, orientation, top_red):
    # Stored 40 wide x 20 high, left half red, right half blue.
    pix = np.zeros((20, 40, 3), np.uint8)
    pix[:, :20] = (255, 0, 0)
    pix[:, 20:] = (0, 0, 255)
    im = Image.fromarray(pix)
    exif = im.getexif()
    exif[0x0112] = orientation  # 6: rotate 90 CW to display; 8: rotate 90 CCW
    p = tmp_path / "rot.jpg"
    im.save(p, quality=95, exif=exif)

    arr = load_image(p)
    _check_rgb(arr, 40, 20)  # displayed frame: 20 wide, 40 high
    assert image_size(p) == (20, 40)
    top, bottom = arr[:20].reshape(-1, 3).mean(0), arr[20:].reshape(-1, 3).mean(0)
    red, blue = (top, bottom) if top_red else (bottom, top)
    assert red[0] > 200 and red[2] < 60
    assert blue[2] > 200 and blue[0] < 60


def test_exif_orientation_without_swap_keeps_size(tmp_path):
    im = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 3  # rotate 180
    p = tmp_path / "r180.jpg"
    im.save(p, exif=exif)
    assert image_size(p) == (30, 10)
    _check_rgb(load_image(p), 10, 30)


def test_greyscale(tmp_path):
    grey = np.arange(12 * 5, dtype=np.uint8).reshape(5, 12) * 4
    p = tmp_path / "g.png"
    Image.fromarray(grey, mode="L").save(p)
    arr = load_image(p)
    _check_rgb(arr, 5, 12)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], grey)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255          # red
    rgba[:, :3, 3] = 255        # left half opaque
    rgba[:, 3:, 3] = 0          # right half fully transparent
    p = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    arr = load_image(p)
    _check_rgb(arr, 4, 6)
    assert (arr[:, :3] == (255, 0, 0)).all()
    assert (arr[:, 3:] == (255, 255, 255)).all()


def test_grey_with_alpha(tmp_path):
    la = np.zeros((3, 4, 2), np.uint8)
    la[..., 1] = 255
    la[0, 0, 1] = 0
    p = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(p)
    arr = load_image(p)
    _check_rgb(arr, 3, 4)
    assert (arr[0, 0] == 255).all()
    assert (arr[1, 1] == 0).all()


def test_palette(tmp_path):
    im = Image.new("P", (8, 6))
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, 4, 6))
    p = tmp_path / "p.png"
    im.save(p)
    arr = load_image(p)
    _check_rgb(arr, 6, 8)
    assert (arr[:, :4] == (10, 200, 30)).all()
    assert (arr[:, 4:] == 0).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (2, 0, 4, 2))
    p = tmp_path / "pt.png"
    im.save(p, transparency=0)  # palette index 0 (blue) transparent
    arr = load_image(p)
    _check_rgb(arr, 2, 4)
    assert (arr[:, :2] == 255).all()           # transparent -> white
    assert (arr[:, 2:] == (255, 0, 0)).all()   # opaque red


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (9, 7), (0, 255, 255, 0))  # pure red in CMYK
    p = tmp_path / "c.jpg"
    im.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    arr = load_image(p)
    _check_rgb(arr, 7, 9)
    mean = arr.reshape(-1, 3).mean(0)
    assert mean[0] > 200 and mean[1] < 60 and mean[2] < 60


def test_16bit_grey_png(tmp_path):
    vals = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(vals).save(p)
    assert Image.open(p).mode.startswith("I")
    arr = load_image(p)
    _check_rgb(arr, 1, 3)
    np.testing.assert_array_equal(arr[0, :, 0], [0, 100, 255])
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_16bit_grey_every_value_and_memory(tmp_path):
    """All 65,536 values round like rint(v / 257); a large 16-bit image is converted in a few bytes per
    pixel (the float64 conversion held about 23 bytes per pixel: 550 MB at 6000 x 4000)."""
    import tracemalloc
    vals = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    p = tmp_path / "all16.png"
    Image.fromarray(vals).save(p)
    np.testing.assert_array_equal(load_image(p)[..., 1], np.rint(vals / 257))
    big = tmp_path / "big16.png"
    Image.fromarray(np.tile(vals, (6, 6))).save(big, compress_level=1)   # 1536 x 1536
    tracemalloc.start()
    try:
        load_image(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / 1536 ** 2 < 12, f"{peak / 1536 ** 2:.1f} bytes per pixel"


def test_large_image_pixels_are_held_once_more_not_twice(tmp_path, monkeypatch):
    """The pixels leave PIL in strips (here of 1 MB): Python-side memory peaks at about the array
    itself, not the ~2x of np.array(im) (Image.tobytes' joined copy plus the array); a 12000 x 8000
    JPEG took 1.3 GB above the import, now 0.7 GB. Same pixels, a writable array."""
    import tracemalloc
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    p = tmp_path / "big.png"
    Image.fromarray(pixels).save(p, compress_level=1)
    monkeypatch.setattr(image_io, "_STRIP_BYTES", 1 << 20, raising=False)
    tracemalloc.start()
    try:
        arr = load_image(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _check_rgb(arr, 1500, 2000)
    np.testing.assert_array_equal(arr, pixels)
    assert arr.flags.writeable
    assert peak < 1.4 * pixels.nbytes, f"peak {peak / pixels.nbytes:.2f} x the pixels"


def test_float_tiff(tmp_path):
    vals = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    p = tmp_path / "f.tif"
    Image.fromarray(vals, mode="F").save(p)
    arr = load_image(p)
    _check_rgb(arr, 1, 3)
    np.testing.assert_array_equal(arr[0, :, 1], [0, 128, 255])


def test_multiframe_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (5, 5), c) for c in [(255, 0, 0), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    arr = load_image(p)
    _check_rgb(arr, 5, 5)
    assert arr[..., 0].min() > 200 and arr[..., 1].max() < 60


def _assert_names_file(excinfo, path):
    assert str(path) in str(excinfo.value)


def test_corrupt_jpeg(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    data = good.read_bytes()
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(data[:40] + b"\x00garbage" * 10)  # header kept, body destroyed
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    _assert_names_file(ei, p)


def test_truncated_png(tmp_path):
    good = tmp_path / "good.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    p = tmp_path / "trunc.png"
    p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    _assert_names_file(ei, p)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_check_decodes_agrees_with_load_image_on_a_file_cut_short(tmp_path, ext):
    rng = np.random.default_rng(2)
    good = tmp_path / f"good{ext}"
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(good)
    check_decodes(good)                        # intact: no error (the JPEG at 1/8 scale)
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])   # header intact
    assert image_size(cut) == (320, 256)
    for read in (load_image, check_decodes):
        with pytest.raises(ImageLoadError) as ei:
            read(cut)
        _assert_names_file(ei, cut)


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(p)
        _assert_names_file(ei, p)
        assert "empty" in str(ei.value)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(p)
        _assert_names_file(ei, p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError) as ei:
        load_image(tmp_path / "nope.png")
    _assert_names_file(ei, tmp_path / "nope.png")
    with pytest.raises(ImageLoadError):
        load_image(tmp_path)


def test_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)


def test_decompression_bomb_own_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(p)
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100 * 50)
    _check_rgb(load_image(p), 50, 100)  # exactly at the limit is fine
    monkeypatch.setattr(image_io, "MAX_PIXELS", 100 * 50 - 1)
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(p)
        _assert_names_file(ei, p)
        assert "too large" in str(ei.value)


def test_pil_bomb_limit_gives_way_to_ours(tmp_path, monkeypatch):
    """PIL's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice that;
    179 MP by default, which refused 200 MP phone photos) does not apply: MAX_PIXELS decides,
    no warning leaks, and PIL's global limit is left as it was."""
    p = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(p)
    for pil_limit in (4000, 9000):          # PIL's error range, then its warning range
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_rgb(load_image(p), 100, 100)
            assert image_size(p) == (100, 100)
        assert Image.MAX_IMAGE_PIXELS == pil_limit
    monkeypatch.setattr(image_io, "MAX_PIXELS", 9000)
    with pytest.raises(ImageLoadError) as ei:
        load_image(p)
    _assert_names_file(ei, p)


def test_list_images(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for rel in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "sub/a.png",
                "notes.txt", "sub/x.json", ".hidden/e.jpg", "sub/._c.jpeg"]:
        (tmp_path / rel).write_bytes(b"x")
    got = list_images(tmp_path)
    assert got == ["a.PNG", "b.jpg", "sub/a.png", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert got == sorted(got)
    assert list_images(str(tmp_path / "sub")) == ["a.png", "c.jpeg", "deeper/d.webp"]


def test_list_images_follows_linked_folders_once(tmp_path):
    root, other = tmp_path / "root", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    other.mkdir()
    for d in (root / "real", other):
        Image.new("RGB", (4, 4)).save(d / "x.png")
    (root / "linked").symlink_to(other, target_is_directory=True)     # a folder kept elsewhere
    (root / "again").symlink_to(root / "real", target_is_directory=True)  # the same folder twice
    (root / "real" / "up").symlink_to(root, target_is_directory=True)     # a loop
    (root / "real" / "deep").mkdir()
    Image.new("RGB", (4, 4)).save(root / "real" / "deep" / "y.png")
    (root / "a_link").symlink_to(root / "real" / "deep", target_is_directory=True)  # to a deeper real one
    assert list_images(root) == ["linked/x.png", "real/deep/y.png", "real/x.png"]


def test_list_images_bad_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    f = tmp_path / "f.jpg"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="f.jpg"):
        list_images(f)


def test_extensions():
    assert {".jpg", ".jpeg", ".png"} <= set(IMAGE_EXTENSIONS)
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert is_image_file("X.JPG") and is_image_file("a/b.tiff")
    assert not is_image_file("a.json") and not is_image_file("jpg")
