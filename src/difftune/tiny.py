"""Tiny, randomly initialised text-to-image pipelines for offline tests and demos.

difftune is developed and tested without network access, so no real model weights or tokenizers can be
downloaded. This module builds stand-ins that have the *shape conventions* of the real models but at most
about a million parameters per model (a few MB per pipeline on disk):

* offline tokenizers trained on a small built-in English corpus: a byte-level BPE CLIP tokenizer (the
  ``</w>`` end-of-word convention of ``openai/clip-vit-large-patch14``) and a SentencePiece unigram T5
  tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, like ``google/t5-v1_1-xxl``);
* complete diffusers pipeline folders (``model_index.json`` plus one sub-folder per component) for
  Stable Diffusion 1.x, FLUX.1-dev and Kandinsky 2.2 (prior and decoder), loadable with
  ``diffusers.DiffusionPipeline.from_pretrained``.

The tiny models deliberately use a VAE/MoVQ downscale factor of 4 instead of the real 8, so code that
hard-codes 8 instead of reading ``2 ** (len(vae.config.block_out_channels) - 1)`` fails on them.

Heavy libraries (torch, diffusers, transformers, sentencepiece) are imported inside the functions that need
them so that importing this module, and therefore the CLI, stays fast.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import string
import tempfile
from pathlib import Path
from typing import Any

from difftune import DifftuneError

FAMILIES = ("sd", "flux", "kandinsky22")
"""Model families `make_tiny` can build."""

TINY_RESOLUTION = {"sd": 64, "flux": 64, "kandinsky22": 64}
"""Image side length in pixels the tiny pipelines of each family are meant to be trained and sampled at.

64 px gives 16x16 latents for all families (downscale factor 4); FLUX packs them into 8x8 = 64 tokens.
"""

CLIP_MAX_LENGTH = 77
"""Sequence length of the CLIP tokenizers and text encoders (as in real CLIP)."""

T5_MAX_LENGTH = 512
"""``model_max_length`` of the T5 tokenizer (FLUX.1-dev's ``max_sequence_length``)."""

EXAMPLES = """examples:
  difftune tiny sd runs/tiny-sd
  difftune tiny flux runs/tiny-flux --seed 1
  difftune tiny kandinsky22 runs/tiny-k22      # writes runs/tiny-k22/prior and runs/tiny-k22/decoder
  difftune tiny world-sd world-sd              # the shipped world base model (trained, not random)
  difftune tiny world-flux world-flux
"""

WORLD = ("world-sd", "world-flux")
"""The shipped, pretrained world base models (`difftune.world`), written out by the same command."""

_CLIP_TARGET_VOCAB = 1000
_T5_TARGET_VOCAB = 1000

# Model knobs `make_tiny(..., **overrides)` accepts per family, with their defaults.
_KNOBS: dict[str, dict[str, Any]] = {
    "sd": {"prediction_type": "epsilon"},
    "flux": {"guidance_embeds": True},
    "kandinsky22": {"prediction_type": "epsilon"},
}

_CORPUS = """\
A photo of sks dog. A photo of a sks dog sitting on the grass. A close-up photo of sks dog with a red collar.
A painting of sks cat in the style of Vincent van Gogh. An oil painting of a blue cat, impressionist style.
A watercolor painting of a small house near a lake at sunset. A portrait photo of a woman with long hair.
A drawing of a man wearing a hat and a coat. A sketch of a bird on a branch, pencil on paper, black and white.
A 3D render of a cute robot toy. A digital illustration of a castle in the mountains, fantasy art, detailed.
A pixel art sprite of a knight. A cartoon of a happy dog playing with a ball in the park.
A cat sleeping on a sofa next to the window. Two dogs running on the beach under a cloudy sky.
A red car parked in front of a white building. A green apple and a yellow banana on a wooden table.
A bowl of soup, food photography, soft light, shallow depth of field, 50mm lens, f/1.8, bokeh.
A cinematic shot of a city street at night, neon lights, rain, reflections, 4k, 8k, high quality.
A landscape photo of snowy mountains and a forest, golden hour, wide angle, award winning photograph.
An abstract painting with orange, purple, pink and brown shapes. A minimalist poster with gray lines.
A vintage photograph of an old train station, 1920s, film grain. A macro shot of a flower with dew drops.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.
Stable Diffusion, FLUX and Kandinsky turn text prompts into images. Fine-tuning teaches a model a new
subject or a new style from a handful of pictures: DreamBooth binds a rare token such as sks to the
subject, LoRA trains small low-rank adapters, and textual inversion learns a new word embedding.
Use 5 to 20 images, 512x512 or 1024x1024 pixels, with captions like "a photo of sks dog" or
"a painting in sks style". Train for 400, 800 or 1200 steps at a learning rate of 1e-4 or 5e-6.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 100 256 1000 2024 3.14 -1 +2 50% #1 @home $9 & more.
Letters: a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z.
Style words: anime, manga, comic, baroque, renaissance, cubist, surreal, realistic, photorealistic, studio,
ghibli, ukiyo-e, pop art, art nouveau, steampunk, cyberpunk, low poly, isometric, claymation, origami.
Objects: a teapot, a backpack, a clock, a vase, a candle, a sneaker, a guitar, a lamp, a chair, a mug.
Animals: dog, cat, horse, fox, owl, rabbit, bear, lion, tiger, panda, duck, fish, turtle, frog, corgi.
Colors: red, blue, green, yellow, orange, purple, pink, black, white, gray, brown, gold, silver, teal.
Places: a kitchen, a garden, a desert, a jungle, a river, a bridge, a temple, a library, space, the moon.
"""


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Train the tiny CLIP BPE on `_CORPUS`; returns ``(tokens, merges)`` with ``tokens[i]`` the token of id ``i``.

    The vocabulary is laid out like OpenAI CLIP's: the 256 byte-level symbols, the same 256 symbols with the
    ``</w>`` end-of-word suffix, one token per merge in merge order, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the two highest ids. Every input string therefore encodes without unknown tokens.

    The merges are learned here rather than with ``tokenizers.trainers.BpeTrainer``, whose tie-breaking
    between equally frequent pairs differs from process to process: the most frequent adjacent pair wins,
    ties go to the smallest pair, so the same corpus always gives the same vocabulary.
    """
    from collections import Counter

    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    # CLIP's text cleaning and word split (as in OpenAI's tokenizer and transformers' CLIPTokenizer): lower
    # case, then letter runs, single digits and punctuation runs, each mapped to byte-level symbols.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    word_counts = Counter(
        piece
        for line in _CORPUS.splitlines()
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    # Each word is a tuple of symbols whose last symbol carries the end-of-word suffix.
    words = {(*word[:-1], word[-1] + "</w>"): count for word, count in word_counts.items()}
    n_merges = _CLIP_TARGET_VOCAB - 2 * len(byte_symbols) - 2
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best, _ = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        merges.append(best)
        words = {_merge_pair(symbols, best): count for symbols, count in words.items()}
    tokens = (
        byte_symbols
        + [symbol + "</w>" for symbol in byte_symbols]
        + [left + right for left, right in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    return tuple(dict.fromkeys(tokens)), tuple(merges)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of `pair` in `symbols` (left to right) by its concatenation."""
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def _write_clip_vocab_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (OpenAI CLIP's own file format) into `directory`."""
    tokens, merges = _clip_bpe()
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def clip_tokenizer():
    """The tiny offline CLIP tokenizer (a ``transformers.CLIPTokenizer``).

    1000 tokens; ``<|startoftext|>`` (bos, id 998) and ``<|endoftext|>`` (eos, pad and unk, id 999, as in
    ``openai/clip-vit-large-patch14``) are the two highest ids; ``model_max_length`` is 77. Words are
    byte-level BPE pieces, the last piece of a word carrying the ``</w>`` suffix, e.g.
    ``"a photo of sks dog"`` -> ``<|startoftext|> a</w> photo</w> of</w> sks</w> dog</w> <|endoftext|>``.
    Built from ``vocab.json``/``merges.txt``, the files every transformers version reads.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write_clip_vocab_files(directory)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH}
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(directory)


@functools.lru_cache(maxsize=1)
def _t5_sentencepiece_model() -> bytes:
    """Train the tiny T5 SentencePiece unigram model on `_CORPUS`; returns the serialized ``spiece.model``.

    Ids follow T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no bos. All printable ASCII characters are kept as
    pieces, so only non-ASCII characters map to ``<unk>``. No text normalisation (identity rule), which
    matches what transformers' T5 tokenizer does with the model. Single-threaded training is deterministic.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()),
        model_writer=model,
        model_type="unigram",
        vocab_size=_T5_TARGET_VOCAB,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        required_chars=string.printable.strip(),
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_spiece_model(directory: Path) -> None:
    """Write the SentencePiece model as ``spiece.model`` (T5's own file format) into `directory`."""
    (directory / "spiece.model").write_bytes(_t5_sentencepiece_model())


def t5_tokenizer():
    """The tiny offline T5 tokenizer (a ``transformers.T5TokenizerFast``), as FLUX's ``tokenizer_2``.

    A SentencePiece unigram vocabulary of a few hundred pieces: ``<pad>``=0, ``</s>``=1 (appended to every
    sequence), ``<unk>``=2, no sentinel ``<extra_id_*>`` tokens; ``model_max_length`` is 512.
    Built from ``spiece.model``, the file every transformers version reads.
    """
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write_spiece_model(directory)
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0}
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------
# Model components
# ---------------------------------------------------------------------------------------------------------


def _clip_text_config(tokenizer):
    """Tiny CLIP text tower: hidden 32, 2 layers, 4 heads, MLP 37, 77 positions, the tokenizer's vocab.

    ``projection_dim`` (32) only matters for ``CLIPTextModelWithProjection`` (the ``text_embeds`` size).
    """
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _autoencoder_kl(latent_channels: int, **config):
    """Tiny ``AutoencoderKL``: 3 blocks (downscale factor 4), 1 layer per block, 8 norm groups."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=64,
        **config,
    )


def _build_sd(prediction_type: str):
    """A tiny ``StableDiffusionPipeline`` shaped like SD 1.5.

    Latents 4 x H/4 x W/4 (VAE scaling_factor 0.18215); UNet with cross-attention dim 32 fed by a CLIP text
    encoder of hidden size 32; PNDM scheduler with SD 1.5's training betas; no safety checker.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    vae = _autoencoder_kl(latent_channels=4, scaling_factor=0.18215)
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


def _build_flux(guidance_embeds: bool):
    """A tiny ``FluxPipeline`` shaped like FLUX.1-dev (FLUX.1-schnell with ``guidance_embeds=False``).

    VAE latents 16 x H/4 x W/4 (scaling_factor 0.3611, shift_factor 0.1159), packed 2x2 into tokens of 64
    channels; the transformer has 1 double-stream and 1 single-stream block, 2 heads of dim 16, rope axes
    (4, 6, 6). Text: CLIP (hidden 32, pooled output -> ``pooled_projection_dim``) and T5 encoder
    (d_model 32 -> ``joint_attention_dim``). Flow-matching scheduler with FLUX-dev's dynamic shifting.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
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
    vae = _autoencoder_kl(
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


def _build_kandinsky22(prediction_type: str):
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
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
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


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny randomly initialised pipeline of `family` to `out_dir` and return ``Path(out_dir)``.

    * ``"sd"``: a ``StableDiffusionPipeline`` folder. Override ``prediction_type`` (``"epsilon"`` or
      ``"v_prediction"``).
    * ``"flux"``: a ``FluxPipeline`` folder. Override ``guidance_embeds`` (``True`` like FLUX.1-dev,
      ``False`` like FLUX.1-schnell).
    * ``"kandinsky22"``: two folders, ``out_dir/prior`` (``KandinskyV22PriorPipeline``) and
      ``out_dir/decoder`` (``KandinskyV22Pipeline``). Override ``prediction_type`` of the decoder scheduler.

    Each pipeline folder loads with ``diffusers.DiffusionPipeline.from_pretrained``; its tokenizer folders
    also hold the classic ``vocab.json``/``merges.txt`` (CLIP) and ``spiece.model`` (T5) files. Weights are
    drawn from ``torch.manual_seed(seed)`` in a forked RNG (the caller's global RNG state is untouched), so
    the same seed always writes identical files. Sample at ``TINY_RESOLUTION[family]`` pixels.
    """
    import torch

    if family not in FAMILIES:
        raise DifftuneError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    unknown = sorted(set(overrides) - set(_KNOBS[family]))
    if unknown:
        raise DifftuneError(
            f"unknown override(s) {', '.join(unknown)} for family {family!r}; "
            f"valid: {', '.join(_KNOBS[family]) or 'none'}"
        )
    knobs = {**_KNOBS[family], **overrides}
    out_dir = Path(out_dir)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd":
            pipeline = _build_sd(**knobs)
            pipeline.save_pretrained(out_dir)
            _write_clip_vocab_files(out_dir / "tokenizer")
        elif family == "flux":
            pipeline = _build_flux(**knobs)
            pipeline.save_pretrained(out_dir)
            _write_clip_vocab_files(out_dir / "tokenizer")
            _write_spiece_model(out_dir / "tokenizer_2")
        else:
            prior, decoder = _build_kandinsky22(**knobs)
            prior.save_pretrained(out_dir / "prior")
            decoder.save_pretrained(out_dir / "decoder")
            _write_clip_vocab_files(out_dir / "prior" / "tokenizer")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``difftune tiny FAMILY OUT_DIR [--seed N]`` to `parser`."""
    parser.add_argument("family", choices=FAMILIES + WORLD, help="model family to build, or a world base model")
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline(s) to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``difftune tiny``: build the tiny pipeline(s), print where they went, return exit code 0."""
    if args.family in WORLD:
        from .world.models import write_shipped

        out_dir = write_shipped(args.family.split("-", 1)[1], args.out_dir)
        print(f"wrote the pretrained {args.family} base model to {out_dir}; sample at 64x64 px (see its README.md)")
        return 0
    out_dir = make_tiny(args.family, args.out_dir, seed=args.seed)
    resolution = TINY_RESOLUTION[args.family]
    if args.family == "kandinsky22":
        print(f"wrote tiny kandinsky22 prior to {out_dir / 'prior'} and decoder to {out_dir / 'decoder'}")
    else:
        print(f"wrote tiny {args.family} pipeline to {out_dir}")
    print(f"random weights (seed {args.seed}); sample at {resolution}x{resolution} px")
    return 0
