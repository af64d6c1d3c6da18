"""Bench presets of Stable Diffusion 1.x (`difftune bench --family sd --preset ...`)."""

from __future__ import annotations

from ..architectures import CLIP_L_TEXT, SD_VAE
from ..base import Preset

#: runwayml/stable-diffusion-v1-5 unet/config.json (860M parameters)
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

#: family -> preset name -> Preset (see `Preset`)
PRESETS: dict[str, dict[str, Preset]] = {
    "sd": {
        "tiny": Preset(64),
        "small": Preset(256, {"unet": {
            "block_out_channels": [64, 128, 256], "layers_per_block": 1, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}}, "SD-shaped UNet, 64-128-256"),
        "real": Preset(512, {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L_TEXT}, "SD 1.5"),
    },
}
