"""Everything `difftune train` refuses before it loads a model, in one place.

`difftune train`, `difftune config check` and `difftune data check CONFIG` all call `check_run`, so
a config that the checks pass is one that training accepts (up to what only the loaded model can
tell), and a bad one is refused in seconds, before output_dir is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import DifftuneError
from .config import Config, validate


@dataclass
class Checked:
    """What the checks found: the family class, the resolution multiple, the usable training items."""

    family: Any
    multiple: int
    items: list


def check_steps(cfg: Config, done: int, where: Path | str) -> None:
    """Refuse a run whose `train.steps` is below the step its checkpoint already reached: training
    nothing and writing `train.steps` into config.yaml would make the config lie about the weights."""
    if done > cfg.train.steps:
        raise DifftuneError(
            f"train.steps={cfg.train.steps} but {where} already holds step {done}: nothing would be trained. "
            f"Set train.steps to {done} or more to continue it, choose a new output_dir, or start over in "
            "this one with checkpoint.resume=never"
        )


def finished_step(cfg: Config) -> tuple[int, Path | None]:
    """The step of the checkpoint a run would resume from (0 and None when it would start afresh)."""
    from .checkpoint import list_checkpoints

    mode = cfg.checkpoint.resume
    if mode == "never":
        return 0, None
    if mode != "auto":
        import json

        state = Path(mode) / "state.json"
        try:
            return int(json.loads(state.read_text())["step"]), Path(mode)
        except (OSError, ValueError, KeyError):
            return 0, None  # train reports what is wrong with it
    good, _ = list_checkpoints(cfg.output_dir)
    return (good[-1].step, good[-1].path) if good else (0, None)


def check_run(cfg: Config, log: Callable[[str], None] = print) -> Checked:
    """The config, the model's resolution constraint, the data and the resume point, checked without
    loading a model or writing anything. Raises DifftuneError with one line on the first failing stage."""
    from .data.dataset import build_items
    from .families.registry import resolve_family

    validate(cfg)  # no model needed: required keys, ranges, paths that must exist
    family = resolve_family(cfg.model.path, cfg.model.family, cfg.model.revision)
    multiple = family.resolution_multiple(cfg.model.path, cfg.model.revision)
    validate(cfg, resolution_multiple=multiple)
    family.options_for(cfg)  # the family's model.options, checked before anything loads
    if cfg.train.precision == "fp16":
        import torch

        if not (torch.cuda.is_available() or torch.accelerator.is_available()):
            raise DifftuneError("train.precision=fp16 needs an accelerator (GPU, NPU, ...); use bf16 or no on a CPU")
    items = build_items(cfg.data, log=log)
    done, where = finished_step(cfg)
    check_steps(cfg, done, where)
    return Checked(family, multiple, items)
