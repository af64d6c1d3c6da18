"""Bench presets of SDXL (`difftune bench --family sdxl --preset ...`)."""

from __future__ import annotations

from ..architectures import CLIP_L_TEXT, SD_VAE
from ..base import Preset

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.6B parameters)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32, "act_fn": "silu",
}
#: the SDXL VAE (factor 8, scaling factor 0.13025)
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
#: laion/CLIP-ViT-bigG-14 text tower with projection (SDXL text_encoder_2)
CLIP_BIGG_TEXT = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1280,
    "vocab_size": 49408,
}

#: family -> preset name -> Preset (see `Preset`)
PRESETS: dict[str, dict[str, Preset]] = {
    "sdxl": {
        "tiny": Preset(64),
        "small": Preset(256, {"unet": {
            "block_out_channels": [64, 128, 256], "layers_per_block": 1, "attention_head_dim": [2, 4, 8],
            "transformer_layers_per_block": [1, 1, 2],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}}, "SDXL-shaped UNet, 64-128-256"),
        "real": Preset(1024, {"unet": SDXL_UNET, "vae": SDXL_VAE, "text_encoder": CLIP_L_TEXT,
                              "text_encoder_2": CLIP_BIGG_TEXT}, "SDXL base 1.0"),
    },
}
