"""Family lookup by name or by the pipeline class in ``model_index.json``.

Adding a family: write its module with a `Family` subclass and add one line to `FAMILIES`.
Modules are imported only when asked for, so the CLI starts fast.
"""

from __future__ import annotations

import importlib

from .. import DifftuneError
from .base import Family, read_model_index

#: family name -> "module:Class"
FAMILIES: dict[str, str] = {
    "sd": "difftune.families.sd:StableDiffusion",
    "flux": "difftune.families.flux:Flux",
    "kandinsky22-prior": "difftune.families.kandinsky22:KandinskyPrior",
    "kandinsky22-decoder": "difftune.families.kandinsky22:KandinskyDecoder",
}


def get_family(name: str) -> type[Family]:
    """The Family class registered under `name`."""
    if name not in FAMILIES:
        raise DifftuneError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    module_name, class_name = FAMILIES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise DifftuneError(f"model family {name!r} is not available in this version of difftune") from None
        raise
    return getattr(module, class_name)


def detect_family(model_path: str, revision: str | None = None) -> str:
    """The family name for a pipeline folder or hub id, from its ``model_index.json``."""
    index = read_model_index(model_path, revision)
    class_name = index.get("_class_name", "")
    for name in FAMILIES:
        try:
            family = get_family(name)
        except DifftuneError:
            continue
        if class_name in family.pipeline_classes:
            return name
    raise DifftuneError(
        f"{model_path}: pipeline class {class_name!r} is not supported; set model.family to one of {', '.join(FAMILIES)}"
    )


def resolve_family(model_path: str, family: str = "auto", revision: str | None = None) -> type[Family]:
    """`model.family` (or auto-detection) -> Family class."""
    return get_family(detect_family(model_path, revision) if family == "auto" else family)
