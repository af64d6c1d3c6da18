"""Sweep plans: parse ``--grid key=v1,v2``, check every value against the config schema, name the runs.

Everything here runs before the first run starts, so a typo in a key or a value of the wrong type
costs nothing: `plan` raises a DifftuneError naming the ``--grid`` argument.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from .. import DifftuneError
from ..config import ConfigError, load_config, validate


@dataclass
class Axis:
    key: str
    values: list[str]  # as written on the command line; each is read as YAML like an override


@dataclass
class PlannedRun:
    name: str
    overrides: list[str]  # the grid's `key=value` pairs for this run (after the sweep's own overrides)
    steps: int  # train.steps of this run: it is finished once its weights stand for that many

    def as_dict(self, root: Path) -> dict:
        return {"name": self.name, "dir": str(root / self.name), "overrides": self.overrides}


def parse_grid(texts: list[str]) -> list[Axis]:
    """``["method.rank=4,16", "train.lr=1e-4,5e-5"]`` -> axes; a key given twice is an error."""
    axes: list[Axis] = []
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        if not sep or not key or not raw.strip() or any(not v for v in values):
            raise DifftuneError(f"--grid {text!r}: expected key.path=value1,value2,... (no empty values)")
        if key == "output_dir":
            raise DifftuneError("--grid output_dir: each run's output_dir is chosen by the sweep (use --out)")
        if any(a.key == key for a in axes):
            raise DifftuneError(f"--grid {key}: given twice; list all its values in one --grid")
        axes.append(Axis(key, values))
    if not axes:
        raise DifftuneError("give at least one --grid key=value1,value2")
    return axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def run_name(pairs: list[tuple[str, str]]) -> str:
    """A folder name from the grid values, e.g. ``rank-4_lr-1e-4``. The key's last part is used,
    or the whole key where two keys end the same."""
    lasts = [k.split(".")[-1] for k, _ in pairs]
    return "_".join(f"{_slug(k if lasts.count(k.split('.')[-1]) > 1 else k.split('.')[-1])}-{_slug(v)}"
                    for k, v in pairs)


def combinations(axes: list[Axis], zipped: bool) -> list[list[tuple[str, str]]]:
    if zipped:
        lengths = {len(a.values) for a in axes}
        if len(lengths) > 1:
            raise DifftuneError("--zip needs the same number of values in every --grid ("
                                + ", ".join(f"{a.key}: {len(a.values)}" for a in axes) + ")")
        return [list(zip([a.key for a in axes], values)) for values in zip(*(a.values for a in axes))]
    return [list(zip([a.key for a in axes], values)) for values in itertools.product(*(a.values for a in axes))]


def plan(config: str | Path, overrides: list[str], axes: list[Axis], zipped: bool, root: Path) -> list[PlannedRun]:
    """Every run of the sweep, each checked as a whole config (keys, types, cross-field rules)."""
    for axis in axes:  # one value at a time first, so the message names the --grid value at fault
        for value in axis.values:
            try:
                load_config(config, [*overrides, f"{axis.key}={value}"])
            except ConfigError as e:
                raise DifftuneError(f"--grid {axis.key}={value}: {e}") from None
    runs = []
    for pairs in combinations(axes, zipped):
        name = run_name(pairs)
        grid = [f"{k}={v}" for k, v in pairs]
        try:
            cfg = load_config(config, [*overrides, *grid, f"output_dir={root / name}"])
            validate(cfg)
        except ConfigError as e:
            raise DifftuneError(f"run {name} ({', '.join(grid)}): {e}") from None
        runs.append(PlannedRun(name, grid, cfg.train.steps))
    if len({r.name for r in runs}) != len(runs):
        raise DifftuneError("two runs of the sweep would share a folder: give each --grid value a distinct spelling")
    return runs
