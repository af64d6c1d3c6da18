"""The tiny SDXL pipeline (``difftune tiny sdxl``): 64 px, latents 4 x 16 x 16, two CLIP text encoders."""

from __future__ import annotations

from pathlib import Path

from ..tiny_parts import autoencoder_kl, clip_text_config, clip_tokenizer, write_clip_vocab_files

#: image side in pixels the tiny pipeline is meant to be trained and sampled at
RESOLUTION = 64
#: model knobs ``make_tiny(..., **overrides)`` accepts, with their defaults
KNOBS = {"prediction_type": "epsilon"}
#: family name -> the pipeline folder of that family under the output folder ("" = the folder itself)
PIPELINES = {"sdxl": ""}
#: the size of each "time id" embedding (SDXL: 256) and the number of time ids
TIME_EMBED_DIM, TIME_IDS = 8, 6


def build(prediction_type: str):
    """A tiny ``StableDiffusionXLPipeline`` shaped like SDXL base.

    Text: a CLIP text encoder (hidden 32) and a CLIP text encoder with projection (hidden 32, text_embeds
    32); the UNet cross-attends to their concatenated hidden states (64) and adds the pooled embedding
    and 6 time ids (``addition_embed_type="text_time"``). VAE factor 4 (scaling_factor 0.13025); Euler
    scheduler with SDXL's training betas.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer))
    vae = autoencoder_kl(latent_channels=4, scaling_factor=0.13025)
    pooled = text_encoder_2.config.projection_dim
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED_DIM + pooled,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def write(out_dir: Path, **knobs) -> str:
    """Write the pipeline folder; returns what was written, for the command's output."""
    build(**knobs).save_pretrained(out_dir)
    write_clip_vocab_files(out_dir / "tokenizer")
    write_clip_vocab_files(out_dir / "tokenizer_2")
    return f"wrote tiny sdxl pipeline to {out_dir}"
