"""Tests for difftune.tiny: the offline tokenizers and the tiny random pipelines of every family."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

from difftune import DifftuneError, tiny

PROMPT = "a photo of sks dog"
PROMPTS = [
    PROMPT,
    "A painting of a red cat in the style of Van Gogh, 4k!",
    "an oil-painting of two blue foxes (sks style) at 3:45pm",
    "Größe × Zürich 😀 日本",
]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder holding that family's seed-0 tiny pipeline(s), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.make_tiny(family, root / family) for family in tiny.tiny_families()}


def _load(path, expected_class):
    """Load a pipeline folder with both the generic `DiffusionPipeline` loader and `expected_class`."""
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(path)) is expected_class
    pipeline = expected_class.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _file_bytes(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- CLIP tokenizer ------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _openai_clip_encode(text: str, vocab: dict[str, int], merge_lines: list[str]) -> list[int]:
    """Encode `text` like OpenAI's original CLIP tokenizer (and transformers 4's slow CLIPTokenizer).

    An independent re-implementation: it reads the classic vocab.json/merges.txt contents, so matching it
    shows those files follow the convention any CLIP tokenizer expects.
    """
    byte_encoder = _bytes_to_unicode()
    ranks = {tuple(line.split()): rank for rank, line in enumerate(merge_lines)}
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [vocab["<|startoftext|>"]]
    for word in regex.findall(pattern, " ".join(text.split()).lower()):
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = list(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if tuple(symbols[i : i + 2]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids.extend(vocab[symbol] for symbol in symbols)
    return ids + [vocab["<|endoftext|>"]]


def test_clip_tokenizer_encodes_prompt_as_whole_words():
    tokenizer = tiny.clip_tokenizer()
    ids = tokenizer(PROMPT).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>",
    ]  # fmt: skip
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert len(tokenizer) == 1000
    assert tokenizer.model_max_length == 77
    # Like OpenAI CLIP: bos and eos are the two highest ids, eos doubles as pad.
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (998, 999)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    padded = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[: len(ids)] == ids


@pytest.mark.parametrize("text", PROMPTS)
def test_clip_tokenizer_encodes_any_text_without_unknowns(text):
    tokenizer = tiny.clip_tokenizer()
    ids = tokenizer(text).input_ids
    # Byte-level BPE: no unknown tokens, so <|endoftext|> (also the unk token) only closes the sequence.
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert all(0 <= i < tokenizer.bos_token_id for i in ids[1:-1])
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


@pytest.mark.parametrize(
    "family, subfolder", [("sd", "tokenizer"), ("flux", "tokenizer"), ("kandinsky22", "prior/tokenizer")]
)
def test_clip_tokenizer_folder_loads_with_slow_and_fast_classes(family, subfolder, tiny_dirs, tmp_path):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    folder = tiny_dirs[family] / subfolder
    # A folder with only the classic files, as transformers 4's slow CLIPTokenizer reads them.
    classic = tmp_path / "classic"
    classic.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / name, classic / name)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert merge_lines[0].startswith("#version")

    reference = tiny.clip_tokenizer()
    loaded = [
        CLIPTokenizer.from_pretrained(folder),
        CLIPTokenizerFast.from_pretrained(folder),
        CLIPTokenizer.from_pretrained(classic),
    ]
    for text in PROMPTS:
        expected = _openai_clip_encode(text, vocab, merge_lines[1:])
        assert reference(text).input_ids == expected
        for tokenizer in loaded:
            assert tokenizer(text).input_ids == expected
    for tokenizer in loaded:
        assert tokenizer.model_max_length == 77 and len(tokenizer) == len(vocab)


# --- T5 tokenizer --------------------------------------------------------------------------------------


def test_t5_tokenizer_follows_t5_conventions():
    tokenizer = tiny.t5_tokenizer()
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 512
    assert 300 < len(tokenizer) <= 1000
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert all(3 <= i < len(tokenizer) for i in ids[:-1])
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    ascii_text = "Q: 3 x [zebra] = $7.50? ~yes~ {ok} | 100% #tag"
    assert tokenizer.unk_token_id not in tokenizer(ascii_text).input_ids
    assert tokenizer.decode(tokenizer(ascii_text).input_ids, skip_special_tokens=True) == ascii_text
    assert tokenizer.unk_token_id in tokenizer("Zürich").input_ids


def test_t5_tokenizer_folder_loads_with_slow_and_fast_classes(tiny_dirs, tmp_path):
    import sentencepiece
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = tiny_dirs["flux"] / "tokenizer_2"
    classic = tmp_path / "classic"
    classic.mkdir()
    for name in ("spiece.model", "tokenizer_config.json"):
        shutil.copy(folder / name, classic / name)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))

    loaded = [
        T5TokenizerFast.from_pretrained(folder),
        T5Tokenizer.from_pretrained(folder),
        T5TokenizerFast.from_pretrained(classic),
    ]
    for text in PROMPTS:
        expected = processor.encode(text) + [1]
        assert tiny.t5_tokenizer()(text).input_ids == expected
        for tokenizer in loaded:
            assert tokenizer(text).input_ids == expected
    for tokenizer in loaded:
        assert len(tokenizer) == processor.get_piece_size()


# --- pipelines -----------------------------------------------------------------------------------------


def test_sd_pipeline_generates_image(tiny_dirs):
    from diffusers import StableDiffusionPipeline

    pipe = _load(tiny_dirs["sd"], StableDiffusionPipeline)
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.safety_checker is None
    size = tiny.tiny_resolution("sd")
    image = pipe(
        PROMPT, height=size, width=size, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()


def test_flux_pipeline_generates_image(tiny_dirs):
    from diffusers import FluxPipeline

    pipe = _load(tiny_dirs["flux"], FluxPipeline)
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)
    assert pipe.scheduler.config.use_dynamic_shifting
    size = tiny.tiny_resolution("flux")
    assert size % (2 * pipe.vae_scale_factor) == 0
    image = pipe(
        PROMPT, height=size, width=size, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()


def test_kandinsky22_prior_feeds_decoder(tiny_dirs):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline
    from PIL import Image

    prior = _load(tiny_dirs["kandinsky22"] / "prior", KandinskyV22PriorPipeline)
    decoder = _load(tiny_dirs["kandinsky22"] / "decoder", KandinskyV22Pipeline)
    embed_dim = prior.prior.config.embedding_dim
    assert prior.image_encoder.config.projection_dim == embed_dim
    assert prior.text_encoder.config.projection_dim == embed_dim
    assert decoder.unet.config.encoder_hid_dim == embed_dim
    assert decoder.unet.config.out_channels == 2 * decoder.unet.config.in_channels
    assert decoder.movq_scale_factor == 4
    assert prior.text_encoder.config.vocab_size == len(prior.tokenizer)

    # The training path of the prior: pixels -> image processor -> CLIP image embedding.
    pixels = prior.image_processor(Image.new("RGB", (80, 60), "red"), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, prior.image_encoder.config.image_size, prior.image_encoder.config.image_size)
    assert prior.image_encoder(pixels).image_embeds.shape == (1, embed_dim)

    embeds = prior(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert embeds.image_embeds.shape == embeds.negative_image_embeds.shape == (1, embed_dim)
    assert embeds.image_embeds.abs().sum() > 0  # prior.clip_std must not zero the output
    size = tiny.tiny_resolution("kandinsky22")
    image = decoder(
        image_embeds=embeds.image_embeds, negative_image_embeds=embeds.negative_image_embeds,
        height=size, width=size, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all()


# --- determinism, overrides, CLI -----------------------------------------------------------------------


@pytest.mark.parametrize("family", tiny.tiny_families())
def test_same_seed_gives_identical_files_other_seed_other_weights(family, tiny_dirs, tmp_path):
    rng_state = torch.random.get_rng_state()
    again = _file_bytes(tiny.make_tiny(family, tmp_path / "again", seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    first = _file_bytes(tiny_dirs[family])
    assert again.keys() == first.keys()
    assert [name for name in first if first[name] != again[name]] == []

    other = _file_bytes(tiny.make_tiny(family, tmp_path / "other", seed=1))
    weights = [name for name in first if name.endswith(".safetensors")]
    assert len(weights) >= 3
    assert [name for name in weights if other[name] == first[name]] == []
    configs = [name for name in first if not name.endswith(".safetensors")]
    assert all(other[name] == first[name] for name in configs)


def test_overrides_reach_the_model_configs(tmp_path):
    sd = tiny.make_tiny("sd", tmp_path / "sd", prediction_type="v_prediction")
    assert json.loads((sd / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    flux = tiny.make_tiny("flux", tmp_path / "flux", guidance_embeds=False)
    assert json.loads((flux / "transformer" / "config.json").read_text())["guidance_embeds"] is False


def test_bad_family_or_override_is_a_user_error(tmp_path):
    with pytest.raises(DifftuneError, match="unknown model family"):
        tiny.make_tiny("sd9", tmp_path / "x")
    with pytest.raises(DifftuneError, match="guidance_embeds"):
        tiny.make_tiny("sd", tmp_path / "x", guidance_embeds=False)
    assert not (tmp_path / "x").exists()


def test_cli_builds_the_pipeline(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)
    args = parser.parse_args(["kandinsky22", str(tmp_path / "k22"), "--seed", "3"])
    assert tiny.run(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "k22" / "prior") in out and str(tmp_path / "k22" / "decoder") in out
    for part in ("prior", "decoder"):
        assert (tmp_path / "k22" / part / "model_index.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["sd9", str(tmp_path / "x")])
