"""kohya names of SDXL LoRAs: ``lora_unet_*`` for the UNet (diffusers module paths, which kohya's
loaders and diffusers read for SDXL), ``lora_te1_*`` and ``lora_te2_*`` for the two text encoders."""

from __future__ import annotations

from ...formats.kohya import KohyaLayout


def layout() -> KohyaLayout:
    return KohyaLayout({"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
                       clip_parts=("text_encoder", "text_encoder_2"))
