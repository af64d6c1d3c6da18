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
  difftune tiny controlnet-sd runs/tiny-cn-sd  # a ControlNet that fits `difftune tiny sd` pipelines
  difftune tiny controlnet-flux runs/tiny-cn-flux
"""

#: the names of tiny ControlNets: ``controlnet-`` + the family folder whose tiny module has ``controlnet()``
CONTROLNET_PREFIX = "controlnet-"


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


def tiny_controlnets() -> list[str]:
    """Names `make_tiny_controlnet` can build: ``controlnet-FOLDER`` for the folders whose tiny module
    has a ``controlnet()`` builder."""
    return [CONTROLNET_PREFIX + name for name in tiny_families() if hasattr(tiny_module(name), "controlnet")]


def _wake_zero_layers(model: Any, std: float = 0.3) -> None:
    """Draw every all-zero weight matrix of `model` at random. ControlNets start with zero output layers
    (so an untrained one changes nothing); a test ControlNet must change the image, as a trained one does."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, std)


def make_tiny_controlnet(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny random ControlNet `name` (``controlnet-sd``, ``controlnet-flux``) to `out_dir`.

    It fits the pipelines `make_tiny` writes for that folder (any seed), loads with the family's
    ControlNet class ``from_pretrained(out_dir)``, and its zero-initialised output layers are drawn at
    random (`_wake_zero_layers`) so that it changes the image.
    """
    import torch

    if name not in tiny_controlnets():
        raise DifftuneError(f"unknown tiny ControlNet {name!r}; choose one of {', '.join(tiny_controlnets())}")
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_module(name.removeprefix(CONTROLNET_PREFIX)).controlnet()
        _wake_zero_layers(model)
        model.save_pretrained(out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``difftune tiny FAMILY OUT_DIR [--seed N]`` to `parser`."""
    parser.add_argument("family", choices=[*tiny_families(), *tiny_controlnets()],
                        help="model family (or tiny ControlNet) to build")
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline(s) to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``difftune tiny``: build the tiny pipeline(s), print where they went, return exit code 0."""
    if args.family.startswith(CONTROLNET_PREFIX):
        out_dir = make_tiny_controlnet(args.family, args.out_dir, seed=args.seed)
        print(f"wrote tiny {args.family} to {out_dir} (for `difftune tiny {args.family.removeprefix(CONTROLNET_PREFIX)}`"
              " pipelines)")
        return 0
    module = tiny_module(args.family)
    print(_write(module, Path(args.out_dir), args.seed, dict(module.KNOBS)))
    resolution = module.RESOLUTION
    print(f"random weights (seed {args.seed}); sample at {resolution}x{resolution} px")
    return 0
