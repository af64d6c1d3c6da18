"""`difftune tiny`: tiny, randomly initialised text-to-image pipelines for offline tests and demos.

Each family folder builds its own (``families/<folder>/tiny.py``: ``RESOLUTION``, ``KNOBS``,
``PIPELINES`` and ``write(out_dir, **knobs)``); this module finds them through the family registry
and never names a family. The pipelines have the *shape conventions* of the real models but at most
about a million parameters per model (a few MB per pipeline on disk), are complete diffusers
pipeline folders (``model_index.json`` plus one sub-folder per component) loadable with
``diffusers.DiffusionPipeline.from_pretrained``, and use the offline tokenizers of
``families/tiny_parts.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from difftune import DifftuneError

from .families.registry import folder_module, folders
from .families.tiny_parts import CLIP_MAX_LENGTH, T5_MAX_LENGTH, clip_tokenizer, t5_tokenizer  # noqa: F401 (public)

EXAMPLES = """examples:
  difftune tiny sd runs/tiny-sd
  difftune tiny flux runs/tiny-flux --seed 1
  difftune tiny kandinsky22 runs/tiny-k22      # writes runs/tiny-k22/prior and runs/tiny-k22/decoder
"""


def tiny_module(name: str) -> Any:
    """The ``tiny`` module of family folder `name` (a clear error for a folder without one)."""
    module = folder_module(name, "tiny") if name in folders() else None
    if module is None:
        raise DifftuneError(f"unknown model family {name!r}; choose one of {', '.join(tiny_families())}")
    return module


def tiny_families() -> list[str]:
    """Names `make_tiny` can build: the family folders that have a tiny builder."""
    return [name for name in folders() if folder_module(name, "tiny") is not None]


def tiny_resolution(name: str) -> int:
    """Image side in pixels the tiny pipelines of folder `name` are meant to be trained and sampled at."""
    return tiny_module(name).RESOLUTION


def tiny_folder(family: str) -> str:
    """The `make_tiny` name (family folder) that builds the pipeline of registry family `family`."""
    from .families.registry import folder_of

    return folder_of(family).rsplit(".", 1)[1]


def tiny_config(root: str | Path, family: str) -> dict[str, str]:
    """Config keys (``model.path`` and any companion pipeline the family needs) that point registry
    family `family` at the tiny pipeline(s) `make_tiny(tiny_folder(family), root)` wrote."""
    module = tiny_module(tiny_folder(family))
    root = Path(root)
    config = {"model.path": str(root / module.PIPELINES[family])}
    config.update({key: str(root / sub) for key, sub in getattr(module, "COMPANIONS", {}).get(family, {}).items()})
    return config


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny randomly initialised pipeline of family folder `family` to `out_dir`; return ``Path(out_dir)``.

    ``family`` is a folder name (``difftune tiny --help`` lists them); ``overrides`` set the folder's
    ``KNOBS`` (e.g. ``prediction_type`` or ``guidance_embeds``). Weights are drawn from
    ``torch.manual_seed(seed)`` in a forked RNG (the caller's global RNG state is untouched), so the same
    seed always writes identical files. Sample at `tiny_resolution` pixels.
    """
    module = tiny_module(family)
    unknown = sorted(set(overrides) - set(module.KNOBS))
    if unknown:
        raise DifftuneError(
            f"unknown override(s) {', '.join(unknown)} for family {family!r}; "
            f"valid: {', '.join(module.KNOBS) or 'none'}"
        )
    out_dir = Path(out_dir)
    _write(module, out_dir, seed, {**module.KNOBS, **overrides})
    return out_dir


def _write(module: Any, out_dir: Path, seed: int, knobs: dict) -> str:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module.write(out_dir, **knobs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``difftune tiny FAMILY OUT_DIR [--seed N]`` to `parser`."""
    parser.add_argument("family", choices=tiny_families(), help="model family to build")
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline(s) to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``difftune tiny``: build the tiny pipeline(s), print where they went, return exit code 0."""
    module = tiny_module(args.family)
    print(_write(module, Path(args.out_dir), args.seed, dict(module.KNOBS)))
    resolution = module.RESOLUTION
    print(f"random weights (seed {args.seed}); sample at {resolution}x{resolution} px")
    return 0
