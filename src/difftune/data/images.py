"""Loading the images and captions that real training folders contain.

Real data is messier than test fixtures: phone photos carry their rotation in EXIF, scans
come as CMYK or 16-bit greyscale, logos have transparency, downloads are sometimes cut
short or turn out to be an HTML login page saved as ``.jpg``. Everything here turns such
input into either a plain 8-bit RGB image or an :class:`ImageProblem` that says, in one
line, which file is bad and why.

Pillow's decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) is enforced strictly:
an image over the limit is an error, never just a warning.
"""

from __future__ import annotations

import codecs
import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import IO, TYPE_CHECKING

from difftune import DifftuneError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# Format name (as returned by sniff_image_bytes) -> Pillow's format name.
_PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
}

# Sizes of the DIB header that follows a BMP file header (BITMAPCOREHEADER .. BITMAPV5HEADER).
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

# warnings.catch_warnings() swaps process-wide state, so concurrent decodes (fetch uses
# threads) must not interleave inside it or the filters could be left in a wrong state.
_WARNINGS_LOCK = threading.Lock()

_CYRILLIC_NEXT_TO_LATIN = re.compile(r"[A-Za-z][\u0400-\u04ff]|[\u0400-\u04ff][A-Za-z]")


class ImageProblem(DifftuneError):
    """A file (or downloaded body) that cannot be used as a training image.

    ``reason`` is short and stable, meant for counting and for machines ("truncated",
    "not an image", "html page", "empty", "too large", "decompression bomb", "unreadable",
    "missing"); ``detail`` is free text for people.
    """

    def __init__(self, path: str | PathLike[str], reason: str, detail: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        message = f"{self.path}: {reason}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


def sniff_image_bytes(data: bytes) -> str | None:
    """Return the image format named by ``data``'s magic bytes, or None.

    One of "jpeg", "png", "gif", "webp", "bmp", "tiff". Only the first few bytes are
    looked at; use :func:`check_image_bytes` to know whether the whole image decodes.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    # "BM" alone is too weak (plain text starts with it), so also check the DIB header size.
    if len(data) >= 18 and data[:2] == b"BM":
        if int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES:
            return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    return None


def check_image_bytes(data: bytes, name: str = "<data>") -> tuple[str, tuple[int, int]]:
    """Verify that ``data`` is a complete image of a supported format.

    The format is taken from the magic bytes and the image is then fully decoded with
    that format's decoder, so a truncated or corrupt body fails here. Returns
    ``(format, (width, height))``; raises :class:`ImageProblem` (whose path is ``name``)
    otherwise. For animated formats only the first frame is decoded.
    """
    if not data:
        raise ImageProblem(name, "empty")
    fmt = sniff_image_bytes(data)
    if fmt is None:
        raise _not_an_image(name, data[:1024])
    with _decoded(io.BytesIO(data), name, expected=fmt) as img:
        return fmt, img.size


def load_image(path: str | PathLike[str]) -> Image.Image:
    """Load ``path`` as an 8-bit RGB image, upright, with transparency on white.

    - EXIF orientation is applied, so phone photos come out the way they are shown.
    - RGBA, LA, PA and palette or greyscale images with a transparent colour are
      composited on a white background.
    - CMYK, YCbCr, 1-bit and greyscale images are converted to RGB.
    - 16-bit and 32-bit greyscale (modes ``I;16*``, ``I``, ``F``) are scaled down to
      8 bits rather than clipped (see :func:`_high_depth_to_l`).
    - The pixels are fully decoded here, so a truncated file fails now rather than in the
      middle of training; Pillow's decompression-bomb limit is an error.

    Raises :class:`ImageProblem` for anything that is not a usable image.
    """
    path = Path(path)
    try:
        with path.open("rb") as fp:
            if not fp.read(1):
                raise ImageProblem(path, "empty")
            fp.seek(0)
            with _decoded(fp, path) as img:
                return _to_rgb(_upright(img), path)
    except FileNotFoundError:
        raise ImageProblem(path, "missing") from None
    except IsADirectoryError:
        raise ImageProblem(path, "unreadable", "is a directory") from None
    except PermissionError as exc:
        raise ImageProblem(path, "unreadable", exc.strerror) from None


def read_caption(path: str | PathLike[str]) -> str:
    """Read a caption text file, whatever editor wrote it, with surrounding whitespace removed.

    Decoding: a UTF-8 or UTF-16 byte-order mark wins; otherwise UTF-8; otherwise the
    legacy Windows Cyrillic code page cp1251; otherwise latin-1. Both legacy code pages
    accept almost any bytes, so cp1251 is only kept when it reads like Cyrillic words:
    a Cyrillic letter glued to a Latin one ("cafй") means the text was Western latin-1.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DifftuneError(f"{path}: cannot read caption ({exc.strerror or exc})") from None
    return _decode_text(raw).strip()


def _decode_text(raw: bytes) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1251")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
    if _CYRILLIC_NEXT_TO_LATIN.search(text):
        return raw.decode("latin-1")
    return text


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return True
    return start.startswith(b"<") and (b"<html" in start or b"<body" in start)


def _not_an_image(name: str | PathLike[str], head: bytes) -> ImageProblem:
    if _looks_like_html(head):
        detail = "a web page, not an image; a login wall or error page?"
        return ImageProblem(name, "html page", detail)
    return ImageProblem(name, "not an image", "unknown format")


@contextmanager
def _decoded(
    fp: IO[bytes], name: str | PathLike[str], expected: str | None = None
) -> Iterator[Image.Image]:
    """Open ``fp`` with Pillow and decode the pixels, turning every failure into ImageProblem.

    ``expected`` (a sniffed format name) restricts decoding to that format's decoder.
    """
    from PIL import Image, UnidentifiedImageError

    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp, formats=[_PIL_FORMATS[expected]] if expected else None)
            img.load()
        except Image.DecompressionBombWarning as exc:
            raise ImageProblem(name, "too large", _pixel_detail(exc)) from None
        except Image.DecompressionBombError as exc:
            raise ImageProblem(name, "decompression bomb", _pixel_detail(exc)) from None
        except UnidentifiedImageError:
            if expected:
                raise ImageProblem(name, "unreadable", f"damaged {expected} header") from None
            fp.seek(0)
            raise _not_an_image(name, fp.read(1024)) from None
        except EOFError:
            raise ImageProblem(name, "truncated") from None
        # Decoders fed hostile or damaged bytes raise all sorts of exception types
        # (OSError, SyntaxError, ValueError, struct.error, ...); each means "unusable file".
        except Exception as exc:
            reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
            raise ImageProblem(name, reason, str(exc) or type(exc).__name__) from None
    with img:
        yield img


def _pixel_detail(exc: Exception) -> str:
    # Pillow's message: "Image size (N pixels) exceeds limit of M pixels, could be ...".
    return str(exc).split(",")[0]


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Damaged EXIF is metadata only: keep the pixels as stored."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # the EXIF parser fails in many ways on damaged data
        return img


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _high_depth_to_l(img)
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageProblem(path, "unreadable", f"colour mode {img.mode}: {exc}") from None


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float greyscale image to 8-bit mode L.

    Pillow's own ``convert("L")`` clips such values at 255, so a mid-grey 16-bit scan
    (value ~32768) would come out white. ``I;16*`` modes are 0..65535 by definition. For
    ``I`` and ``F`` the range is not stored in the file, so it is inferred from the data:
    floats up to 1.0 are 0..1, values up to 255 are already 8-bit, values up to 65535 are
    16-bit (what 16-bit PNG/TIFF decode to), and anything larger is scaled by its maximum.
    """
    import numpy as np
    from PIL import Image

    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if img.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        peak = float(values.max(initial=0.0))
        if img.mode == "F" and peak <= 1.0:
            full_scale = 1.0
        elif peak <= 255:
            full_scale = 255.0
        elif peak <= 65535:
            full_scale = 65535.0
        else:
            full_scale = peak
    scaled = np.clip(values * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)
