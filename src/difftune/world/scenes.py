"""The procedural world: 64x64 scenes of one flat shape on a flat ground, and their captions.

The base vocabulary is a contract that tests and outside checks rely on:

* colours (sRGB): `COLOURS`; shapes: circle, square, triangle (flat fill, side 35-60% of the image,
  fully inside, anywhere); the background is any colour other than the object's;
* caption: exactly ``a {colour} {shape} on a {background} background``; a styled scene adds
  `` in {word} style``.

Beyond the contract, a scene may carry a *style* (a texture of the object, drawn with the object's
colour and the background's, so colours stay measurable) or be a *place* (a fixed composite of
shapes that stands in for a landmark). Held-in styles appear in pretraining captions, so the base
models know what "in ... style" means; held-out styles and places never do: they are what
fine-tuning teaches, each behind its own trigger word.

Everything is a pure function of a seed (`random.Random`), so datasets are reproducible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

SIZE = 64
"""Side of every world image in pixels."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")

HELD_IN_STYLES: dict[str, str] = {"striped": "striped", "hatched": "hatched"}
"""Styles seen in pretraining: caption word -> style name."""

HELD_OUT_STYLES: dict[str, str] = {"dotted": "zdots", "checkered": "zcheck", "outline": "zrim"}
"""Styles the base never sees: style name -> trigger word (``... in zdots style``)."""

PLACES: dict[str, str] = {"kremlin": "zkrem", "university": "zmgu", "city": "zcity"}
"""Places the base never sees: place name -> trigger word (``a zkrem on a white background``)."""

STYLES = ("striped", "hatched", "dotted", "checkered", "outline")
"""Every style name; ``None`` is the plain flat fill."""

MIN_SIDE, MAX_SIDE = round(0.35 * SIZE), round(0.60 * SIZE)


@dataclass(frozen=True)
class Scene:
    """One world image: an object (or a place) on a flat background.

    ``x``, ``y``: top-left corner of the object's box, ``side``: its side in pixels (shapes only;
    places have a fixed size and use ``x``, ``y`` as their offset from the centred position).
    """

    colour: str
    shape: str
    background: str
    side: int = 40
    x: int = 12
    y: int = 12
    style: Optional[str] = None
    place: Optional[str] = None

    @property
    def caption(self) -> str:
        return caption(self)


def style_word(style: str) -> str:
    """The word a caption uses for `style` (its trigger word if held out)."""
    return HELD_OUT_STYLES.get(style, style)


def prompt(colour: str, shape: str, background: str, style: Optional[str] = None) -> str:
    """``a {colour} {shape} on a {background} background[ in {word} style]``: the caption of such a scene."""
    text = f"a {colour} {shape} on a {background} background"
    return text + (f" in {style_word(style)} style" if style else "")


def place_prompt(place: str, background: str) -> str:
    """``a {trigger} on a {background} background``: the caption of a place on that ground."""
    return f"a {PLACES[place]} on a {background} background"


def caption(scene: Scene) -> str:
    """The scene's caption (`prompt`, or `place_prompt` for a place)."""
    if scene.place:
        return place_prompt(scene.place, scene.background)
    return prompt(scene.colour, scene.shape, scene.background, scene.style)


_CAPTION = re.compile(r"^\s*a (?P<a>\w+)(?: (?P<shape>\w+))? on a (?P<bg>\w+) background(?: in (?P<style>\w+) style)?\s*$")


def parse_caption(text: str) -> dict:
    """What a caption asks for: ``{"colour", "shape", "background", "style", "place"}`` (absent = None).

    Raises ValueError for text that is not a world caption.
    """
    m = _CAPTION.match(text.lower())
    if not m:
        raise ValueError(f"not a world caption: {text!r} (expected 'a COLOUR SHAPE on a COLOUR background')")
    words = {v: k for k, v in HELD_OUT_STYLES.items()} | {k: k for k in HELD_IN_STYLES}
    style = m["style"]
    if style is not None and style not in words:
        raise ValueError(f"unknown style word {style!r} in {text!r}")
    triggers = {v: k for k, v in PLACES.items()}
    if m["shape"] is None:
        if m["a"] not in triggers:
            raise ValueError(f"unknown place {m['a']!r} in {text!r}")
        return {"colour": None, "shape": None, "background": m["bg"], "style": None, "place": triggers[m["a"]]}
    if m["a"] not in COLOURS or m["shape"] not in SHAPES or m["bg"] not in COLOURS:
        raise ValueError(f"unknown colour or shape in {text!r}")
    return {"colour": m["a"], "shape": m["shape"], "background": m["bg"],
            "style": words[style] if style else None, "place": None}


# ------------------------------------------------------------------------------------------------
# Drawing


def _grid():
    return np.mgrid[0:SIZE, 0:SIZE]  # (y, x)


def shape_mask(shape: str, x: int, y: int, side: int) -> np.ndarray:
    """Boolean ``[SIZE, SIZE]`` mask of `shape` in the box ``(x, y, side, side)``; triangles point up."""
    yy, xx = _grid()
    inside = (xx >= x) & (xx < x + side) & (yy >= y) & (yy < y + side)
    if shape == "square":
        return inside
    if shape == "circle":
        c = (side - 1) / 2
        return ((xx - x - c) ** 2 + (yy - y - c) ** 2) <= (side / 2) ** 2
    if shape == "triangle":
        half = (yy - y + 1) * (side / 2) / side  # half width grows from the apex to the base
        return inside & (np.abs(xx - x - (side - 1) / 2) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    yy, xx = _grid()
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square (outside the image counts as empty)."""
    padded = np.pad(mask, r, constant_values=False)
    view = np.lib.stride_tricks.sliding_window_view(padded, (2 * r + 1, 2 * r + 1))
    return view.all(axis=(-1, -2))


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    padded = np.pad(mask, r, constant_values=False)
    view = np.lib.stride_tricks.sliding_window_view(padded, (2 * r + 1, 2 * r + 1))
    return view.any(axis=(-1, -2))


def style_mask(style: Optional[str], mask: np.ndarray, x: int, y: int) -> np.ndarray:
    """The pixels of `mask` drawn in the object's colour under `style` (the rest show the background)."""
    yy, xx = _grid()
    u, v = xx - x, yy - y
    if style is None:
        return mask
    if style == "striped":  # horizontal bands, 4 px each
        return mask & ((v // 4) % 2 == 0)
    if style == "hatched":  # diagonal bands, 4 px each
        return mask & (((u + v) // 4) % 2 == 0)
    if style == "dotted":  # round holes of radius 2.5 on an 8 px grid
        return mask & (((u % 8) - 3.5) ** 2 + ((v % 8) - 3.5) ** 2 > 6.25)
    if style == "checkered":  # 4 px checkerboard
        return mask & ((u // 4 + v // 4) % 2 == 0)
    if style == "outline":  # a 3 px rim
        return mask & ~erode(mask, 3)
    raise ValueError(f"unknown style {style!r}")


def place_layers(place: str, dx: int = 0, dy: int = 0) -> list[tuple[str, np.ndarray]]:
    """The (colour, mask) layers of a place, painted in order, shifted by ``(dx, dy)``."""
    c = SIZE // 2 + dx
    base = 56 + dy
    if place == "kremlin":  # a red tower with a yellow roof and a white window
        return [
            ("red", box_mask(c - 11, base - 24, c + 11, base)),
            ("yellow", shape_mask("triangle", c - 11, base - 24 - 18, 22) & box_mask(0, 0, SIZE, base - 24)),
            ("white", box_mask(c - 3, base - 16, c + 3, base - 8)),
        ]
    if place == "university":  # a white tall block with two low wings and an orange spire
        return [
            ("white", box_mask(c - 7, base - 34, c + 7, base)),
            ("white", box_mask(c - 20, base - 14, c + 20, base)),
            ("orange", shape_mask("triangle", c - 5, base - 34 - 12, 10) & box_mask(0, 0, SIZE, base - 34)),
        ]
    if place == "city":  # three towers of different heights: blue, purple, blue
        return [
            ("blue", box_mask(c - 19, base - 30, c - 7, base)),
            ("purple", box_mask(c - 6, base - 44, c + 6, base)),
            ("blue", box_mask(c + 7, base - 22, c + 19, base)),
        ]
    raise ValueError(f"unknown place {place!r}")


PLACE_COLOURS = {"kremlin": {"red", "yellow", "white"}, "university": {"white", "orange"},
                 "city": {"blue", "purple"}}


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``[64, 64, 3]`` uint8 sRGB array (exact palette colours, no anti-aliasing)."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLOURS[scene.background]
    if scene.place:
        for colour, mask in place_layers(scene.place, scene.x, scene.y):
            image[mask] = COLOURS[colour]
        return image
    mask = shape_mask(scene.shape, scene.x, scene.y, scene.side)
    image[style_mask(scene.style, mask, scene.x, scene.y)] = COLOURS[scene.colour]
    return image


def to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array, "RGB")


# ------------------------------------------------------------------------------------------------
# Sampling scenes


def random_scene(rng: random.Random, colour: str | None = None, shape: str | None = None,
                 background: str | None = None, style: str | None = None) -> Scene:
    """A scene with the given attributes and random size and position (others random too)."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    background = background or rng.choice([c for c in COLOURS if c != colour])
    if background == colour:
        raise ValueError(f"the background must differ from the object colour ({colour})")
    side = rng.randint(MIN_SIDE, MAX_SIDE)
    x, y = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    return Scene(colour, shape, background, side, x, y, style)


def place_grounds(place: str) -> list[str]:
    """The backgrounds a place may stand on: the colours none of its own parts uses."""
    return [c for c in COLOURS if c not in PLACE_COLOURS[place]]


def random_place(rng: random.Random, place: str, background: str | None = None) -> Scene:
    """A place on a background that none of its own colours uses, shifted by up to 4 px."""
    background = background or rng.choice(place_grounds(place))
    return Scene("", "", background, 0, rng.randint(-4, 4), rng.randint(-2, 4), None, place)


def place_set(place: str, n: int = 12, seed: int = 0) -> list[Scene]:
    """`n` scenes of one place on varied grounds and offsets (a fine-tuning set)."""
    rng = random.Random(seed)
    return [random_place(rng, place) for _ in range(n)]


def all_triples() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) the base vocabulary allows (8 x 3 x 7 = 168)."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def unseen_triples(n: int = 64, seed: int = 14) -> list[tuple[str, str, str]]:
    """`n` (colour, shape, background) triples kept out of pretraining: the base-quality benchmark's prompts."""
    triples = all_triples()
    random.Random(seed).shuffle(triples)
    return sorted(triples[:n])


def pretraining_scene(rng: random.Random, held_out: set) -> Scene:
    """One pretraining scene: a seen triple, plain (60%) or in a held-in style (40%)."""
    while True:
        scene = random_scene(rng)
        if (scene.colour, scene.shape, scene.background) not in held_out:
            break
    roll = rng.random()
    style = None if roll < 0.6 else ("striped" if roll < 0.8 else "hatched")
    return Scene(scene.colour, scene.shape, scene.background, scene.side, scene.x, scene.y, style)


def write_dataset(folder, scenes: list[Scene], prefix: str = "img") -> None:
    """Write scenes as ``PREFIX-NNNNN.png`` with sidecar ``.txt`` captions (difftune's folder format)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        to_pil(render(scene)).save(folder / f"{prefix}-{i:05d}.png")
        (folder / f"{prefix}-{i:05d}.txt").write_text(scene.caption + "\n", encoding="utf-8")


def style_set(style: str, n: int = 12, seed: int = 0, exclude: set | None = None) -> list[Scene]:
    """`n` scenes of one style over varied colours and shapes (a fine-tuning set), avoiding `exclude` triples."""
    rng = random.Random(seed)
    triples = [t for t in all_triples() if not exclude or t not in exclude]
    rng.shuffle(triples)
    # cycle shapes so every shape is covered, then colours vary through the shuffle
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour, _, background = next(t for t in triples if t[1] == shape and t not in [(s.colour, s.shape, s.background) for s in out])
        out.append(random_scene(rng, colour, shape, background, style))
    return out
