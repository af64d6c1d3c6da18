"""The kohya LoRA layout (sd-scripts; read by ComfyUI, A1111/Forge, kohya and diffusers) and its
conversion from and to diffusers' per-module LoRAs, knowing no family.

Keys ``{prefix}_{name}.lora_down.weight`` ``[r, in]``, ``.lora_up.weight`` ``[out, r]`` and ``.alpha``
(a scalar; scale = alpha / r), where the prefix names the part (``lora_unet``, ``lora_te``, ``lora_te1``)
and the name is the module path, ``_`` for ``.``, in the naming of the model's original code. Each
family describes its naming as a `KohyaLayout` (its ``kohya.py``); renaming, fusing and splitting
LoRAs and alpha are here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .. import DifftuneError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

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
