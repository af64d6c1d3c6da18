"""`difftune export`: convert LoRA files between the diffusers layout and the kohya layout.

- **diffusers** (what `difftune train` writes and ``pipe.load_lora_weights`` reads): keys
  ``{part}.{module}.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` (older spellings
  ``.lora.down/up`` and ``.lora_linear_layer.down/up`` are read too); rank and alpha per part in the
  safetensors header (``lora_adapter_metadata``), scale = alpha / r, and alpha = r without it.
- **kohya** (sd-scripts; read by ComfyUI, A1111/Forge, kohya and diffusers): keys
  ``{prefix}_{name}.lora_down.weight`` ``[r, in]``, ``.lora_up.weight`` ``[out, r]`` and ``.alpha``
  (a scalar; scale = alpha / r), where the prefix names the part (``lora_unet``, ``lora_te``, ``lora_te1``)
  and the name is the module path, ``_`` for ``.``, in the naming of the model's original code: SD's
  is diffusers' own, FLUX's is Black Forest Labs' (``double_blocks_0_img_attn_qkv``), where one
  fused layer stands for q, k and v.

Each family gives its naming as a `KohyaLayout` (``Family.kohya_layout()``, from its ``kohya.py``);
the conversion (renaming, fusing and splitting LoRAs, alpha) is in ``formats/kohya.py`` and knows no
family; this module reads and writes the files.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import DifftuneError
from .formats.kohya import LoraWeights, from_kohya, to_kohya
from .run_layout import LORA_FILE, RunLayout

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

EXAMPLES = """examples:
  difftune export runs/stalenhag --format kohya --out stalenhag.safetensors        # for ComfyUI, A1111, kohya
  difftune export downloads/style.safetensors --format diffusers --family flux --out runs/style-diffusers
  difftune export runs/sd-dog/pytorch_lora_weights.safetensors --format kohya --out dog.safetensors

LORA is a difftune output_dir (its config.yaml tells the model family) or a .safetensors file
(then pass --family sd or --family flux). The kohya file loads in diffusers too:
pipe.load_lora_weights("stalenhag.safetensors").
"""

DIFFUSERS_FILE = LORA_FILE
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up"}

# -----------------------------------------------------------------------------------------------
# Files


def lora_file(path: str | Path) -> Path:
    """The .safetensors file of a LoRA given as a file or a folder holding `DIFFUSERS_FILE`."""
    p = Path(path)
    file = p / DIFFUSERS_FILE if p.is_dir() else p
    if not file.is_file():
        raise DifftuneError(f"no LoRA file at {file}")
    return file


def read_file(file: Path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Tensors and header metadata of a safetensors file (a clear error for anything else)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as e:
        raise DifftuneError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def is_kohya(tensors: dict) -> bool:
    return any(k.endswith(".lora_down.weight") for k in tensors)


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    # peft's rank_pattern / alpha_pattern matching: the key matches the end of the module path
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _exactly(module: str) -> str:
    # a peft pattern key matches any module path *ending* in it (``proj_out`` would also match
    # ``single_transformer_blocks.0.proj_out``); anchored and escaped it matches this one only
    return "^" + re.escape(module)


def _split_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, kind in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def read_diffusers(tensors: dict, header: dict, where: Path) -> dict[tuple[str, str], LoraWeights]:
    """(part, module) -> LoRA of a diffusers-layout file."""
    meta = json.loads(header["lora_adapter_metadata"]) if header.get("lora_adapter_metadata") else {}
    halves: dict[tuple[str, str], dict[str, Any]] = {}
    alphas: dict[tuple[str, str], float] = {}
    for key, tensor in tensors.items():
        part, _, rest = key.partition(".")
        if rest.endswith(".alpha"):  # old diffusers files carry kohya-style alphas
            alphas[(part, rest[: -len(".alpha")])] = float(tensor.item())
            continue
        found = _split_key(rest, _DIFFUSERS_SUFFIXES)
        if not rest or found is None:
            raise DifftuneError(f"{where}: {key!r} is not a LoRA weight in the diffusers layout")
        halves.setdefault((part, found[0]), {})[found[1]] = tensor
    out = {}
    for (part, module), pair in halves.items():
        if set(pair) != {"down", "up"}:
            raise DifftuneError(f"{where}: {part}.{module} has only its lora_{'A' if 'down' in pair else 'B'} weight")
        rank = int(pair["down"].shape[0])
        alpha = alphas.get((part, module))
        if alpha is None:
            alpha = _pattern_value(meta.get(f"{part}.alpha_pattern") or {}, module, meta.get(f"{part}.lora_alpha", rank))
        out[(part, module)] = LoraWeights(pair["down"], pair["up"], float(alpha))
    if not out:
        raise DifftuneError(f"{where}: no LoRA weights in it")
    return out


def read_kohya(tensors: dict, where: Path) -> dict[str, LoraWeights]:
    """kohya name -> LoRA of a kohya-layout file (alpha = rank where the file has none)."""
    halves: dict[str, dict[str, Any]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(tensor.item())
            continue
        found = _split_key(key, _KOHYA_SUFFIXES)
        if found is None:
            raise DifftuneError(
                f"{where}: {key!r} is not a LoRA weight in the kohya layout (DoRA, LoHa and LoKr are not supported)"
            )
        halves.setdefault(found[0], {})[found[1]] = tensor
    out = {}
    for name, pair in halves.items():
        if set(pair) != {"down", "up"}:
            raise DifftuneError(f"{where}: {name} has only its lora_{'down' if 'down' in pair else 'up'} weight")
        out[name] = LoraWeights(pair["down"], pair["up"], alphas.get(name, float(pair["down"].shape[0])))
    return out


def _common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def write_kohya(loras: dict[str, LoraWeights], out: Path, trained: list[LoraWeights] | None = None) -> None:
    """Write a kohya file. ``ss_network_dim`` / ``ss_network_alpha`` (what UIs show as the LoRA's
    rank and alpha) are the most common ones of the `trained` per-module LoRAs when given: a fused
    layer (FLUX's ``qkv``) stacks three rank-r LoRAs into one of rank 3r, which is no rank anyone trained."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, w in sorted(loras.items()):
        tensors[f"{name}.lora_down.weight"] = w.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = w.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(w.alpha))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_common([w.rank for w in (trained or loras.values())])),
        "ss_network_alpha": str(_common([w.alpha for w in (trained or loras.values())])),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)


def write_diffusers(loras: dict[tuple[str, str], LoraWeights], family: Any, out: Path) -> Path:
    """Write with the family pipeline's own ``save_lora_weights``; rank and alpha (with peft's
    rank_pattern / alpha_pattern for modules that differ) go into the header, as diffusers reads them."""
    import diffusers

    pipeline_cls = getattr(diffusers, family.pipeline_classes[0])
    folder, weight_name = (out.parent, out.name) if out.suffix == ".safetensors" else (out, DIFFUSERS_FILE)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    for part in sorted({p for p, _ in loras}):
        mine = {m: w for (p, m), w in loras.items() if p == part}
        rank = _common([w.rank for w in mine.values()])
        alpha = _common([w.alpha for w in mine.values()])
        state = {}
        for module, w in mine.items():
            state[f"{module}.lora_A.weight"] = w.down.contiguous()
            state[f"{module}.lora_B.weight"] = w.up.contiguous()
        kwargs[f"{part}_lora_layers"] = state
        kwargs[f"{part}_lora_adapter_metadata"] = {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(mine),
            "rank_pattern": {_exactly(m): w.rank for m, w in mine.items() if w.rank != rank},
            "alpha_pattern": {_exactly(m): w.alpha for m, w in mine.items() if w.alpha != alpha},
        }
    try:
        pipeline_cls.save_lora_weights(str(folder), weight_name=weight_name, **kwargs)
    except TypeError as e:  # a part this pipeline's LoRA loader does not know
        raise DifftuneError(f"{pipeline_cls.__name__} cannot save LoRA weights for parts {sorted(kwargs)}: {e}") from None
    return folder / weight_name


# -----------------------------------------------------------------------------------------------
# The command


def family_for(src: Path, family: str = "auto") -> Any:
    """The Family class a LoRA is for: `family`, or the difftune config.yaml beside the file."""
    from .families.registry import get_family, resolve_family

    if family != "auto":
        return get_family(family)
    config = RunLayout(src if src.is_dir() else src.parent).config
    hint = "pass --family (e.g. --family flux or --family sd)"
    if not config.is_file():
        raise DifftuneError(f"cannot tell which model family {src} is for (no difftune config.yaml beside it); {hint}")
    from .config import load_config

    cfg = load_config(config)
    try:
        return resolve_family(cfg.model.path, cfg.model.family, cfg.model.revision)
    except DifftuneError as e:
        raise DifftuneError(f"{config}: {e}; {hint}") from None


def export_lora(src: str | Path, fmt: str, out: str | Path, family: str = "auto") -> Path:
    """Convert the LoRA at `src` to `fmt` (``kohya`` or ``diffusers``) at `out`; returns the file written."""
    if fmt not in ("kohya", "diffusers"):
        raise DifftuneError(f"--format must be kohya or diffusers, got {fmt!r}")
    file = lora_file(src)
    family_cls = family_for(Path(src), family)
    layout = family_cls.kohya_layout()
    tensors, header = read_file(file)
    out = Path(out)
    if fmt == "kohya":
        if is_kohya(tensors):
            raise DifftuneError(f"{file} is already in the kohya layout")
        if out.suffix != ".safetensors":
            raise DifftuneError(f"--out must be a .safetensors file for --format kohya, got {out}")
        source = read_diffusers(tensors, header, file)
        write_kohya(to_kohya(source, layout), out, trained=list(source.values()))
        return out
    if not is_kohya(tensors):
        raise DifftuneError(f"{file} is not in the kohya layout (no .lora_down.weight keys); nothing to convert")
    return write_diffusers(from_kohya(read_kohya(tensors, file), layout), family_cls, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA: a difftune output_dir or a .safetensors file")
    parser.add_argument("--format", required=True, choices=["kohya", "diffusers"],
                        help="kohya: one file for ComfyUI / A1111 / kohya; diffusers: for load_lora_weights and difftune")
    parser.add_argument("--out", required=True,
                        help="output .safetensors file (kohya), or folder or .safetensors file (diffusers)")
    parser.add_argument("--family", default="auto",
                        help="model family of the LoRA (default: from the config.yaml of the difftune run beside it)")


def run(args: argparse.Namespace) -> int:
    path = export_lora(args.lora, args.format, args.out, args.family)
    print(path)
    return 0
