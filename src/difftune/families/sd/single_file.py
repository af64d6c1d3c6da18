"""One-file SD 1.x checkpoints (what ComfyUI, A1111/Forge and ``StableDiffusionPipeline.from_single_file``
load) from a diffusers pipeline: the UNet, VAE and CLIP text encoder renamed to the original
CompVis / LDM names, in one ``.safetensors`` file.

Names (the inverse of diffusers' single-file loader), for a UNet with ``L`` layers per block:

- UNet under ``model.diffusion_model.``: ``conv_in`` -> ``input_blocks.0.0``; down block ``i`` layer ``j``
  -> ``input_blocks.{1 + i(L+1) + j}`` (``.0`` resnet, ``.1`` attention), its downsampler ->
  ``input_blocks.{(i+1)(L+1)}.0.op``; the mid block -> ``middle_block.0/1/2``; up block ``i`` layer ``j``
  -> ``output_blocks.{i(L+1) + j}``, its upsampler -> ``output_blocks.{i(L+1) + L}.{1 or 2}.conv``; resnets
  rename ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` to ``in_layers.0, in_layers.2,
  emb_layers.1, out_layers.0, out_layers.3, skip_connection``; attention blocks keep their names.
- VAE under ``first_stage_model.``: ``down_blocks.i.resnets.j`` -> ``down.i.block.j``, up blocks in
  reverse order (``up_blocks.i`` -> ``up.{n-1-i}``), mid resnets -> ``mid.block_1/2``, mid attention ->
  ``mid.attn_1`` with ``q, k, v, proj_out, norm`` as 1x1 convolutions; ``conv_shortcut`` -> ``nin_shortcut``.
- CLIP under ``cond_stage_model.transformer.text_model.``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ... import DifftuneError

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_name(key: str, layers: int) -> str:
    """A diffusers UNet key -> its LDM name (without the ``model.diffusion_model.`` prefix)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * (layers + 1) + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * (layers + 1) + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    raise DifftuneError(f"single-file: no LDM name for the UNet weight {key!r}")


def vae_name(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL key -> its LDM name (without the ``first_stage_model.`` prefix)."""
    key = key.replace(".conv_norm_out.", ".norm_out.").replace(".conv_shortcut.", ".nin_shortcut.")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION.get(m[2], m[2])}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    return key


def state_dict(pipe: Any) -> dict[str, Any]:
    """The one-file state dict of an SD 1.x pipeline (fp weights as they are, contiguous, on the CPU)."""
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    if unet.config.use_linear_projection or type(text_encoder).__name__ != "CLIPTextModel":
        raise DifftuneError("--format single-file: only SD 1.x layouts are written (SD 2.x checkpoints keep their "
                            "text encoder in OpenCLIP's layout); use the diffusers folder")
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise DifftuneError("--format single-file: a UNet with per-block layer counts has no LDM layout")
    out: dict[str, Any] = {}
    attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    for key, value in unet.state_dict().items():
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            name = f"output_blocks.{i * (layers + 1) + layers}.{2 if i in attention else 1}.conv.{m[2]}"
        else:
            name = unet_name(key, layers)
        out[f"model.diffusion_model.{name}"] = value
    blocks = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = vae_name(key, blocks)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[f"first_stage_model.{name}"] = value
    for key, value in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{name}"] = value
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save(pipe: Any, file: Path) -> Path:
    """Write `pipe` as one ``.safetensors`` checkpoint at `file` (atomically); returns `file`."""
    import os

    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    save_file(state_dict(pipe), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)
    return file
