"""`difftune world SUBCOMMAND`: the world's commands, one line each in `SUBCOMMANDS` (imported lazily)."""

from __future__ import annotations

import argparse
import importlib

#: subcommand -> ("module:add_arguments:run:EXAMPLES", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "journey": ("difftune.world.journey:add_arguments:run:EXAMPLES",
                "style LoRA, then a place, by every remedy for forgetting: the results table"),
}

EXAMPLES = "examples:\n  difftune world journey --family sd\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="world_command", metavar="SUBCOMMAND", required=True)
    for name, (spec, help_text) in SUBCOMMANDS.items():
        module_name, adder, runner, examples = spec.split(":")
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=getattr(module, examples, None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, adder)(p)
        p.set_defaults(_world_runner=(module_name, runner))


def run(args: argparse.Namespace) -> int:
    module_name, runner = args._world_runner
    return getattr(importlib.import_module(module_name), runner)(args)
