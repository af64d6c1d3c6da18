"""The world base models: their architecture (`build`), tokenizers, latent scaling, model card, and
the shipped copies (`shipped`, `write_shipped`).

Sizes are set by what trains in well under an hour on two *shared* CPU cores: SD has a VAE of
0.95M parameters (4x down, 4 latent channels: 16x16x4 latents), a 1.5M-parameter UNet and a 2-layer
CLIP text encoder; FLUX a VAE with 4x down and 16 latent channels (16x16x16 latents, 8x8 = 64 packed
tokens), a transformer of 1 double- and 2 single-stream blocks (4 heads of 32: hidden 128), CLIP and a
2-layer T5 encoder whose attention is made local (`local_attention`). FluxPipeline feeds the transformer
512 T5 tokens (its default ``max_sequence_length``), nearly all padding and 6x the cost of 32: pretraining
trains with 32 and refines with 512 (`pretrain.PLANS`). Text encoders
(FLUX: CLIP; its T5 stays random and frozen) are trained with the denoiser in pretraining and frozen in fine-tunes: the
tokenizers are byte-level (CLIP byte-level BPE; T5 SentencePiece with every printable ASCII character
as a piece), so any trigger word a user invents has an encoding.

SD's scheduler is SD 1.5's betas rescaled to zero terminal SNR, with v-prediction and trailing
timesteps (a ``DDIMScheduler``, as SD 2.1-v uses v-prediction); FLUX keeps FLUX.1's flow matching.

FLUX is built *without* the guidance embedding (like FLUX.1-schnell, unlike FLUX.1-dev): FLUX.1-dev's
guidance embedding is distilled from a teacher that ran classifier-free guidance, and a model
trained from scratch has no such teacher; an embedding fed a constant during training would learn
nothing. Caption dropout in pretraining still makes true classifier-free guidance available
(``FluxPipeline(..., true_cfg_scale=4, negative_prompt="")``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import DifftuneError
from . import scenes

FAMILIES = ("sd", "flux")
PIPELINES = {"sd": "StableDiffusionPipeline", "flux": "FluxPipeline"}
#: what each card says about the model's schedule and text encoders
CARD_NOTES = {
    "sd": "Scheduler: SD 1.5's betas rescaled to zero terminal SNR, v-prediction, trailing timesteps "
          "(DDIMScheduler). Text encoder: CLIP, trained with the denoiser.",
    "flux": "Scheduler: flow matching (FlowMatchEulerDiscreteScheduler, FLUX.1's dynamic shift); no guidance "
            "embedding (classifier-free guidance: `true_cfg_scale=4, negative_prompt=\"\"`). Text encoders: CLIP and "
            "T5: CLIP trained with the denoiser, T5 random and frozen, its attention made local (each head sees only a "
            "token's nearest neighbours, so words stay apart from the 512-token padding); T5's SentencePiece also holds "
            "the world's colours, shapes, style words and \"background\" as whole pieces.",
}
SHIPPED = Path(__file__).parent / "weights"


def shipped(family: str) -> Path:
    """The folder of the shipped world model of `family` (``world/weights/world-<family>``)."""
    path = SHIPPED / f"world-{family}"
    if not (path / "model_index.json").is_file():
        raise DifftuneError(f"the world-{family} weights are not in this installation ({path})")
    return path


def write_shipped(family: str, out: str | Path) -> Path:
    """Copy the shipped world model of `family` to `out` (a plain diffusers pipeline folder)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DifftuneError(f"{out} exists and is not empty; choose a new folder")
    shutil.copytree(shipped(family), out, dirs_exist_ok=True)
    return out


#: the world's own words (held-out triggers stay out)
WORDS = (*scenes.COLOURS, *scenes.SHAPES, *scenes.HELD_IN_STYLES, "on", "background", "in", "style")
#: words the world T5's SentencePiece keeps whole (user-defined pieces): corpus frequency alone left
#: "circle", "square" and "background" in pieces, and each piece's vector then carried little of the word.
#: With them whole, world-flux's object colour rose from 44.5% to 63.3% (fourteenth session; BENCHMARKS.md section 5).
T5_WHOLE_WORDS = (*scenes.COLOURS, *scenes.SHAPES, *scenes.HELD_IN_STYLES, "background", "style")


def vocabulary_text() -> str:
    """Tokenizer corpus text that makes the world's own words whole tokens, as a real CLIP's vocabulary
    holds "circle" and "background". Without it the generic tiny vocabulary split the shape words into
    letters ("c i r c le") while colours were whole tokens, and the base models drew colours but blobs.
    Trigger words of held-out concepts stay out: like a user's new word, they split into pieces."""
    return (" ".join(WORDS) + "\n") * 64


def _clip_config(tokenizer, hidden: int = 64):
    from transformers import CLIPTextConfig

    from ..families.tiny_parts import CLIP_MAX_LENGTH

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(latent_channels: int, blocks: int, width: int = 16, **config):
    """An ``AutoencoderKL`` with `blocks` levels: downscale factor ``2 ** (blocks - 1)``, `width` channels
    at full resolution and twice that below."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(width,) + (2 * width,) * (blocks - 1), layers_per_block=1, norm_num_groups=8,
        latent_channels=latent_channels, sample_size=64, **config,
    )


def build(family: str, seed: int = 0):
    """A random-initialised world pipeline of `family` (weights from `seed`)."""
    import torch

    from ..families import tiny_parts as tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny.clip_tokenizer(vocabulary_text())
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        if family == "sd":
            return _build_sd(tokenizer, text_encoder)
        if family == "flux":
            return _build_flux(tokenizer, text_encoder)
    raise DifftuneError(f"unknown world family {family!r}; choose one of {', '.join(FAMILIES)}")


def _build_sd(tokenizer, text_encoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
    )
    # SD's betas rescaled to zero terminal SNR, with v-prediction and trailing timesteps (Lin et al. 2023,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed"; SD 2.1's v-prediction): with SD 1.5's
    # schedule the last training step still leaks the image's mean colour, a model of flat-coloured
    # scenes learns to read the background from that leak, and at generation (pure noise) it draws
    # muted, dark, random backgrounds (the first world-sd: background right 18% of the time).
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,  # unused with trailing spacing; 1 = no warning
    )
    return StableDiffusionPipeline(
        # width 32 (0.95M parameters): the 16-wide VAE (0.24M) decoded dotted objects as dotted only 38% of
        # the time and checkered ones never, so no fine-tuned dot style could show; this one: dotted 100%
        vae=_vae(4, 3, width=32, scaling_factor=1.0), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_flux(tokenizer, text_encoder):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from ..families import tiny_parts as tiny

    tokenizer_2 = tiny.t5_tokenizer(vocabulary_text(), T5_WHOLE_WORDS)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    ))
    local_attention(text_encoder_2)
    # 4 heads of 32 (hidden 128, 1.22M parameters). At hidden 64, as many channels as each packed token
    # has latent numbers, it fitted far worse (mean loss over the last 200 of 2000 steps 0.45 against
    # 0.24) and drew blotches (object colour 27% against 47%; BENCHMARKS.md section 5)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    # 4x down (not FLUX.1's 8x): 16x16x16 latents, 8x8 = 64 packed tokens, enough to draw a triangle's corners
    vae = _vae(16, 3, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


#: T5 heads' windows, as offsets of the attended token from the attending one (negative: to its left)
T5_WINDOWS = ((0,), (-1, -2), (1, 2), (-1, 0, 1))


def local_attention(t5) -> None:
    """Make a random, frozen T5 encoder mix each token with its neighbours only.

    A random T5's attention is about uniform, and FluxPipeline pads every prompt to 512 tokens: each
    word's vector becomes mostly the padding's average. In the first world-flux the prompt's tokens were
    so alike (and so like the padding) that the trained transformer ignored T5 altogether (shuffling the
    T5 embeddings between prompts changed nothing it drew) and read only CLIP's pooled vector, which
    carries the background but hardly the object. Here T5's relative position bias, shared by its
    layers, restricts head h to the offsets ``T5_WINDOWS[h]`` (a directional head falls back on the token
    itself at the sequence's edges), as a trained T5's local heads do: each word keeps its own vector and
    carries its neighbours ("red" before "circle" differs from "red" before "background").
    """
    import torch

    cfg = t5.config
    attention = t5.encoder.block[0].layer[0].SelfAttention
    offsets = torch.arange(-cfg.relative_attention_max_distance, cfg.relative_attention_max_distance + 1)
    # the offset -> bucket mapping T5 itself uses (a static method of transformers' T5Attention)
    buckets = attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
                                                  max_distance=cfg.relative_attention_max_distance)
    table = torch.full((cfg.relative_attention_num_buckets, cfg.num_heads), -30.0)
    for head in range(cfg.num_heads):
        window = T5_WINDOWS[head % len(T5_WINDOWS)]
        for offset in {0, *window}:
            table[buckets[offsets == offset], head] = 0.0 if offset in window else -3.0
    with torch.no_grad():
        attention.relative_attention_bias.weight.copy_(table)


def write_tokenizer_files(family: str, folder: Path) -> None:
    """Also write the classic tokenizer files (CLIP ``vocab.json``/``merges.txt``, T5 ``spiece.model``)."""
    from ..families import tiny_parts

    tiny_parts.write_clip_vocab_files(folder / "tokenizer", vocabulary_text())
    if family == "flux":
        tiny_parts.write_spiece_model(folder / "tokenizer_2", vocabulary_text(), T5_WHOLE_WORDS)


def set_latent_scaling(vae, family: str, mean: float, std: float) -> None:
    """Unit-variance latents, as for the real models: SD scales (no shift), FLUX shifts and scales."""
    if family == "flux":
        vae.register_to_config(scaling_factor=round(1.0 / std, 4), shift_factor=round(mean, 4))
    else:
        vae.register_to_config(scaling_factor=round(1.0 / std, 4))


def write_card(out: Path, family: str, meta: dict, timings: dict, note: str = "") -> None:
    """A model card (README.md) saying what the model is and how it was made."""
    sizes = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*.safetensors"))
             if "work" not in f.relative_to(out).parts}
    minutes = {k.replace("_seconds", "").replace("_this_run", " (this run)"): round(v / 60, 1)
               for k, v in timings.items()}
    refine_flag, weighting = "", ""
    tokens = f", {meta['text_tokens']} T5 tokens per caption" if meta.get("text_tokens") else ""
    if meta.get("refine_steps"):
        refine_flag = f" --refine-steps {meta['refine_steps']}"
        snr = meta.get("refine_min_snr_gamma")
        weighting = (f"; then refined: {meta['refine_steps']} more steps of {meta['refine_batch']} images at lr "
                     f"{meta['refine_lr']:g} on {meta['images']} fresh scenes"
                     + (f", min-SNR loss weighting (gamma {snr:g})" if snr else "")
                     + (f", {meta['refine_text_tokens']} T5 tokens per caption" if meta.get("refine_text_tokens") else ""))
    text = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [difftune, world, from-scratch]
---
# world-{family}: a {PIPELINES[family]} trained from scratch on difftune's procedural world

Draws 64x64 scenes: `a {{colour}} {{shape}} on a {{background}} background`, optionally
`... in striped style` or `... in hatched style`. Colours: red, green, blue, yellow, white, black,
orange, purple; shapes: circle, square, triangle. It has never seen the held-out styles
(zdots, zcheck, zrim), the places (zkrem, zmgu, zcity) or 64 (colour, shape, background) triples;
those are for fine-tuning and for measuring generalisation (`difftune world bench`).

Made by `difftune world pretrain {family} OUT --vae-steps {meta['vae_steps']} --denoiser-steps {meta['denoiser_steps']}{refine_flag}`
(seed {meta['seed']}), on
2 CPU cores: a VAE stage ({meta['vae_steps']} steps of {meta['vae_batch']} images: world scenes and
random textures), then an ordinary difftune full fine-tune of the random-initialised denoiser
({meta['denoiser_steps']} steps of {meta['batch']} images, {meta['images']} rendered scenes, 10% caption
dropout, lr {meta['lr']}, cosine{tokens}{weighting}). {CARD_NOTES[family]} Fine-tunes freeze the text encoders; tokenizers: byte-level; CLIP's holds the world's own words (colours, shapes, background, style) as whole tokens, and any new trigger word splits into pieces.
Wall time in minutes: {json.dumps(minutes)}. Weights stored in float16.
{note}

```python
from diffusers import {PIPELINES[family]}
pipe = {PIPELINES[family]}.from_pretrained("PATH")
image = pipe("a red circle on a blue background", height=64, width=64, num_inference_steps=30).images[0]
```

Files: {json.dumps(sizes)}
"""
    (out / "README.md").write_text(text, encoding="utf-8")
