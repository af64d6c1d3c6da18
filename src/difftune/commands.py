"""`difftune train` and `difftune config`: thin argument handling around config.py and train.py."""

from __future__ import annotations

import argparse

from .data.check import EXAMPLES as DATA_EXAMPLES  # noqa: F401 (the `data` command's help)
from .data.check import add_arguments as add_data_arguments  # noqa: F401

TRAIN_EXAMPLES = """examples:
  difftune train configs/sd15-dreambooth-lora.yaml
  difftune train configs/sd15-dreambooth-lora.yaml train.lr=5e-5 train.steps=2000 output_dir=runs/dog-v2
  difftune train configs/sd15-dreambooth-lora.yaml --quiet > train.log     # errors only
  accelerate launch -m difftune train configs/flux-dev-lora-style.yaml     # several GPUs

Paths: relative paths in the config file are relative to the file's folder; in key=value overrides,
to the current directory. A rerun with the same output_dir continues from its newest complete
checkpoint; a second run on an output_dir in use is refused. On a terminal progress is a bar; in a
log file or pipe, one line every train.log_every steps (step N/M, loss, lr, s/step, ETA).
Exit codes: 0 done, 2 bad input, 75 stopped by SIGTERM/SIGINT after saving a checkpoint,
130 stopped at once by a second Ctrl-C (the last checkpoint is intact).
"""

CONFIG_EXAMPLES = """examples:
  difftune config reference            # every key, type, default and meaning (Markdown)
  difftune config check configs/sd15-dreambooth-lora.yaml model.path=runs/tiny-sd

`config check` runs every check `difftune train` runs before loading a model (keys, paths, the
model's resolution multiple, the training images, the resume point), so `ok` means train starts.
"""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config values")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own logs and progress bars (diffusers, transformers, hub)")


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    quiet = args.quiet
    train(load_config(args.config, args.overrides), log=(lambda *_: None) if quiet else print,
          progress="off" if quiet else "auto")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["reference", "check"])
    parser.add_argument("config", nargs="?", help="YAML config file (for check)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")


def run_config(args: argparse.Namespace) -> int:
    from . import DifftuneError
    from .config import load_config, reference_markdown

    if args.action == "reference":
        print(reference_markdown())
        return 0
    if not args.config:
        raise DifftuneError("config check needs a config file")
    from .preflight import check_run

    checked = check_run(load_config(args.config, args.overrides), log=print)
    print(f"{args.config}: ok ({checked.family.name}, {len(checked.items)} training images, "
          f"resolution multiple {checked.multiple})")
    return 0


def local_resolution_multiple(model) -> int | None:
    """The side multiple of a config's model when it is a local folder (no download), else None."""
    from pathlib import Path

    if not (model.path and Path(model.path).is_dir()):
        return None
    from .families.registry import resolve_family

    return resolve_family(model.path, model.family, model.revision).resolution_multiple(model.path, model.revision)


def run_data(args: argparse.Namespace) -> int:
    """`difftune data check`: data/check.py, told the model's side multiple by the family registry."""
    from .data.check import run

    return run(args, local_resolution_multiple)
