"""Bench presets of the Kandinsky 2.2 decoder (`difftune bench --family kandinsky22-decoder --preset ...`)."""

from __future__ import annotations

from ..base import Preset

#: kandinsky-community/kandinsky-2-2-decoder unet/config.json (1.2B parameters)
K22_DECODER_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 8, "act_fn": "silu", "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64, "attention_head_dim": 64, "block_out_channels": [384, 768, 1152, 1536],
    "cross_attention_dim": 768, "cross_attention_norm": "group_norm",
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "encoder_hid_dim": 1280, "encoder_hid_dim_type": "image_proj",
    "layers_per_block": 3, "norm_num_groups": 32, "norm_eps": 1e-5, "resnet_time_scale_shift": "scale_shift",
    "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
}
#: kandinsky-2-2-decoder movq/config.json (factor 8)
K22_MOVQ = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 16384,
    "block_out_channels": [128, 256, 256, 512], "layers_per_block": 2, "norm_num_groups": 32, "norm_type": "spatial",
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
    "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "sample_size": 32,
}
#: kandinsky-2-2-prior image_encoder (OpenCLIP ViT-bigG/14 vision tower, 1280-dim image embeddings); the
#: input size stays the tiny processor's, which changes no output shape
K22_IMAGE_ENCODER = {
    "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 16,
    "projection_dim": 1280, "hidden_act": "gelu",
}

#: family -> preset name -> Preset (see `Preset`)
PRESETS: dict[str, dict[str, Preset]] = {
    "kandinsky22-decoder": {
        "tiny": Preset(64),
        "small": Preset(256, {"unet": {
            "block_out_channels": [64, 128, 256], "layers_per_block": 1, "attention_head_dim": 32,
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]}},
            "decoder-shaped UNet, 64-128-256"),
        "real": Preset(768, {"unet": K22_DECODER_UNET, "movq": K22_MOVQ, "image_encoder": K22_IMAGE_ENCODER},
                       "Kandinsky 2.2 decoder"),
    },
}
