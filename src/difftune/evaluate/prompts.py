"""Which prompts an evaluation uses: per concept (with its trigger) and neutral (without any).

Defaults come from the run: a concept's prompts are its training prompts, or, when they are world
captions, world captions with the same style or place on colours and shapes it was not trained on;
neutral prompts are world captions without a style (world runs) or `GENERIC_NEUTRAL`.

A prompts file (``--prompts FILE``, ``validation.eval_prompts``) is YAML or JSON::

    concepts:                      # concept name -> prompts with its trigger
      stalenhag: ["a farm in sksartist style", "a city street in sksartist style"]
    neutral: ["a photo of a dog", "a bowl of fruit"]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from .. import DifftuneError

#: trigger-free prompts for models other than the world models
GENERIC_NEUTRAL = (
    "a photo of a dog on a lawn", "a bowl of fruit on a wooden table", "a city street at night",
    "a portrait of an old man", "a mountain lake at sunrise", "a red car parked by a house",
)


@dataclass
class EvalPrompts:
    """``concepts``: name -> prompts carrying the concept's trigger; ``neutral``: prompts without any."""

    concepts: dict[str, list[str]] = field(default_factory=dict)
    neutral: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [p for ps in self.concepts.values() for p in ps] + list(self.neutral)


def concept_name(concept, index: int) -> str:
    """A concept's name in tables: its folder's or dataset's last path part (index added if repeated)."""
    source = concept.dir or concept.hf or f"concept{index}"
    return Path(str(source).rstrip("/")).name or f"concept{index}"


def load_prompts(path: str | Path) -> EvalPrompts:
    """Read a prompts file (format above); a malformed one is one clear error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise DifftuneError(f"prompts file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DifftuneError(f"{p}: not valid YAML/JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"concepts", "neutral"}:
        raise DifftuneError(f"{p}: expected a mapping with `concepts` (name -> list of prompts) and `neutral` (list)")
    concepts = data.get("concepts") or {}
    neutral = data.get("neutral") or []
    if not isinstance(concepts, dict) or not all(isinstance(v, list) and v for v in concepts.values()):
        raise DifftuneError(f"{p}: `concepts` must map each concept name to a non-empty list of prompts")
    if not isinstance(neutral, list):
        raise DifftuneError(f"{p}: `neutral` must be a list of prompts")
    return EvalPrompts({str(k): [str(x) for x in v] for k, v in concepts.items()}, [str(x) for x in neutral])


def _world_variants(trained: list[str], n: int, seed: int) -> list[str] | None:
    """World captions asking for the same style or place as `trained`, on unseen colours, shapes and
    backgrounds; None when `trained` are not world captions of one held-out style or place."""
    from ..world import scenes

    try:
        wants = [scenes.parse_caption(p) for p in trained]
    except ValueError:
        return None
    places = {w["place"] for w in wants if w["place"]}
    styles = {w["style"] for w in wants if w["style"]}
    rng = random.Random(seed)
    if places and not styles and len(places) == 1:
        place = places.pop()
        seen = {w["background"] for w in wants}
        grounds = scenes.place_grounds(place)
        # unseen grounds first, then the trained ones: distinct prompts (a repeated prompt would only
        # draw the same images again), so a place may get fewer than `n`
        grounds = [c for c in grounds if c not in seen] + [c for c in grounds if c in seen]
        return [scenes.place_prompt(place, g) for g in grounds[:n]]
    if styles and len(styles) == 1 and not places:
        style = styles.pop()
        seen = {(w["colour"], w["shape"], w["background"]) for w in wants}
        triples = [t for t in scenes.all_triples() if t not in seen]
        rng.shuffle(triples)
        chosen, used = [], set()
        for i in range(n):
            t = next(t for t in triples if t[1] == scenes.SHAPES[i % 3] and t not in used)
            used.add(t)
            chosen.append(t)
        return [scenes.prompt(*t, style=style) for t in chosen]
    return None


def world_neutral(n: int, seed: int = 16) -> list[str]:
    """Plain world captions (no style, no place) on triples the base never saw in pretraining."""
    from ..world import scenes

    triples = scenes.unseen_triples()
    random.Random(seed).shuffle(triples)
    return [scenes.prompt(*t) for t in triples[:n]]


def default_prompts(concepts: dict[str, list[str]], n: int = 4) -> EvalPrompts:
    """Prompts for concepts whose training prompts are given (name -> prompts), `n` per concept."""
    out = EvalPrompts()
    world = bool(concepts)
    for i, (name, trained) in enumerate(concepts.items()):
        variants = _world_variants(trained, n, seed=i)
        if variants is None:
            world = False
            distinct = sorted(set(trained))
            variants = [distinct[j % len(distinct)] for j in range(min(n, len(distinct)))]
        out.concepts[name] = variants
    out.neutral = world_neutral(n) if world else list(GENERIC_NEUTRAL[:n])
    return out
