"""LoRAs for `difftune generate` and `difftune merge`: ``PATH[:SCALE]`` specs, what a LoRA file says
about itself (family, training resolution, layout), and loading into a pipeline with one-line errors.

Checks run in two steps so that most mistakes cost no model loading:

1. Before the model loads: the spec parses, a local-looking path exists, the file is a LoRA
   (`inspect`), the family it was trained for (the difftune ``config.yaml`` beside it, else its part
   names or its kohya module names) is the model's (`check_family`), and, for a local model folder,
   its layer sizes match the weight shapes in the folder's safetensors headers (`check_fits_files`:
   a LoRA of another base of the same family fails here, naming the first layer that differs).
2. `load` (after): every adapted module exists in the loaded model with the LoRA's sizes, then the
   pipeline's own ``load_lora_weights`` reads it. kohya files are converted to the diffusers
   layout with `difftune.export` and the family's kohya names first.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import DifftuneError

#: suffixes of single-file weights (a path ending in one of these is a file, never a hub id)
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def looks_local(spec: str) -> bool:
    """Whether `spec` can only mean a local path, so it must exist (and never goes to the hub).

    A hub id is exactly ``owner/name``. Anything else is local: an absolute, ``~``, ``./`` or ``../``
    path, a path with a weights-file suffix or a backslash, more than two segments, a single segment,
    or ``a/b`` where ``a`` is a folder here (``runs/nope`` with a ``runs`` folder in the current directory).
    """
    if spec.startswith(("/", "~", "./", "../", ".\\")) or "\\" in spec or spec.endswith(WEIGHT_SUFFIXES):
        return True
    segments = spec.split("/")
    return len(segments) != 2 or Path(segments[0]).is_dir()


def check_exists(path: str, flag: str) -> None:
    """One line if `path` looks local (see `looks_local`) and does not exist."""
    if not Path(path).expanduser().exists() and looks_local(path):
        raise DifftuneError(f"{flag} {path}: no such file or folder")


def parse_spec(spec: str, flag: str = "--lora") -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the scale defaults to 1.0. A path that exists as written
    wins (a file name with a colon in it); a local-looking path that does not exist is an error."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).exists() and "/" not in tail and "\\" not in tail:
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise DifftuneError(f"{flag} {spec}: the scale {tail!r} is not a number (write PATH:0.8)") from None
    check_exists(path, flag)
    return path, scale


@dataclass
class LoraSpec:
    """One LoRA as given (``path``, ``scale``) and what its files say; None where they say nothing."""

    path: str
    scale: float
    flag: str = "--lora"
    #: the .safetensors file (None for a hub id)
    file: Path | None = None
    #: the family and base model of the difftune run it comes from (its config.yaml)
    family: str | None = None
    base: str | None = None
    #: the image side it was trained at (config.yaml's data.resolution, or kohya's ss_resolution)
    resolution: int | None = None
    kohya: bool = False
    parts: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        return f"{self.flag} {self.path}"


def _run_config(folder: Path) -> dict:
    config = folder / "config.yaml"
    if not config.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _run_family(model: dict) -> str | None:
    family = model.get("family") or "auto"
    if family != "auto":
        return str(family)
    path = model.get("path")
    if not path or not Path(path).is_dir():
        return None  # a hub id: finding out would need the network
    try:
        from ..families.registry import detect_family

        return detect_family(str(path))
    except DifftuneError:
        return None


def inspect(path: str, scale: float, flag: str = "--lora") -> LoraSpec:
    """What the LoRA at `path` says about itself, read without loading any model."""
    spec = LoraSpec(path, scale, flag)
    local = Path(path).expanduser()
    if not local.exists():
        return spec  # a hub id
    from ..export import DIFFUSERS_FILE

    file = local / DIFFUSERS_FILE if local.is_dir() else local
    if not file.is_file():
        raise DifftuneError(f"{spec.where}: no {DIFFUSERS_FILE} in this folder (not a LoRA run's output_dir?)")
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            keys, header = list(fh.keys()), dict(fh.metadata() or {})
    except Exception as e:
        raise DifftuneError(f"{spec.where}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    spec.file = file
    spec.kohya = any(k.endswith(".lora_down.weight") for k in keys)
    if not spec.kohya and not any(".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        raise DifftuneError(f"{spec.where}: holds no LoRA weights (no lora_A / lora_down keys)")
    spec.parts = {k.split(".", 1)[0] if not spec.kohya else k.split("_", 2)[1] for k in keys}
    run = _run_config(file.parent)
    if run:
        model = run.get("model") or {}
        spec.family, spec.base = _run_family(model), model.get("path")
        resolution = (run.get("data") or {}).get("resolution")
        spec.resolution = int(resolution) if isinstance(resolution, int) else None
    if spec.resolution is None and header.get("ss_resolution"):  # kohya's "(512, 512)" or "512"
        sides = [int(n) for n in json.loads(header["ss_resolution"].replace("(", "[").replace(")", "]"))] \
            if header["ss_resolution"].strip()[:1] in "([" else [int(header["ss_resolution"])]
        spec.resolution = sides[0]
    return spec


def check_family(spec: LoraSpec, family: Any) -> None:
    """One line if the LoRA was made for another family than `family` (before the model loads)."""
    if spec.file is None:
        return
    if spec.family and spec.family != family.name:
        raise DifftuneError(
            f"{spec.where}: a LoRA for the {spec.family} family (base {spec.base}), but the model is {family.name}"
        )
    if spec.kohya:
        try:
            modules(spec, family)
        except DifftuneError as e:
            raise DifftuneError(f"{spec.where}: not a kohya LoRA of the {family.name} family ({e})") from None
        return
    parts = family.lora_parts()
    if parts and not spec.parts <= set(parts):
        from ..families.registry import FAMILIES, get_family

        others = []
        for name in FAMILIES:
            try:
                if spec.parts <= set(get_family(name).lora_parts()):
                    others.append(name)
            except DifftuneError:
                continue
        hint = f"a LoRA for the {' or '.join(others)} family" if others else "a LoRA of another kind of model"
        raise DifftuneError(
            f"{spec.where}: {hint} (weights for {', '.join(sorted(spec.parts))}), but the model is {family.name} "
            f"(LoRA parts {', '.join(parts)})"
        )


def modules(spec: LoraSpec, family: Any) -> dict[tuple[str, str], Any]:
    """(part, module) -> `difftune.export.LoraWeights` of a local LoRA file, in diffusers module names."""
    from ..export import read_diffusers, read_file, read_kohya
    from ..formats.kohya import from_kohya

    tensors, header = read_file(spec.file)
    if spec.kohya:
        return from_kohya(read_kohya(tensors, spec.file), family.kohya_layout())
    return read_diffusers(tensors, header, spec.file)


def _submodule(component: Any, path: str) -> Any:
    # transformers 5 text encoders have no ``text_model.`` root; files written before keep it
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            return component.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _check_shapes(spec: LoraSpec, weights: dict, shape_of: Any, strict: bool) -> None:
    """One line for the first adapted module whose weight shape (``shape_of(part, module)``: the
    ``[out, in, ...]`` shape, or None if unknown) does not fit the LoRA; unknown modules are an error
    when `strict`."""
    for (part, module), w in weights.items():
        shape = shape_of(part, module)
        if shape is None:
            if strict:
                raise DifftuneError(f"{spec.where}: adapts {part}.{module}, which this model does not have "
                                    "(a LoRA for another model family or architecture)")
            continue
        if w.down.shape[1] != shape[1] or w.up.shape[0] != shape[0]:
            raise DifftuneError(
                f"{spec.where}: {part}.{module} takes {shape[1]} inputs and gives {shape[0]} outputs in "
                f"this model, {w.down.shape[1]} and {w.up.shape[0]} in the LoRA: it was trained on another base model"
                + (f" ({spec.base})" if spec.base else "")
            )


def check_fits_files(spec: LoraSpec, family: Any, model: str) -> None:
    """Before loading: the LoRA's layer sizes against the weight shapes in a local model folder's
    safetensors headers (layers the headers do not show are left to `check_fits`)."""
    if spec.file is None or not Path(model).is_dir():
        return
    from safetensors import safe_open

    weights = modules(spec, family)
    shapes: dict[str, dict[str, tuple]] = {}
    for part in {p for p, _ in weights}:
        shapes[part] = {}
        for f in sorted((Path(model) / part).glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    shapes[part].update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
            except Exception:
                continue  # unreadable here: loading will say so

    def shape_of(part: str, module: str) -> tuple | None:
        known = shapes.get(part, {})
        return known.get(f"{module}.weight") or known.get(f"{module.removeprefix('text_model.')}.weight")

    _check_shapes(spec, weights, shape_of, strict=False)


def check_fits(spec: LoraSpec, family: Any, components: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """One line unless every module the LoRA adapts exists in `components` with its sizes."""
    weights = modules(spec, family)

    def shape_of(part: str, module: str) -> tuple | None:
        component = components.get(part)
        target = _submodule(component, module) if component is not None else None
        weight = getattr(target, "weight", None)
        return tuple(weight.shape) if weight is not None else None

    _check_shapes(spec, weights, shape_of, strict=True)
    return weights


def load(pipe: Any, family: Any, specs: list[LoraSpec]) -> None:
    """Load `specs` into `pipe` as adapters ``lora0``, ``lora1``... and activate them with their scales."""
    names = []
    for i, spec in enumerate(specs):
        name = f"lora{i}"
        with tempfile.TemporaryDirectory() as tmp:
            source = spec.path
            if spec.file is not None:
                weights = check_fits(spec, family, pipe.components)
                source = str(spec.file)
                if spec.kohya:  # diffusers' own kohya readers assume the real models' sizes
                    from ..export import write_diffusers

                    source = str(write_diffusers(weights, family, Path(tmp) / "lora.safetensors"))
            try:
                pipe.load_lora_weights(source, adapter_name=name)
            except Exception as e:
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise DifftuneError(f"{spec.where}: cannot load it ({type(e).__name__}: {message[:300]})") from None
        present = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
        if name not in present:
            raise DifftuneError(f"{spec.where}: holds no weights this {family.name} model can use")
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
