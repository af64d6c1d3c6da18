"""The tiny Stable Diffusion 1.x pipeline (``difftune tiny sd``): 64 px, latents 4 x 16 x 16."""

from __future__ import annotations

from pathlib import Path

from ..tiny_parts import autoencoder_kl, clip_text_config, clip_tokenizer, write_clip_vocab_files

#: image side in pixels the tiny pipeline is meant to be trained and sampled at
RESOLUTION = 64
#: model knobs ``make_tiny(..., **overrides)`` accepts, with their defaults
KNOBS = {"prediction_type": "epsilon"}
#: family name -> the pipeline folder of that family under the output folder ("" = the folder itself)
PIPELINES = {"sd": ""}


def build(prediction_type: str):
    """A tiny ``StableDiffusionPipeline`` shaped like SD 1.5.

    Latents 4 x H/4 x W/4 (VAE scaling_factor 0.18215); UNet with cross-attention dim 32 fed by a CLIP text
    encoder of hidden size 32; PNDM scheduler with SD 1.5's training betas; no safety checker.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    vae = autoencoder_kl(latent_channels=4, scaling_factor=0.18215)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=4,
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write(out_dir: Path, **knobs) -> str:
    """Write the pipeline folder; returns what was written, for the command's output."""
    build(**knobs).save_pretrained(out_dir)
    write_clip_vocab_files(out_dir / "tokenizer")
    return f"wrote tiny sd pipeline to {out_dir}"


def controlnet():
    """A ``ControlNetModel`` for this pipeline (``difftune tiny controlnet-sd``): made from the tiny UNet,
    its conditioning embedding downsampling by 4 (the tiny VAE's factor)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(build(**KNOBS).unet, conditioning_embedding_out_channels=(16, 32, 32))
