"""Shared building blocks of the tiny, randomly initialised pipelines (``difftune tiny``, tests, demos).

difftune is developed and tested without network access, so no real model weights or tokenizers can be
downloaded. The tiny pipelines (one builder per family folder, ``families/<name>/tiny.py``) have the
*shape conventions* of the real models but at most about a million parameters per model. This module
holds what several of them share:

* offline tokenizers trained on a small built-in English corpus: a byte-level BPE CLIP tokenizer (the
  ``</w>`` end-of-word convention of ``openai/clip-vit-large-patch14``) and a SentencePiece unigram T5
  tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2, like ``google/t5-v1_1-xxl``);
* a tiny CLIP text tower config and a tiny ``AutoencoderKL``.

The tiny autoencoders deliberately use a downscale factor of 4 instead of the real 8, so code that
hard-codes 8 instead of reading ``2 ** (len(vae.config.block_out_channels) - 1)`` fails on them.
Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import functools
import io
import json
import string
import tempfile
from pathlib import Path

CLIP_MAX_LENGTH = 77
"""Sequence length of the CLIP tokenizers and text encoders (as in real CLIP)."""

T5_MAX_LENGTH = 512
"""``model_max_length`` of the T5 tokenizer (FLUX.1-dev's ``max_sequence_length``)."""

_CLIP_TARGET_VOCAB = 1000
_T5_TARGET_VOCAB = 1000

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


@functools.lru_cache(maxsize=4)
def _clip_bpe(extra: str = "") -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Train the tiny CLIP BPE on `_CORPUS` plus `extra`; returns ``(tokens, merges)`` with ``tokens[i]`` the
    token of id ``i``. Words that `extra` repeats often become whole tokens (the world models' vocabulary).

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
        for line in (_CORPUS + extra).splitlines()
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


def write_clip_vocab_files(directory: Path, extra: str = "") -> None:
    """Write ``vocab.json`` and ``merges.txt`` (OpenAI CLIP's own file format) into `directory`
    (`extra`: more corpus text, see `_clip_bpe`)."""
    tokens, merges = _clip_bpe(extra)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def clip_tokenizer(extra: str = ""):
    """The tiny offline CLIP tokenizer (a ``transformers.CLIPTokenizer``); `extra`: more corpus text.

    1000 tokens; ``<|startoftext|>`` (bos, id 998) and ``<|endoftext|>`` (eos, pad and unk, id 999, as in
    ``openai/clip-vit-large-patch14``) are the two highest ids; ``model_max_length`` is 77. Words are
    byte-level BPE pieces, the last piece of a word carrying the ``</w>`` suffix, e.g.
    ``"a photo of sks dog"`` -> ``<|startoftext|> a</w> photo</w> of</w> sks</w> dog</w> <|endoftext|>``.
    Built from ``vocab.json``/``merges.txt``, the files every transformers version reads.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_clip_vocab_files(directory, extra)
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CLIP_MAX_LENGTH}
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(directory)


@functools.lru_cache(maxsize=4)
def _t5_sentencepiece_model(extra: str = "", whole_words: tuple[str, ...] = ()) -> bytes:
    """Train the tiny T5 SentencePiece unigram model on `_CORPUS` plus `extra`; returns the serialized ``spiece.model``.

    `whole_words` become user-defined pieces, never split (a frequent word in the corpus alone may
    still be cut into pieces by the unigram model, as "ci rc le").

    Ids follow T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, no bos. All printable ASCII characters are kept as
    pieces, so only non-ASCII characters map to ``<unk>``. No text normalisation (identity rule), which
    matches what transformers' T5 tokenizer does with the model. Single-threaded training is deterministic.
    """
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter((_CORPUS + extra).splitlines()),
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
        user_defined_symbols=list(whole_words),
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_spiece_model(directory: Path, extra: str = "", whole_words: tuple[str, ...] = ()) -> None:
    """Write the SentencePiece model as ``spiece.model`` (T5's own file format) into `directory`."""
    (directory / "spiece.model").write_bytes(_t5_sentencepiece_model(extra, tuple(whole_words)))


def t5_tokenizer(extra: str = "", whole_words: tuple[str, ...] = ()):
    """The tiny offline T5 tokenizer (a ``transformers.T5TokenizerFast``), as FLUX's ``tokenizer_2``.

    A SentencePiece unigram vocabulary of a few hundred pieces: ``<pad>``=0, ``</s>``=1 (appended to every
    sequence), ``<unk>``=2, no sentinel ``<extra_id_*>`` tokens; ``model_max_length`` is 512.
    Built from ``spiece.model``, the file every transformers version reads.
    """
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_spiece_model(directory, extra, whole_words)
        config = {"tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0}
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return T5TokenizerFast.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------
# Model components
# ---------------------------------------------------------------------------------------------------------


def clip_text_config(tokenizer):
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


def autoencoder_kl(latent_channels: int, **config):
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
