"""Import-time costs difftune avoids.

accelerate's ``extract_model_from_parallel`` (called by every ``save_pretrained`` of a transformers
model and by ``Accelerator.unwrap_model``) imports DeepSpeed whenever it is installed, only to ask
whether the model is a ``DeepSpeedEngine``; that import pulls in torch's compiler stack and costs
2-3 s in every process that saves or unwraps a model, DeepSpeed run or not. No object can be a
``DeepSpeedEngine`` before DeepSpeed was imported, so `defer_deepspeed` makes accelerate ask only
when it already is: the answer is the same and a run that uses DeepSpeed (which imports it first) is
unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "accelerate.utils.other"


def _deepspeed_loaded() -> bool:
    return "deepspeed" in sys.modules


def _patch(module) -> None:
    module.is_deepspeed_available = _deepspeed_loaded


class _Finder(importlib.abc.MetaPathFinder):
    """Patches accelerate.utils.other right after it is executed, without importing it early."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


def defer_deepspeed() -> None:
    """Install the patch (idempotent; immediate if accelerate is already imported)."""
    if _TARGET in sys.modules:
        _patch(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
