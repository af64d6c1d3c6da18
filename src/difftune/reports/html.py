"""Small pieces of self-contained HTML: escaped text, tables, and images embedded as data URIs.

Pages are one file each: every picture (PNG thumbnails, samples, SVG plots) is inlined, so a report
can be mailed, attached to an issue or opened from a synced folder without its run folder.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;
color:#1d2228;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2rem}
.muted{color:#57606a}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.25rem .5rem;
vertical-align:top;text-align:left}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{background:#dafbe1;font-weight:600}pre{background:#f6f8fa;padding:.6rem;overflow:auto;font-size:.85rem}
.thumbs{display:flex;flex-wrap:wrap;gap:.6rem}.thumbs figure{margin:0;width:140px;font-size:.75rem}
.thumbs img{width:140px;height:140px;object-fit:cover;border:1px solid #d0d7de}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots img{max-width:100%}
table.grid td.prompt{max-width:16rem;font-size:.85rem}table.grid img{display:block;width:128px;height:128px;
image-rendering:pixelated}code{background:#f6f8fa;padding:0 .2rem}
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(src: str, alt: str, **attrs: object) -> str:
    extra = "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())
    return f'<img src="{src}" alt="{esc(alt)}"{extra}>'


def image_uri(path: str | Path, max_side: int = 256) -> str | None:
    """A PNG data URI of the image at `path`, scaled down to `max_side`; None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", optimize=True)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return data_uri(buffer.getvalue(), "image/png")


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table whose cells are already HTML (escape text with `esc`); a cell may be ``(html, css_class)``."""
    def cell(c) -> str:
        if isinstance(c, tuple):
            return f'<td class="{c[1]}">{c[0]}</td>'
        return f"<td>{c}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_block(text: str) -> str:
    """The little Markdown that report.md's usage section holds: fenced code, inline code, paragraphs."""
    import re

    out, code, para = [], None, []

    def inline(t: str) -> str:
        return re.sub(r"`([^`]+)`", lambda m: f"<code>{m.group(1)}</code>", esc(t))

    def flush() -> None:
        if para:
            out.append("<p>" + inline(" ".join(para)) + "</p>")
            para.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            if code is None:
                flush()
                code = []
            else:
                out.append("<pre>" + esc("\n".join(code)) + "</pre>")
                code = None
        elif code is not None:
            code.append(line)
        elif not line.strip():
            flush()
        elif line.lstrip().startswith(("- ", "* ")):  # a list item: a paragraph of its own
            flush()
            para.append(line.lstrip()[2:].strip())
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)
