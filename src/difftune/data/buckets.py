"""Aspect-ratio buckets: training shapes that keep an image's aspect within a pixel budget.

With ``data.buckets: true`` every image is trained at the bucket whose aspect ratio is nearest to
its own, instead of being cropped to a square. A bucket is a ``(width, height)`` pair with

- ``width * height <= resolution ** 2`` (the same pixel budget, so the same memory, as the square),
- both sides multiples of the model's resolution multiple (VAE downsampling times any packing),
- aspect ratios from a fixed ladder (1:1, 5:4, 4:3, 3:2, 16:9, 2:1 and their portrait twins).

The square ``(resolution, resolution)`` is always a bucket. Without buckets, the square is the
only one, so both modes share the same resize-and-crop code.
"""

from __future__ import annotations

import math

#: landscape (width, height) aspect ratios of the bucket ladder; each also gives its portrait twin
ASPECT_LADDER = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))


def make_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """The ``(width, height)`` buckets for a ``resolution ** 2`` pixel budget, sides multiples of
    `multiple`, sorted from the widest to the tallest; portrait buckets mirror landscape ones. Sides
    are rounded *down*, so no bucket uses more pixels than the square (which, for a `resolution`
    that is a multiple of `multiple`, is itself a bucket); buckets that rounding makes equal are
    kept once."""
    budget = resolution * resolution
    found: set[tuple[int, int]] = set()
    for rw, rh in ASPECT_LADDER:
        width = max(multiple, math.isqrt(budget * rw // rh) // multiple * multiple)
        height = max(multiple, budget // width // multiple * multiple)
        found |= {(width, height), (height, width)}
    return sorted(found, key=lambda wh: (-wh[0] / wh[1], wh))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to ``size`` = (width, height), measured
    on a log scale so that 2:1 and 1:2 are equally far from 1:1 (ties: the earlier bucket)."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - aspect))


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size an image of ``size`` is resized to so that it covers ``target`` (both (width, height))
    with its aspect kept; the excess on one side is then cropped away."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    return max(tw, round(w * scale)), max(th, round(h * scale))
