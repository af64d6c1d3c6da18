"""The oracle: what a world image shows, measured from its pixels alone.

`analyse(image)` returns the background colour, the object's colour and shape, its style (or None)
and the place it shows (or None). `score(image, prompt)` compares that with what a caption asks for.

How: every pixel is given the nearest palette colour; the background is the commonest colour of
the image border; the object is every pixel of another colour. Its silhouette is the object closed
by 3 px and with holes filled (so dotted, striped, checkered and outlined objects become solid), and
only its largest connected part counts (stray specks elsewhere do not stretch it). The shape is the
template (circle, square, up-pointing triangle fitted to the silhouette's box) with the highest
overlap. The style is the nearest style prototype in a small texture-feature space (how much of the
silhouette shows the background, inside and near the rim, how often the object changes along rows,
columns and both diagonals, and how much of the background showing through lies in small isolated
holes); the prototypes are measured once on rendered scenes. A style made of isolated holes (dotted,
checkered) is only called when the object really has them: at least 4 holes no wider than 7 px,
holding at least 70% of what shows through. Broken stripes otherwise read as dots.

A place is recognised from the parts of its own drawing (`scenes.place_layers`), stretched onto the
silhouette's box: the outlines must overlap (intersection over union >= 0.6), at least two of the
place's colours must each cover at least half the share of the object that they cover in the
drawing, the place's colours must cover at least half the object, and the background must not be
one of the place's colours (no world scene puts a place on them). This tolerates what a model's
drawing of a place gets roughly right (proportions, shading, a roof of the wrong shade) while no
single flat object, plain or styled, can pass.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import scenes
from .scenes import COLOURS, SHAPES, SIZE

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
PLACE_OUTLINE_IOU = 0.6
PLACE_MIN_COLOURS = 2
HOLE_STYLES = ("dotted", "checkered")  # styles of isolated holes: see _style


def load(image: Any) -> np.ndarray:
    """An image path, PIL image or array -> ``[64, 64, 3]`` float32 array (resized if needed)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.BILINEAR)
        image = np.asarray(image)
    return np.asarray(image, dtype=np.float32)


def labels(array: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel, ``[64, 64]``."""
    d = ((array[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every empty region not connected to the image border (PIL's flood fill)."""
    from PIL import Image, ImageDraw

    padded = np.pad(mask, 1).astype(np.uint8) * 255  # a free frame connects the whole border
    image = Image.fromarray(padded, "L").copy()
    ImageDraw.floodfill(image, (0, 0), 128)
    return (np.asarray(image) != 128)[1:-1, 1:-1]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """Drop specks: keep pixels with at least 3 object neighbours in their 3x3 window."""
    padded = np.pad(mask, 1).astype(np.int32)
    view = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).sum(axis=(-1, -2))
    return mask & (view >= 4)


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected parts of `mask`: each pixel's part id (the smallest pixel index in it; -1 outside)."""
    big = mask.size
    lab = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:  # spread the smallest index through each part
        padded = np.pad(lab, 1, constant_values=big)
        low = np.minimum.reduce([lab, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        low = np.where(mask, low, big)
        if (low == lab).all():
            return np.where(mask, lab, -1)
        lab = low


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    parts = _components(mask)
    ids, counts = np.unique(parts[mask], return_counts=True)
    return parts == ids[counts.argmax()]


def _isolated_holes(obj: np.ndarray, silhouette: np.ndarray) -> tuple[float, int]:
    """(share of the background showing through the object that lies in holes at most 7 px across,
    how many such holes)."""
    holes = silhouette & ~obj
    if not holes.any():
        return 0.0, 0
    parts = _components(holes)
    rows, cols = np.nonzero(holes)
    ids = parts[rows, cols]
    small, count = 0, 0
    for i in np.unique(ids):
        r, c = rows[ids == i], cols[ids == i]
        if np.ptp(r) <= 6 and np.ptp(c) <= 6:
            small, count = small + len(r), count + 1
    return small / len(rows), count


def _box(mask: np.ndarray) -> Optional[tuple[int, int, int, int]]:
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _shape(silhouette: np.ndarray) -> Optional[str]:
    box = _box(silhouette)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    side_w, side_h = x1 - x0, y1 - y0
    best, best_iou = None, -1.0
    for shape in SHAPES:
        # the templates are drawn square; stretch the silhouette's box by drawing at its size
        side = max(side_w, side_h)
        template = scenes.shape_mask(shape, x0 - (side - side_w) // 2, y0 - (side - side_h) // 2, side)
        iou = (template & silhouette).sum() / max(1, (template | silhouette).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _texture_features(obj: np.ndarray, silhouette: np.ndarray) -> tuple[np.ndarray, int]:
    """The style features, and how many isolated holes the object has."""
    n = max(1, silhouette.sum())
    hole = 1 - (obj & silhouette).sum() / n
    inner = scenes.erode(silhouette, 4)
    rim = silhouette & ~inner
    hole_inner = 1 - (obj & inner).sum() / max(1, inner.sum()) if inner.any() else hole
    hole_rim = 1 - (obj & rim).sum() / max(1, rim.sum())

    def changes(a, b, both):
        return ((a != b) & both).sum() / max(1, both.sum())

    o, s = obj, silhouette
    h = changes(o[:, 1:], o[:, :-1], s[:, 1:] & s[:, :-1])
    v = changes(o[1:, :], o[:-1, :], s[1:, :] & s[:-1, :])
    d = changes(o[1:, 1:], o[:-1, :-1], s[1:, 1:] & s[:-1, :-1])
    a = changes(o[1:, :-1], o[:-1, 1:], s[1:, :-1] & s[:-1, 1:])
    isolated, count = _isolated_holes(obj, silhouette)
    return np.array([hole, hole_inner, hole_rim, h, v, d, a, isolated], dtype=np.float64), count


def _parts(array: np.ndarray):
    lab = labels(array)
    border = np.concatenate([lab[:2].ravel(), lab[-2:].ravel(), lab[:, :2].ravel(), lab[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    obj = _largest_blob(lab != bg)
    silhouette = _largest_component(fill_holes(scenes.erode(scenes.dilate(obj, 3), 3) | obj))
    obj &= silhouette
    return lab, bg, obj, silhouette


@functools.lru_cache(maxsize=1)
def _style_prototypes() -> tuple[list, np.ndarray, np.ndarray]:
    """Mean texture features of rendered scenes per style (None = plain), and the pooled spread."""
    rng = random.Random(1234)
    names: list = [None, *scenes.STYLES]
    feats = {name: [] for name in names}
    for name in names:
        for _ in range(40):
            scene = scenes.random_scene(rng, style=name)
            _, _, obj, sil = _parts(scenes.render(scene).astype(np.float32))
            feats[name].append(_texture_features(obj, sil)[0])
    means = np.stack([np.mean(feats[n], 0) for n in names])
    spread = np.concatenate([np.asarray(feats[n]) - means[i] for i, n in enumerate(names)]).std(0) + 0.02
    return names, means, spread


def _style(obj: np.ndarray, silhouette: np.ndarray) -> Optional[str]:
    if not silhouette.any():
        return None
    names, means, spread = _style_prototypes()
    f, holes = _texture_features(obj, silhouette)
    isolated = f[-1]
    for i in (((f - means) / spread) ** 2).sum(1).argsort():
        if names[i] in HOLE_STYLES and (isolated < 0.7 or holes < 4):
            continue  # no isolated holes: not a style made of them, however near its prototype
        return names[int(i)]
    return None


@functools.lru_cache(maxsize=None)
def _place_drawing(place: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """The place's drawing cropped to its box (palette indices, -1 = ground) and its colours."""
    drawing = np.full((SIZE, SIZE), -1)
    for colour, mask in scenes.place_layers(place):
        drawing[mask] = _NAMES.index(colour)
    x0, y0, x1, y1 = _box(drawing >= 0)
    return drawing[y0:y1, x0:x1], tuple(sorted(set(drawing[drawing >= 0].tolist())))


def _place(lab: np.ndarray, bg: int, silhouette: np.ndarray) -> tuple[Optional[str], float]:
    """The place the object shows (or None) and the best outline overlap among places that pass."""
    box = _box(silhouette)
    if box is None:
        return None, 0.0
    x0, y0, x1, y1 = box
    best, best_iou = None, 0.0
    for place in scenes.PLACES:
        if _NAMES[bg] in scenes.PLACE_COLOURS[place]:
            continue
        crop, colours = _place_drawing(place)
        rows = (np.arange(y1 - y0) * crop.shape[0] // (y1 - y0))
        cols = (np.arange(x1 - x0) * crop.shape[1] // (x1 - x0))
        ref = np.full((SIZE, SIZE), -1)
        ref[y0:y1, x0:x1] = crop[rows][:, cols]  # the drawing stretched onto the object's box
        iou = ((ref >= 0) & silhouette).sum() / max(1, ((ref >= 0) | silhouette).sum())
        own = np.isin(lab, colours) & silhouette
        if not silhouette.any() or own.sum() < 0.5 * silhouette.sum():  # nothing, or mostly other colours
            continue
        shown = sum(((lab == c) & silhouette).sum() / silhouette.sum() >= 0.5 * (ref == c).sum() / (ref >= 0).sum()
                    for c in colours)
        if iou >= PLACE_OUTLINE_IOU and shown >= PLACE_MIN_COLOURS and iou > best_iou:
            best, best_iou = place, float(iou)
    return best, best_iou


def analyse(image: Any) -> dict:
    """What the image shows: ``background``, ``colour``, ``shape``, ``style`` and ``place`` (names or None)."""
    array = load(image)
    lab, bg, obj, silhouette = _parts(array)
    colour = None
    if obj.any():
        counts = np.bincount(lab[obj], minlength=len(_NAMES))
        counts[bg] = 0
        colour = _NAMES[int(counts.argmax())]
    place, _ = _place(lab, bg, silhouette)
    return {
        "background": _NAMES[bg],
        "colour": colour,
        "shape": _shape(silhouette),
        "style": _style(obj, silhouette),
        "place": place,
    }


def score(image: Any, prompt: str) -> dict:
    """Compare an image with its world caption: for each thing the prompt asks for, True if the image shows it.

    Keys: ``background`` and, for object prompts, ``colour``, ``shape`` and ``style`` (the asked style, or
    plain when none is asked); for place prompts, ``place``. Plus ``seen``: what `analyse` found.
    """
    want = scenes.parse_caption(prompt)
    seen = analyse(image)
    result: dict = {"background": seen["background"] == want["background"]}
    if want["place"]:
        result["place"] = seen["place"] == want["place"]
    else:
        result.update(colour=seen["colour"] == want["colour"], shape=seen["shape"] == want["shape"],
                      style=seen["style"] == want["style"])
    result["seen"] = seen
    return result


def summarise(results: list[dict]) -> dict[str, float]:
    """Fraction right per key over many `score` results (keys that some results lack count where present)."""
    keys = sorted({k for r in results for k in r if k != "seen"})
    return {k: sum(bool(r[k]) for r in results if k in r) / max(1, sum(k in r for r in results)) for k in keys}
