"""The `difftune` command: one entry point, one subcommand per stage.

Subcommand modules are imported only when their command runs (their `add_arguments` functions
import nothing heavy), so `difftune --help` is instant. Every user error is a `DifftuneError`,
printed as one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import DifftuneError, __version__

#: command -> ("module:add_arguments_function:run_function:EXAMPLES_NAME", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("difftune.commands:add_train_arguments:run_train:TRAIN_EXAMPLES",
              "train a LoRA or full fine-tune from a YAML config"),
    "generate": ("difftune.inference.generate:add_arguments:run:EXAMPLES",
                 "generate images with a model, LoRAs and ControlNets, from text, an image or an image and a mask"),
    "merge": ("difftune.inference.merge:add_arguments:run:EXAMPLES", "fuse LoRAs into a base model: one pipeline folder"),
    "tiny": ("difftune.tiny:add_arguments:run:EXAMPLES", "write a tiny random pipeline (offline) in the diffusers layout"),
    "demo": ("difftune.demo:add_arguments:run:EXAMPLES",
             "the whole journey on a built-in tiny model, in a few minutes on a CPU"),
    "fetch": ("difftune.fetch:add_arguments:run:EXAMPLES",
              "download images from URL lists or numbered URL patterns, safely"),
    "export": ("difftune.export:add_arguments:run:EXAMPLES", "convert a LoRA between the diffusers and kohya layouts"),
    "bench": ("difftune.bench.cli:add_arguments:run:EXAMPLES",
              "time a training step (or generation) against the machine's limit: s/step, memory, MFU"),
    "config": ("difftune.commands:add_config_arguments:run_config:CONFIG_EXAMPLES",
               "print the config reference or check a config file"),
    "plan": ("difftune.parallel.plan:add_arguments:run:EXAMPLES",
             "estimate per-device memory of a config under each parallel strategy, and suggest one"),
    "world": ("difftune.world.command:add_arguments:run:EXAMPLES",
              "the procedural world: render data, score images with its oracle, pretrain and bench world models"),
    "eval": ("difftune.evaluate.cli:add_arguments:run:EXAMPLES",
             "score a run's final weights and checkpoints per concept, and its drift from the base model"),
    "data": ("difftune.commands:add_data_arguments:run_data:DATA_EXAMPLES",
             "check training data: counts, sizes, aspect ratios, captions and problems per file"),
    "sweep": ("difftune.sweeps.runner:add_arguments:run:EXAMPLES",
              "train every combination of --grid values as its own run, resumable; then compare them"),
    "compare": ("difftune.reports.compare:add_arguments:run:EXAMPLES",
                "one page comparing runs or sweeps: differing keys, curves, samples side by side, scores"),
    "report": ("difftune.reports.run_page:add_arguments:run:EXAMPLES", "rebuild report.html for run folders"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune",
        description="Fine-tune text-to-image diffusion models (Stable Diffusion 1.x/2.x, FLUX.1, Kandinsky 2.2) "
        "on your own pictures.",
        epilog="Run `difftune COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"difftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (spec, help_text) in COMMANDS.items():
        module_name, adder, runner, examples = spec.split(":")
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=getattr(module, examples, None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, adder)(p)
        p.set_defaults(_module=module_name, _runner=runner)
    return parser


def _quiet_libraries() -> None:
    """difftune shows its own progress and one-line errors: keep the libraries' logs to errors and
    their progress bars ("Loading weights", downloads) off, unless the command got ``--verbose``.

    Set before they are imported (they read these at import); a user's own setting wins. diffusers
    has no variable for its bars: `progress.quiet_diffusers_bars` turns them off once it is imported.
    """
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFTUNE_QUIET_LIBRARIES", "1")
    # deprecation and advisory warnings from the libraries are for their callers, not for users
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(diffusers|transformers|accelerate|peft|torch|huggingface_hub)\b")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if not getattr(args, "verbose", False):
        _quiet_libraries()
    runner = getattr(importlib.import_module(args._module), args._runner)
    try:
        return int(runner(args) or 0)
    except DifftuneError as e:
        print(f"difftune {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt as e:
        print(f"difftune {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
