"""The kohya layout of FLUX LoRAs: Black Forest Labs' module names (what kohya's sd-scripts trains
and ComfyUI, Forge and diffusers read), where q, k and v (and, in single blocks, the MLP input) are
one fused linear layer."""

from __future__ import annotations

from ... import DifftuneError
from ...formats.kohya import KohyaLayout, KohyaModule


def _same(n: int):
    return lambda d: (d,) * n


def _single_linear1(d: int) -> tuple[int, ...]:
    # linear1 = [q; k; v; mlp_in], MLP width 4 * hidden (FluxSingleTransformerBlock's mlp_ratio)
    return (d, d, d, 4 * d)


_DOUBLE = {  # BFL name in double_blocks_{i}_ -> diffusers modules in transformer_blocks.{i}.
    "img_attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), _same(3)),
    "img_attn_proj": (("attn.to_out.0",), None),
    "img_mlp_0": (("ff.net.0.proj",), None),
    "img_mlp_2": (("ff.net.2",), None),
    "img_mod_lin": (("norm1.linear",), None),
    "txt_attn_qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), _same(3)),
    "txt_attn_proj": (("attn.to_add_out",), None),
    "txt_mlp_0": (("ff_context.net.0.proj",), None),
    "txt_mlp_2": (("ff_context.net.2",), None),
    "txt_mod_lin": (("norm1_context.linear",), None),
}
_SINGLE = {  # BFL name in single_blocks_{i}_ -> diffusers modules in single_transformer_blocks.{i}.
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), _single_linear1),
    "linear2": (("proj_out",), None),
    "modulation_lin": (("norm.linear",), None),
}
_GLOBAL = {  # BFL name -> diffusers module, outside the blocks
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
_FINAL = ("final_layer_linear", "final_layer_adaLN_modulation_1")


class FluxKohyaLayout(KohyaLayout):
    """FLUX transformer modules under their BFL names; CLIP (``lora_te1``) keeps the plain layout.

    - ``double_blocks_{i}_{img,txt}_attn_qkv`` fuse the q, k, v LoRAs of each stream and
      ``single_blocks_{i}_linear1`` those of q, k, v and ``proj_mlp`` (see `KohyaLayout.fuse`).
    - ``final_layer_adaLN_modulation_1`` emits (shift, scale) where diffusers' ``norm_out.linear``
      emits (scale, shift): its output rows trade halves. Its scale is folded into the weights
      (alpha = rank), because diffusers' reader ignores alpha for the final layer.
    """

    def module_for(self, part: str, module: str) -> KohyaModule:
        if part != "transformer":
            return super().module_for(part, module)
        head, _, rest = module.partition(".")
        if head in ("transformer_blocks", "single_transformer_blocks"):
            index, _, inner = rest.partition(".")
            table, bfl, block = (_DOUBLE, "double_blocks", "transformer_blocks") if head == "transformer_blocks" else (
                _SINGLE, "single_blocks", "single_transformer_blocks")
            for name, (members, rows) in table.items():
                if inner in members:
                    return KohyaModule(f"{bfl}_{index}_{name}", tuple(f"{block}.{index}.{m}" for m in members), rows)
        for name, target in _GLOBAL.items():
            if module == target:
                final = name in _FINAL
                return KohyaModule(name, (target,), swap_halves=name == _FINAL[1], bake_scale=final)
        raise DifftuneError(f"FLUX transformer module {module!r} has no name in the kohya (BFL) layout")

    def module_named(self, part: str, name: str) -> KohyaModule:
        if part != "transformer":
            return super().module_named(part, name)
        for bfl, block, table in (("double_blocks_", "transformer_blocks", _DOUBLE),
                                  ("single_blocks_", "single_transformer_blocks", _SINGLE)):
            if name.startswith(bfl):
                index, _, inner = name[len(bfl):].partition("_")
                if index.isdigit() and inner in table:
                    members, rows = table[inner]
                    return KohyaModule(name, tuple(f"{block}.{index}.{m}" for m in members), rows)
        if name in _GLOBAL:
            return KohyaModule(name, (_GLOBAL[name],), swap_halves=name == _FINAL[1], bake_scale=name in _FINAL)
        raise DifftuneError(f"lora_unet_{name}: not a FLUX module name in the kohya (BFL) layout")
