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

Each family gives its naming as a `KohyaLayout` (``Family.kohya_layout()``); the conversion itself
(renaming, fusing and splitting LoRAs, alpha) is here and knows no family.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import DifftuneError

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

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up"}

#: module-path segments that contain ``_`` in diffusers and transformers models, so that a kohya
#: name (``_`` everywhere) splits back into the right path; the longest match wins
COMPOUND_SEGMENTS = (
    # diffusers UNets (SD, Kandinsky) and the Kandinsky prior
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in", "proj_out", "time_emb_proj",
    "conv_in", "conv_out", "conv_shortcut", "conv_norm_out", "time_embedding", "linear_1", "linear_2",
    "add_embedding", "class_embedding", "encoder_hid_proj", "image_proj", "text_proj", "norm_in", "norm_out",
    "embedding_proj", "encoder_hidden_states_proj", "proj_to_clip_embeddings",
    # diffusers transformers (FLUX)
    "single_transformer_blocks", "ff_context", "norm1_context", "proj_mlp", "x_embedder", "context_embedder",
    "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
    # transformers text encoders (CLIP, T5)
    "text_model", "vision_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "visual_projection", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding",
    "position_embedding", "wi_0", "wi_1",
)
#: first segments of a CLIP text tower's module paths in transformers 5 (see `KohyaLayout`)
_CLIP_HEADS = ("embeddings", "encoder", "final_layer_norm")
_COMPOUNDS = {tuple(s.split("_")) for s in COMPOUND_SEGMENTS}
_LONGEST = max(len(c) for c in _COMPOUNDS)


# -----------------------------------------------------------------------------------------------
# One LoRA and the layout


@dataclass
class LoraWeights:
    """One adapted module: ``delta W = up @ down * alpha / rank``.

    ``down`` ``[rank, in]`` (conv: ``[rank, in, kh, kw]``), ``up`` ``[out, rank]`` (conv: ``[out, rank, 1, 1]``).
    """

    down: "torch.Tensor"
    up: "torch.Tensor"
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> "torch.Tensor":
        """The weight change it makes, ``[out, in * kh * kw]``, in fp32."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)) * self.scale


@dataclass(frozen=True)
class KohyaModule:
    """One module of the kohya layout and the diffusers modules (of one part) it stands for.

    `modules` lists them in output-row order; more than one means a fused layer, and `rows` then
    gives each module's output rows from the layer's input features. `swap_halves`: the two halves
    of the output rows trade places between the layouts. `bake_scale`: write the scale into
    ``lora_up`` and alpha = rank, for readers that ignore alpha on this module.
    """

    name: str
    modules: tuple[str, ...]
    rows: Callable[[int], tuple[int, ...]] | None = None
    swap_halves: bool = False
    bake_scale: bool = False


def path_from_kohya(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` (see `COMPOUND_SEGMENTS`)."""
    words = name.split("_")
    segments, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            if n == 1 or tuple(words[i : i + n]) in _COMPOUNDS:
                segments.append("_".join(words[i : i + n]))
                i += n
                break
    return ".".join(segments)


class KohyaLayout:
    """How one family's LoRA modules are named in the kohya layout.

    `prefixes`: part -> kohya prefix (``{"unet": "lora_unet", "text_encoder": "lora_te"}``). By
    default every module maps one to one, its path with ``_`` for ``.``; families whose original
    code names or fuses layers differently override `module_for` and `module_named`.

    `clip_parts`: parts that are transformers ``CLIPTextModel``s. transformers 5 dropped the
    ``text_model.`` root of their module paths (``encoder.layers.0...``), but kohya names keep the
    checkpoints' paths (``lora_te_text_model_encoder_layers_0_...``), which every tool reading them
    expects: the root is added on the way out and removed on the way back.
    """

    def __init__(self, prefixes: dict[str, str], clip_parts: tuple[str, ...] | list[str] = ()):
        self.prefixes = dict(prefixes)
        self.clip_parts = tuple(clip_parts)

    def module_for(self, part: str, module: str) -> KohyaModule:
        """The kohya module that diffusers `module` of `part` belongs to."""
        path = module
        if part in self.clip_parts and module.split(".")[0] in _CLIP_HEADS:
            path = f"text_model.{module}"
        return KohyaModule(path.replace(".", "_"), (module,))

    def module_named(self, part: str, name: str) -> KohyaModule:
        """The kohya module called `name` (without the part prefix) in `part`."""
        path = path_from_kohya(name)
        root, _, rest = path.partition(".")
        if part in self.clip_parts and root == "text_model" and rest.split(".")[0] in _CLIP_HEADS:
            path = rest
        return KohyaModule(name, (path,))

    def split_name(self, key: str) -> tuple[str, str]:
        """``lora_te1_text_model_...`` -> (``text_encoder``, ``text_model_...``)."""
        for part, prefix in self.prefixes.items():
            if key.startswith(prefix + "_"):
                return part, key[len(prefix) + 1 :]
        known = ", ".join(f"{p}_" for p in self.prefixes.values())
        raise DifftuneError(f"kohya LoRA module {key!r} belongs to no part of this family (names start with {known})")


# -----------------------------------------------------------------------------------------------
# Fusing and splitting


def _swap_halves(w: LoraWeights) -> LoraWeights:
    import torch

    first, second = w.up.chunk(2, dim=0)
    return LoraWeights(w.down, torch.cat([second, first], dim=0), w.alpha)


def fuse(parts: list[LoraWeights | None], rows: tuple[int, ...]) -> LoraWeights:
    """One LoRA for a fused layer whose output rows are `rows` per module, from each module's LoRA
    (None: not adapted, zeros of the same rank).

    ``down`` stacks the downs (rank = the sum), ``up`` is block-diagonal, so every module keeps
    exactly its own change. Equal ranks give equal blocks, the pattern diffusers' reader splits
    back into per-module LoRAs. The alpha keeps the scale of the first LoRA; others whose scale
    differs have the ratio folded into their ``up`` block.
    """
    import torch

    present = [p for p in parts if p is not None]
    first = present[0]
    in_features, rank = first.down.shape[1], first.rank
    downs, ups = [], []
    for p, out in zip(parts, rows):
        if p is None:
            downs.append(torch.zeros(rank, in_features, dtype=first.down.dtype))
            ups.append(torch.zeros(out, rank, dtype=first.up.dtype))
            continue
        if p.down.dim() != 2 or p.down.shape[1] != in_features or p.up.shape[0] != out:
            raise DifftuneError(
                f"cannot fuse LoRAs of shapes {tuple(p.down.shape)} / {tuple(p.up.shape)} into a layer of "
                f"{in_features} inputs and {out} outputs for that module"
            )
        downs.append(p.down)
        ups.append(p.up * (p.scale / first.scale) if p.scale != first.scale else p.up)
    down = torch.cat(downs, dim=0)
    return LoraWeights(down, torch.block_diag(*ups), first.scale * down.shape[0])


def split(w: LoraWeights, rows: tuple[int, ...]) -> list[LoraWeights | None]:
    """Per-module LoRAs of a fused layer (the inverse of `fuse`); None for a module it leaves alone.

    A block-diagonal ``up`` with equal blocks (what `fuse` and kohya's split-qkv training write)
    splits into the blocks, rank / n each. Otherwise the rank is shared (kohya's default for
    fused layers): every module gets the whole ``down`` and its rows of ``up``.
    """
    n, rank = len(rows), w.rank
    if sum(rows) != w.up.shape[0]:
        raise DifftuneError(f"fused LoRA has {w.up.shape[0]} output rows, expected {sum(rows)} ({'+'.join(map(str, rows))})")
    starts = [sum(rows[:i]) for i in range(n)]
    if rank % n == 0:
        r = rank // n
        diagonal = all(
            not w.up[s : s + out, j * r : (j + 1) * r].any()
            for i, (s, out) in enumerate(zip(starts, rows)) for j in range(n) if j != i
        )
        if diagonal:
            pieces: list[LoraWeights | None] = []
            for i, (s, out) in enumerate(zip(starts, rows)):
                down, up = w.down[i * r : (i + 1) * r], w.up[s : s + out, i * r : (i + 1) * r]
                # a padding block (zero down and up) is a module that was not adapted
                adapted = bool(down.any() or up.any())
                pieces.append(LoraWeights(down.contiguous(), up.contiguous(), w.alpha / n) if adapted else None)
            return pieces
    return [
        LoraWeights(w.down.clone(), w.up[s : s + out].contiguous(), w.alpha) if w.up[s : s + out].any() else None
        for s, out in zip(starts, rows)
    ]


def to_kohya(loras: dict[tuple[str, str], LoraWeights], layout: KohyaLayout) -> dict[str, LoraWeights]:
    """(part, diffusers module) -> LoRA  to  kohya name (with prefix) -> LoRA."""
    groups: dict[tuple[str, str], tuple[KohyaModule, dict[str, LoraWeights]]] = {}
    for (part, module), w in loras.items():
        if part not in layout.prefixes:
            raise DifftuneError(
                f"the kohya layout of this family has no name for LoRA weights of {part!r} "
                f"(it knows {', '.join(layout.prefixes)})"
            )
        km = layout.module_for(part, module)
        groups.setdefault((part, km.name), (km, {}))[1][module] = w
    out = {}
    for (part, name), (km, members) in groups.items():
        if len(km.modules) == 1:
            w = members[km.modules[0]]
        else:
            w = fuse([members.get(m) for m in km.modules], km.rows(members[next(iter(members))].down.shape[1]))
        if km.swap_halves:
            w = _swap_halves(w)
        if km.bake_scale and w.scale != 1.0:
            w = LoraWeights(w.down, w.up * w.scale, float(w.rank))
        out[f"{layout.prefixes[part]}_{name}"] = w
    return out


def from_kohya(loras: dict[str, LoraWeights], layout: KohyaLayout) -> dict[tuple[str, str], LoraWeights]:
    """kohya name -> LoRA  to  (part, diffusers module) -> LoRA."""
    out = {}
    for key, w in loras.items():
        part, name = layout.split_name(key)
        km = layout.module_named(part, name)
        if km.swap_halves:
            w = _swap_halves(w)
        if len(km.modules) == 1:
            out[(part, km.modules[0])] = w
            continue
        for module, piece in zip(km.modules, split(w, km.rows(w.down.shape[1]))):
            if piece is not None:
                out[(part, module)] = piece
    return out


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
    config = (src if src.is_dir() else src.parent) / "config.yaml"
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
