"""`difftune bench`: how fast difftune trains a family at a given size on this machine, against the
machine's limit (see `cli` for the modes and the figures of a row).

- `cli`: the command: its flags, examples, and the table it prints;
- `cases`: what a case is, and the models and cached inputs it runs on;
- `measure`: step timers, peak memory, FLOP counting, MFU, the table a row prints as;
- `runners`: one case, run in its mode (through `train.make_optimizer` and `train.micro_step`);
- `suite`: ``--suite gpu`` and ``--suite peers``, each case in its own process;
- `peers`: diffusers' example training scripts, run as they are, on the bench's models.
"""

from __future__ import annotations

import importlib
from typing import Any

#: what other code and the tests take from the package, and the module that holds it; imported on first
#: use, so that ``python -m difftune.bench.peers probe`` (which wraps the timed processes) loads no more
#: than the probe itself
_EXPORTS = {"Case": "cases", "count_flops": "measure", "run_case": "runners"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
