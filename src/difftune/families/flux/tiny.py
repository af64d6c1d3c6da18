"""The tiny FLUX.1 pipeline (``difftune tiny flux``): 64 px, latents 16 x 16 x 16 packed into 64 tokens."""

from __future__ import annotations

from pathlib import Path

from ..tiny_parts import (
    autoencoder_kl, clip_text_config, clip_tokenizer, t5_tokenizer, write_clip_vocab_files, write_spiece_model,
)

#: image side in pixels the tiny pipeline is meant to be trained and sampled at
RESOLUTION = 64
#: model knobs ``make_tiny(..., **overrides)`` accepts, with their defaults
KNOBS = {"guidance_embeds": True}
#: family name -> the pipeline folder of that family under the output folder ("" = the folder itself)
PIPELINES = {"flux": ""}


def build(guidance_embeds: bool):
    """A tiny ``FluxPipeline`` shaped like FLUX.1-dev (FLUX.1-schnell with ``guidance_embeds=False``).

    VAE latents 16 x H/4 x W/4 (scaling_factor 0.3611, shift_factor 0.1159), packed 2x2 into tokens of 64
    channels; the transformer has 1 double-stream and 1 single-stream block, 2 heads of dim 16, rope axes
    (4, 6, 6). Text: CLIP (hidden 32, pooled output -> ``pooled_projection_dim``) and T5 encoder
    (d_model 32 -> ``joint_attention_dim``). Flow-matching scheduler with FLUX-dev's dynamic shifting.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    vae = autoencoder_kl(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def write(out_dir: Path, **knobs) -> str:
    """Write the pipeline folder; returns what was written, for the command's output."""
    build(**knobs).save_pretrained(out_dir)
    write_clip_vocab_files(out_dir / "tokenizer")
    write_spiece_model(out_dir / "tokenizer_2")
    return f"wrote tiny flux pipeline to {out_dir}"


def controlnet():
    """A ``FluxControlNetModel`` for this pipeline (``difftune tiny controlnet-flux``): made from the tiny
    transformer, 1 double and 1 single block."""
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_transformer(
        build(**KNOBS).transformer, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2
    )
