"""One training image as the data layer hands it on (folders and Hugging Face datasets both make these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One training image. `caption` is None when the image has none of its own; `size` is the
    upright ``(width, height)`` once the image has been checked; `origin` says where the image came
    from when its path does not (a row of a Hugging Face dataset)."""

    path: str
    caption: str | None
    concept: int
    size: tuple[int, int] | None = None
    origin: str | None = None
