"""difftune.data.images: odd-but-valid images load right, broken ones fail with a reason."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from difftune import DifftuneError
from difftune.data.images import (
    IMAGE_EXTENSIONS,
    ImageProblem,
    check_image_bytes,
    load_image,
    read_caption,
    sniff_image_bytes,
)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def jpeg_bytes(size=(64, 48), color=(200, 30, 30)) -> bytes:
    return encode(Image.new("RGB", size, color), "JPEG", quality=95)


def png_bytes(size=(64, 48), color=(10, 120, 240)) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def assert_close(pixel, expected, tol=6):
    assert all(abs(a - b) <= tol for a, b in zip(pixel, expected)), (pixel, expected)


# --- odd but valid --------------------------------------------------------------------


def test_plain_rgb_jpeg_and_png(tmp_path):
    img = load_image(write(tmp_path, "a.jpg", jpeg_bytes()))
    assert img.mode == "RGB" and img.size == (64, 48)
    assert_close(img.getpixel((10, 10)), (200, 30, 30))
    img = load_image(write(tmp_path, "b.png", png_bytes()))
    assert img.getpixel((0, 0)) == (10, 120, 240)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    img = load_image(write(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=95)))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    # A mid-grey gradient: 30000..35000 of 65535, i.e. about 117..136 of 255.
    values = np.linspace(30000, 35000, 16 * 16).reshape(16, 16).astype(np.uint16)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    path = write(tmp_path, "deep.png", encode(src, "PNG"))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really decoded as a 16-bit image
    img = load_image(path)
    assert img.mode == "RGB"
    first, last = img.getpixel((0, 0)), img.getpixel((15, 15))
    assert first[0] == first[1] == first[2]
    assert first[0] == round(30000 / 257)  # 117, not 255
    assert last[0] == round(35000 / 257)  # 136
    assert 110 < np.asarray(img).mean() < 140


def test_32bit_int_and_float_images_are_scaled(tmp_path):
    as_int = Image.fromarray(np.full((8, 8), 32768, dtype=np.int32))
    assert as_int.mode == "I"
    img = load_image(write(tmp_path, "int.tif", encode(as_int, "TIFF")))
    assert img.getpixel((0, 0)) == (128, 128, 128)
    as_float = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert as_float.mode == "F"
    img = load_image(write(tmp_path, "float.tif", encode(as_float, "TIFF")))
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_rgba_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    rgba.putpixel((6, 6), (0, 0, 0, 128))
    img = load_image(write(tmp_path, "rgba.png", encode(rgba, "PNG")))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((5, 5)) == (0, 0, 255)
    assert_close(img.getpixel((6, 6)), (127, 127, 127), tol=2)


def test_la_is_composited_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((1, 1), (50, 255))
    img = load_image(write(tmp_path, "la.png", encode(la, "PNG")))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (50, 50, 50)


@pytest.mark.parametrize("fmt, name", [("PNG", "p.png"), ("GIF", "p.gif")])
def test_palette_with_transparency_on_white(tmp_path, fmt, name):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0, 0, 0] * 254)
    pal.putpixel((2, 2), 1)
    data = encode(pal, fmt, transparency=0)
    img = load_image(write(tmp_path, name, data))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # index 0 is transparent black
    assert img.getpixel((2, 2)) == (0, 200, 0)


@pytest.mark.parametrize("mode, value, expected", [("L", 77, 77), ("1", 1, 255)])
def test_greyscale_and_bilevel(tmp_path, mode, value, expected):
    img = load_image(write(tmp_path, "g.png", encode(Image.new(mode, (5, 5), value), "PNG")))
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (expected,) * 3


def test_exif_orientation_is_applied(tmp_path):
    src = Image.new("RGB", (40, 20), (255, 255, 255))
    src.paste((255, 0, 0), (0, 0, 10, 10))  # red block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = load_image(write(tmp_path, "phone.jpg", encode(src, "JPEG", quality=95, exif=exif)))
    assert img.size == (20, 40)
    r, g, b = img.getpixel((15, 4))  # ... is top-right once upright
    assert r > 200 and g < 60 and b < 60
    assert_close(img.getpixel((4, 4)), (255, 255, 255))


# --- broken -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
    data = encode(Image.effect_noise((256, 256), 80).convert("RGB"), fmt)
    cut = data[: len(data) // 2]
    path = write(tmp_path, "cut.img", cut)
    with pytest.raises(ImageProblem) as info:
        load_image(path)
    assert info.value.reason == "truncated"
    assert info.value.path == str(path)
    with pytest.raises(ImageProblem) as info:
        check_image_bytes(cut)
    assert info.value.reason == "truncated"


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.jpg", b"")
    with pytest.raises(ImageProblem) as info:
        load_image(path)
    assert info.value.reason == "empty"
    assert str(info.value) == f"{path}: empty"


def test_html_saved_as_jpg(tmp_path):
    html = b"\n  <!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>no</body></html>"
    with pytest.raises(ImageProblem) as info:
        load_image(write(tmp_path, "photo.jpg", html))
    assert info.value.reason == "html page"
    assert str(info.value).startswith(f"{tmp_path / 'photo.jpg'}: html page (")
    with pytest.raises(ImageProblem) as info:
        check_image_bytes(html)
    assert info.value.reason == "html page"


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageProblem) as info:
        load_image(write(tmp_path, "noise.png", data))
    assert info.value.reason == "not an image"
    assert isinstance(info.value, DifftuneError)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ImageProblem) as info:
        load_image(tmp_path / "nope.png")
    assert info.value.reason == "missing"
    with pytest.raises(ImageProblem) as info:
        load_image(tmp_path)
    assert info.value.reason == "unreadable"


def test_pixel_limit_is_an_error(tmp_path, monkeypatch):
    warn_size = write(tmp_path, "w.png", png_bytes(size=(12, 12)))  # 144 px: over 100, under 200
    bomb = write(tmp_path, "b.png", png_bytes(size=(20, 20)))  # 400 px: over 2 * 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageProblem) as info:
        load_image(warn_size)
    assert info.value.reason == "too large"
    assert "144 pixels" in str(info.value)
    with pytest.raises(ImageProblem) as info:
        load_image(bomb)
    assert info.value.reason == "decompression bomb"
    with pytest.raises(ImageProblem) as info:
        check_image_bytes(bomb.read_bytes())
    assert info.value.reason == "decompression bomb"
    monkeypatch.undo()
    assert load_image(bomb).size == (20, 20)


def test_pixel_limit_leaves_global_warning_filters_alone(tmp_path, monkeypatch):
    import warnings

    before = list(warnings.filters)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageProblem):
        load_image(write(tmp_path, "w.png", png_bytes(size=(12, 12))))
    assert warnings.filters == before


# --- bytes checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, expected, params",
    [
        ("JPEG", "jpeg", {}),
        ("PNG", "png", {}),
        ("GIF", "gif", {}),
        ("WEBP", "webp", {}),
        ("BMP", "bmp", {}),
        ("TIFF", "tiff", {}),
    ],
)
def test_sniff_and_check_each_format(fmt, expected, params):
    data = encode(Image.new("RGB", (7, 5), (1, 2, 3)), fmt, **params)
    assert sniff_image_bytes(data) == expected
    assert check_image_bytes(data) == (expected, (7, 5))


@pytest.mark.parametrize(
    "data", [b"", b"BM is also how text can start", b"<html>", b"GIF8", b"RIFF\0\0\0\0WAVE", b"%PDF-1.7"]
)
def test_sniff_rejects_non_images(data):
    assert sniff_image_bytes(data) is None


def test_check_refuses_magic_without_a_valid_image():
    with pytest.raises(ImageProblem) as info:
        check_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, name="http://x/y.png")
    assert info.value.reason in {"truncated", "unreadable"}
    assert info.value.path == "http://x/y.png"
    with pytest.raises(ImageProblem) as info:
        check_image_bytes(b"")
    assert info.value.reason == "empty"


def test_image_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} == IMAGE_EXTENSIONS


# --- captions ---------------------------------------------------------------------------------


def test_caption_utf8_bom(tmp_path):
    path = write(tmp_path, "a.txt", b"\xef\xbb\xbf  a red fox, oil painting \r\n")
    assert read_caption(path) == "a red fox, oil painting"


def test_caption_cp1251_russian(tmp_path):
    text = "Рыжая лиса в зимнем лесу, масло"
    path = write(tmp_path, "a.txt", (text + "\n").encode("cp1251"))
    assert read_caption(path) == text


def test_caption_utf8_chinese(tmp_path):
    text = "一只红色的狐狸，油画"
    path = write(tmp_path, "a.txt", f"\n{text}\n".encode())
    assert read_caption(path) == text


def test_caption_latin1_western(tmp_path):
    text = "café crème, peinture à l'huile"
    path = write(tmp_path, "a.txt", text.encode("latin-1"))
    assert read_caption(path) == text


def test_caption_utf16_from_notepad(tmp_path):
    path = write(tmp_path, "a.txt", "лиса fox".encode("utf-16"))
    assert read_caption(path) == "лиса fox"


def test_caption_missing(tmp_path):
    with pytest.raises(DifftuneError, match="nope.txt"):
        read_caption(tmp_path / "nope.txt")


def test_load_image_accepts_str_path(tmp_path):
    path = write(tmp_path, "a.png", png_bytes())
    assert load_image(os.fspath(path)).size == (64, 48)
