"""Published architectures (``config.json`` of each part) that several families share, for the bench's
random-weight ``real`` presets."""

#: the SD 1.x / FLUX.1 VAE encoder-decoder (factor 8); FLUX.1 has 16 latent channels and a shift
SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
#: openai/clip-vit-large-patch14 text tower (SD 1.5 text_encoder, FLUX.1 text_encoder)
CLIP_L_TEXT = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "vocab_size": 49408,
}
