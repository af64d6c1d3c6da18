"""`difftune train` and `difftune config`: thin argument handling around config.py and train.py."""

from __future__ import annotations

import argparse

from .data.check import EXAMPLES as DATA_EXAMPLES  # noqa: F401 (the `data` command's help)
from .data.check import add_arguments as add_data_arguments  # noqa: F401

TRAIN_EXAMPLES = """examples:
  difftune train configs/sd15-lora.yaml
  difftune train configs/sd15-lora.yaml train.lr=5e-5 train.steps=2000 output_dir=runs/dog-v2
  accelerate launch -m difftune train configs/flux-dev-lora.yaml        # several GPUs

A rerun with the same output_dir continues from its newest complete checkpoint.
Exit codes: 0 done, 2 bad input, 75 stopped by SIGTERM/SIGINT after saving a checkpoint.
"""

CONFIG_EXAMPLES = """examples:
  difftune config reference            # every key, type, default and meaning (Markdown)
  difftune config check configs/sd15-lora.yaml model.path=runs/tiny-sd
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    train(load_config(args.config, args.overrides))
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["reference", "check"])
    parser.add_argument("config", nargs="?", help="YAML config file (for check)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")


def run_config(args: argparse.Namespace) -> int:
    from . import DifftuneError
    from .config import load_config, reference_markdown, validate

    if args.action == "reference":
        print(reference_markdown())
        return 0
    if not args.config:
        raise DifftuneError("config check needs a config file")
    cfg = load_config(args.config, args.overrides)
    validate(cfg, resolution_multiple=local_resolution_multiple(cfg.model))
    print(f"{args.config}: ok")
    return 0


def local_resolution_multiple(model) -> int | None:
    """The side multiple of a config's model when it is a local folder (no download), else None."""
    from pathlib import Path

    if not (model.path and Path(model.path).is_dir()):
        return None
    from .families.registry import resolve_family

    return resolve_family(model.path, model.family).resolution_multiple(model.path)


def run_data(args: argparse.Namespace) -> int:
    """`difftune data check`: data/check.py, told the model's side multiple by the family registry."""
    from .data.check import run

    return run(args, local_resolution_multiple)
