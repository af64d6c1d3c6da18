"""Bench presets of FLUX.1 (`difftune bench --family flux --preset ...`)."""

from __future__ import annotations

from ..architectures import CLIP_L_TEXT, SD_VAE
from ..base import Preset

FLUX_VAE = {**SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
#: google/t5-v1_1-xxl encoder (FLUX.1 text_encoder_2, 4.7B parameters)
T5_XXL = {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "tie_word_embeddings": False, "vocab_size": 32128,
}
#: black-forest-labs/FLUX.1-dev transformer/config.json (11.9B parameters)
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

#: family -> preset name -> Preset (see `Preset`)
PRESETS: dict[str, dict[str, Preset]] = {
    "flux": {
        "tiny": Preset(64),
        "small": Preset(256, {"transformer": {
            "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4,
            "axes_dims_rope": [8, 28, 28]}}, "FLUX-shaped, 2+4 blocks, width 256"),
        "real": Preset(1024, {"transformer": FLUX1_DEV_TRANSFORMER, "vae": FLUX_VAE, "text_encoder": CLIP_L_TEXT,
                              "text_encoder_2": T5_XXL}, "FLUX.1-dev"),
    },
}
