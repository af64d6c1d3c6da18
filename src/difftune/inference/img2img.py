"""Image inputs of `difftune generate`: the init image (img2img), the mask (inpainting) and strength.

The init image sets the output size unless ``--width`` / ``--height`` say otherwise (rounded down to
what the model needs); the mask is resized to the output size, white = repaint, black = keep, as in
diffusers' inpainting pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import DifftuneError


def open_image(path: str | Path, flag: str, mode: str = "RGB") -> Any:
    """A PIL image in `mode`, fully read; one line naming `flag` if it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise DifftuneError(f"{flag} {path}: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise DifftuneError(f"{flag} {path}: not a readable image ({type(e).__name__}: {e})") from None


def check_strength(strength: float | None, has_init: bool) -> None:
    if strength is None:
        return
    if not has_init:
        raise DifftuneError("--strength needs --init-image (how far to move away from that image)")
    if not 0.0 <= strength <= 1.0:
        raise DifftuneError(f"--strength {strength}: must be between 0 (keep the init image) and 1 (ignore it)")


def fit(image: Any, width: int, height: int) -> Any:
    """`image` resized to `width` x `height` (no-op when it already is)."""
    from PIL import Image

    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
