"""Output files of `difftune generate`: PNGs that carry their parameters, names that never collide,
one JSON line per image in ``images.jsonl``, and a labelled contact sheet.

File names are ``NNNN-SLUG-seedS.png``: ``NNNN`` counts on from the highest number already in the
folder (so a second run, or a second prompt, into the same folder adds files and never replaces
one; they sort in the order they were made), ``SLUG`` is the start of the prompt, ``S`` the seed.
A name is claimed with a hard link, which fails if the name exists, so two processes writing into
one folder at once cannot take the same name either.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

JSONL = "images.jsonl"
_NUMBERED = re.compile(r"^(\d{4,})-")


def slug(text: str, limit: int = 40) -> str:
    """``"A photo of sks dog, 4k!"`` -> ``a-photo-of-sks-dog-4k`` (lower case ASCII letters, digits, ``-``)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    out = "-".join(words)[:limit].rstrip("-")
    return out or "image"


def next_number(folder: Path) -> int:
    """One more than the highest ``NNNN-`` number of a file in `folder` (0 for a new folder)."""
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


def png_info(params: dict) -> Any:
    """PNG text chunks: ``difftune`` (the parameters as JSON) and ``parameters`` (a one-line summary
    other tools display, prompt first)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("difftune", json.dumps(params, ensure_ascii=False))
    summary = ", ".join(f"{k}: {v}" for k, v in params.items() if k != "prompt")
    info.add_text("parameters", f"{params.get('prompt', '')}\n{summary}")
    return info


def save_image(image: Any, path: Path, params: dict) -> None:
    """Write `image` as PNG with `params` in its text chunks, atomically (temp file, then rename);
    replaces `path` if it exists (training samples: one fixed name per prompt and step)."""
    from ..util.atomic import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(params)))


def save_new_image(image: Any, folder: Path, stem: str, params: dict | None = None, number: int | None = None) -> Path:
    """Write `image` as ``folder/NNNN-{stem}.png`` under the next free number (from `number` on, when
    given: several processes of one run agree on their images' numbers so); never replaces a file.

    `params` go into the PNG text chunks. Returns the path written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{os.getpid()}-{stem}.png.tmp"
    image.save(tmp, format="PNG", pnginfo=png_info(params) if params else None)
    number = next_number(folder) if number is None else number
    try:
        while True:
            path = folder / f"{number:04d}-{stem}.png"
            try:
                os.link(tmp, path)  # fails if the name is taken, even by a concurrent run
                return path
            except FileExistsError:
                number += 1
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    number += 1
                    continue
                os.replace(tmp, path)
                return path
    finally:
        tmp.unlink(missing_ok=True)


def append_record(folder: Path, record: dict) -> None:
    """Append one JSON line to ``folder/images.jsonl`` (one ``write`` of a whole line, flushed to disk)."""
    with open(folder / JSONL, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_params(path: str | Path) -> dict:
    """The ``difftune`` parameters stored in a PNG made by difftune."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["difftune"])


def contact_sheet(images: list[Any], labels: list[str], title: str, columns: int | None = None) -> Any:
    """One image: `title` on top, then `images` in a grid, each with its label underneath."""
    import math

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    line, pad = 14, 4
    sheet = Image.new("RGB", (columns * (w + pad) + pad, line + pad + rows * (h + line + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 1), title[: max(8, sheet.size[0] // 6)], fill="black", font=font)
    for i, (im, label) in enumerate(zip(images, labels)):
        x, y = pad + (i % columns) * (w + pad), line + pad + (i // columns) * (h + line + pad)
        sheet.paste(im.convert("RGB"), (x, y))
        draw.text((x, y + h + 1), label[: max(4, w // 6)], fill="black", font=font)
    return sheet
