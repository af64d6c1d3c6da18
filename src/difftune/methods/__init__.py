"""Training methods: how the trained parts of a family are adapted, saved and restored.

A method is an object behind one small protocol (`Method`); the training loop, the bench, the speed
switches and the report only talk to it and never ask which method they have. A method knows no
family: it gets modules by part name and the family's default target-module names.

Adding a method: write ``methods/<kind>.py`` with a `Method` subclass and add one line to `METHODS`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .. import DifftuneError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ..config import MethodConfig

#: ``method.kind`` -> "module:Class"
METHODS: dict[str, str] = {
    "lora": "difftune.methods.lora:Lora",
    "full": "difftune.methods.full:Full",
    "dora": "difftune.methods.dora:Dora",
}


class Method(ABC):
    """The protocol every method implements (defaults: a method that trains every weight of a part)."""

    #: the ``method.kind`` it is registered under
    kind: ClassVar[str] = ""
    #: True if the trained parts keep their base weights frozen and train small adapters on top
    #: (``method.rank`` then means something)
    adapter: ClassVar[bool] = False
    #: True if the frozen base may be stored in low precision (``speed.base_weights``: fp8, nf4)
    low_precision_base: ClassVar[bool] = False

    def __init__(self, cfg: "MethodConfig"):
        self.cfg = cfg

    # ---- config ---------------------------------------------------------------------------------

    @classmethod
    def problems(cls, cfg: "MethodConfig") -> list[str]:
        """Cross-field config checks of this method (``method.*`` keys), one line each."""
        return []

    def label(self) -> str:
        """Short name for tables and reports, e.g. ``lora16``."""
        return self.kind

    def describe(self) -> str:
        """One line for the run report, e.g. ``lora, rank 16, alpha 16``."""
        return self.kind

    # ---- loading and attaching ------------------------------------------------------------------

    def part_dtype(self, weight_dtype: "torch.dtype") -> "torch.dtype":
        """The dtype a *trained* part is loaded in (frozen parts keep ``weight_dtype``)."""
        return weight_dtype

    @abstractmethod
    def attach(self, module: Any, part: str, targets: dict[str, list[str]], denoiser: str) -> None:
        """Make `module` (the part named `part`) trainable. `targets`: the family's default target
        module names per part; `denoiser`: the name of the family's denoiser part."""

    def start(self, family: Any, part_names: list[str], log) -> None:
        """Called once after `attach` on a fresh (not resumed) run, e.g. to load starting weights."""

    def trainable_parameters(self, module: Any) -> list:
        """The parameters of `module` that the optimizer steps."""
        from ..families.base import unwrap

        return [p for p in unwrap(module).parameters() if p.requires_grad]

    # ---- state ------------------------------------------------------------------------------------

    @abstractmethod
    def state_dict(self, module: Any) -> dict:
        """What a checkpoint stores of `module` (and `load_state_dict` restores)."""

    @abstractmethod
    def load_state_dict(self, module: Any, state: dict, where: str) -> None:
        """Restore `state_dict`'s output; every key must fit (a clear error names `where`)."""

    @abstractmethod
    def save(self, family: Any, out_dir: Path, part_names: list[str]) -> None:
        """Write the final output the matching diffusers pipeline loads."""


def method_kinds() -> list[str]:
    return list(METHODS)


def get_method_class(kind: str) -> type[Method]:
    if kind not in METHODS:
        raise DifftuneError(f"method.kind: unknown method {kind!r}; known: {', '.join(METHODS)}")
    module_name, class_name = METHODS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_method(cfg: "MethodConfig") -> Method:
    """The Method object for the ``method`` section of a config."""
    return get_method_class(cfg.kind)(cfg)
