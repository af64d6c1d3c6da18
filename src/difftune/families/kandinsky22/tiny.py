"""The tiny Kandinsky 2.2 pair (``difftune tiny kandinsky22``): ``OUT/prior`` and ``OUT/decoder``, 64 px."""

from __future__ import annotations

from pathlib import Path

from ..tiny_parts import CLIP_MAX_LENGTH, clip_text_config, clip_tokenizer, write_clip_vocab_files

#: image side in pixels the tiny pipeline is meant to be trained and sampled at
RESOLUTION = 64
#: model knobs ``make_tiny(..., **overrides)`` accepts, with their defaults
KNOBS = {"prediction_type": "epsilon"}
#: family name -> the pipeline folder of that family under the output folder ("" = the folder itself)
PIPELINES = {"kandinsky22-prior": "prior", "kandinsky22-decoder": "decoder"}
#: family name -> config key -> the pipeline folder it names (the decoder's prior)
COMPANIONS = {"kandinsky22-decoder": {"model.options.prior": "prior"}}


def build(prediction_type: str):
    """A tiny Kandinsky 2.2 pair ``(KandinskyV22PriorPipeline, KandinskyV22Pipeline)``.

    Prior: CLIP text encoder with projection (hidden 32, text_embeds 32), CLIP vision encoder with projection
    (32 px images, patch 8, hidden 48, image_embeds 32), ``PriorTransformer`` denoising 32-dim image
    embeddings (``prediction_type="sample"``, UnCLIP scheduler). Decoder: UNet conditioned only on the
    32-dim image embedding (``image_proj`` cross-attention tokens + ``image`` time embedding), predicting
    noise and variance (8 = 2 x 4 output channels); MoVQ with 4 latent channels and downscale factor 4.
    """
    import torch
    from diffusers import (
        DDPMScheduler,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    image_size = 32
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer))
    # CLIP's text and image projections share one space; the prior denoises vectors of that size.
    image_embed_dim = text_encoder.config.projection_dim
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=48,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            projection_dim=image_embed_dim,
        )
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        embedding_dim=image_embed_dim,
        num_embeddings=CLIP_MAX_LENGTH,
        additional_embeddings=4,
    )
    # The real prior stores CLIP image-embedding statistics here; the zero init would collapse every
    # generated embedding to 0, so use the identity de-normalisation instead.
    with torch.no_grad():
        prior.clip_mean.zero_()
        prior.clip_std.fill_(1.0)
    prior_scheduler = UnCLIPScheduler(
        num_train_timesteps=1000,
        variance_type="fixed_small_log",
        clip_sample=True,
        clip_sample_range=10.0,
        prediction_type="sample",
    )
    prior_pipeline = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=prior_scheduler,
        image_processor=image_processor,
    )

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=16,
        encoder_hid_dim=image_embed_dim,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        resnet_time_scale_shift="scale_shift",
    )
    # MoVQ's spatial norm hard-codes 32 groups, so every decoder width must be a multiple of 32.
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        vq_embed_dim=4,
        num_vq_embeddings=64,
        norm_num_groups=8,
        norm_type="spatial",
        sample_size=64,
    )
    # kandinsky-2-2-decoder's schedule; with the default variance_type "fixed_small" the pipeline drops the
    # UNet's variance channels when sampling.
    decoder_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    decoder_pipeline = KandinskyV22Pipeline(unet=unet, scheduler=decoder_scheduler, movq=movq)
    return prior_pipeline, decoder_pipeline


def write(out_dir: Path, **knobs) -> str:
    """Write both pipeline folders; returns what was written, for the command's output."""
    prior, decoder = build(**knobs)
    prior.save_pretrained(out_dir / "prior")
    decoder.save_pretrained(out_dir / "decoder")
    write_clip_vocab_files(out_dir / "prior" / "tokenizer")
    return f"wrote tiny kandinsky22 prior to {out_dir / 'prior'} and decoder to {out_dir / 'decoder'}"
