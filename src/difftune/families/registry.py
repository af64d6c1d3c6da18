"""Family lookup by name or by the pipeline class in ``model_index.json``.

Adding a family: write its folder ``families/<folder>/`` (``family.py`` with a `Family` subclass,
``tiny.py``, ``presets.py``, and ``kohya.py`` / ``options.py`` where it needs them) and add one line
to `FAMILIES`. Everything else (``difftune tiny``, the bench, export, generate, the config) finds
the folder through this registry. Modules are imported only when asked for, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .. import DifftuneError
from .base import Family, read_model_index

#: family name -> "module:Class" (the ``family.py`` of its folder)
FAMILIES: dict[str, str] = {
    "sd": "difftune.families.sd.family:StableDiffusion",
    "sdxl": "difftune.families.sdxl.family:StableDiffusionXL",
    "flux": "difftune.families.flux.family:Flux",
    "kandinsky22-prior": "difftune.families.kandinsky22.family:KandinskyPrior",
    "kandinsky22-decoder": "difftune.families.kandinsky22.family:KandinskyDecoder",
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


def folder_of(name: str) -> str:
    """The folder (package) of family `name`, e.g. ``difftune.families.kandinsky22``."""
    if name not in FAMILIES:
        raise DifftuneError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name].split(":")[0].rsplit(".", 1)[0]


def folders() -> dict[str, list[str]]:
    """Short folder name (``sd``, ``kandinsky22``) -> the family names it registers, in registry order."""
    out: dict[str, list[str]] = {}
    for name in FAMILIES:
        out.setdefault(folder_of(name).rsplit(".", 1)[1], []).append(name)
    return out


def folder_module(folder: str, module: str) -> ModuleType | None:
    """Module `module` (``tiny``, ``presets``, ``options``, ...) of a family folder, or None if it has none."""
    package = f"difftune.families.{folder}"
    try:
        return importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"{package}.{module}":
            return None
        raise


def family_module(name: str, module: str) -> ModuleType | None:
    """Module `module` of the folder of family `name`, or None if the folder has none."""
    return folder_module(folder_of(name).rsplit(".", 1)[1], module)


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
