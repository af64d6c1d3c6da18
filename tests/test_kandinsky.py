"""Kandinsky 2.2 prior and decoder families end to end.

What is trained loads in the real diffusers pipelines (LoRA through ``load_lora_adapter``, full
fine-tunes through ``from_pretrained``) and changes their output; LoRA touches only adapter weights;
each part learns (loss at fixed timesteps and noise, measured with diffusers-loaded weights);
``difftune generate`` runs text -> prior -> decoder with either part tuned; the shipped configs are the
seed runs; and it all works on a prior + decoder pair built here with plain diffusers/transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import base_overrides, make_images
from difftune import DifftuneError
from difftune.config import load_config, validate
from difftune.families.base import unwrap
from difftune.inference.generate import generate
from difftune.inference.naming import read_params
from difftune.train import read_losses, train

PROMPT = "a photo of sks disc"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LORA_FILE = "pytorch_lora_weights.safetensors"
DECODER_TARGETS = {"to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"}
PRIOR_TARGETS = {"to_q", "to_k", "to_v", "to_out.0"}


def quiet(*_):
    pass


def pixels_of(path: Path, size: int = 64) -> torch.Tensor:
    """`[1, 3, size, size]` in [-1, 1], centre-cropped like the training loader."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def load(cls_name: str, path):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prior_embeds(prior_pipe, seed: int = 0) -> torch.Tensor:
    out = prior_pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed))
    return out.image_embeds


def decoder_images(decoder_pipe, embeds: torch.Tensor, seed: int = 0) -> np.ndarray:
    out = decoder_pipe(image_embeds=embeds, negative_image_embeds=torch.zeros_like(embeds), height=64, width=64,
                       num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images


def run(config: str | None, overrides: list[str], family_cls=None, log=quiet) -> tuple[Path, object]:
    """Train; returns the output folder and the live family (to inspect the in-memory weights)."""
    captured = {}
    if family_cls is None:
        return train(load_config(config, overrides), log=log), None
    original = family_cls.load

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["family"] = self

    family_cls.load = capture
    try:
        out = train(load_config(config, overrides), log=quiet)
    finally:
        family_cls.load = original
    return out, captured["family"]


def assert_only_adapters_trained(module, base_state: dict, targets: set[str]):
    trained = unwrap(module).state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" in key:
            continue
        assert torch.equal(value, base_state[key.replace(".base_layer", "")]), f"base weight {key} changed"
    assert any(trained[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k), "LoRA B is still zero"
    trainable = [n for n, p in unwrap(module).named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    hit = {t for t in targets for n in trainable if f".{t}.lora_" in n}
    assert hit == targets, f"LoRA placed on {hit}, expected {targets}"


def lora_header(out: Path) -> dict:
    with safe_open(str(out / LORA_FILE), "pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


# ---- fixtures: tiny pipelines and one run of each shipped config --------------------------------------------


@pytest.fixture(scope="module")
def k22(tmp_path_factory) -> Path:
    from difftune.tiny import make_tiny

    return make_tiny("kandinsky22", tmp_path_factory.mktemp("k22") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "images", n=2, caption=PROMPT)


def shipped(name: str, k22: Path, data: Path, out: Path, steps: int = 2, **extra) -> tuple[str, list[str]]:
    """A shipped config run on the tiny pair: only paths, sizes and lengths are overridden."""
    part = "decoder" if "decoder" in name else "prior"
    other = {"decoder": ("model.options.prior", k22 / "prior"), "prior": ("model.options.decoder", k22 / "decoder")}[part]
    items = {other[0]: other[1], "train.grad_accum": 1, "validation.steps": 2, **extra}
    return str(CONFIGS / f"kandinsky22-{name}.yaml"), base_overrides(k22 / part, data, out, steps=steps, **items)


@pytest.fixture(scope="module")
def decoder_lora(k22, data, tmp_path_factory):
    from difftune.families.kandinsky22.family import KandinskyDecoder

    config, ov = shipped("decoder-lora", k22, data, tmp_path_factory.mktemp("dl") / "out", steps=3,
                         **{"method.alpha": 8})
    return run(config, ov, KandinskyDecoder)


@pytest.fixture(scope="module")
def prior_lora(k22, data, tmp_path_factory):
    from difftune.families.kandinsky22.family import KandinskyPrior

    config, ov = shipped("prior-lora", k22, data, tmp_path_factory.mktemp("pl") / "out", steps=3,
                         **{"method.alpha": 8})
    return run(config, ov, KandinskyPrior)


@pytest.fixture(scope="module")
def decoder_full(k22, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("df") / "out"
    config, ov = shipped("decoder-full", k22, data, out, **{"validation.prompts": "[]"})
    return run(config, ov)[0]


@pytest.fixture(scope="module")
def prior_full(k22, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pf") / "out"
    config, ov = shipped("prior-full", k22, data, out, **{"validation.prompts": "[]"})
    return run(config, ov)[0]


# ---- shipped configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decoder-full", "decoder-lora", "prior-full", "prior-lora"])
def test_shipped_configs_are_the_seed_runs(name):
    cfg = load_config(CONFIGS / f"kandinsky22-{name}.yaml")
    validate(cfg, resolution_multiple=8, check_paths=False)
    part, kind = name.split("-")
    assert cfg.model.family == f"kandinsky22-{part}" and cfg.method.kind == kind
    assert cfg.model.path == f"kandinsky-community/kandinsky-2-2-{part}"
    if part == "decoder":
        assert cfg.model.options["prior"] == "kandinsky-community/kandinsky-2-2-prior"
    else:
        assert cfg.model.options["decoder"] == "kandinsky-community/kandinsky-2-2-decoder"
    t = cfg.train
    assert (cfg.data.resolution, t.batch_size, t.grad_accum, t.steps, t.seed) == (768, 1, 4, 15000, 42)
    assert (t.lr_scheduler, t.lr_warmup_steps, t.max_grad_norm, cfg.checkpoint.keep) == ("constant", 0, 1.0, 3)
    assert t.lr == (1e-4 if kind == "lora" else 1e-5)
    assert t.gradient_checkpointing == (name == "decoder-full")
    assert [c.hf for c in cfg.data.concepts] == ["lambdalabs/pokemon-blip-captions"]
    if kind == "lora":
        assert cfg.method.rank == 4 and cfg.validation.prompts == ["cute dragon creature"]


# ---- decoder LoRA ------------------------------------------------------------------------------------------------


def test_decoder_lora_trains_only_adapters_on_attention_and_added_kv(decoder_lora, k22):
    _, family = decoder_lora
    base = load("KandinskyV22Pipeline", k22 / "decoder").unet.state_dict()
    assert_only_adapters_trained(family.parts["unet"], base, DECODER_TARGETS)
    for name in ("movq", "image_encoder"):
        assert not any(p.requires_grad for p in family.parts[name].parameters())


def test_decoder_lora_loads_with_load_lora_adapter_and_changes_images(decoder_lora, k22):
    out, _ = decoder_lora
    header = lora_header(out)
    assert header["r"] == 4 and header["lora_alpha"] == 8
    pipe = load("KandinskyV22Pipeline", k22 / "decoder")
    embeds = prior_embeds(load("KandinskyV22PriorPipeline", k22 / "prior"))
    base = decoder_images(pipe, embeds)
    pipe.unet.load_lora_adapter(str(out), weight_name=LORA_FILE, prefix=None)
    (config,) = pipe.unet.peft_config.values()
    assert config.r == 4 and config.lora_alpha == 8, "rank/alpha not restored: the scale would differ"
    assert np.abs(decoder_images(pipe, embeds) - base).max() > 1e-4, "the LoRA did not change the images"
    pipe.unet.disable_lora()
    np.testing.assert_array_equal(decoder_images(pipe, embeds), base)


def test_decoder_validation_samples_come_from_prior_and_decoder(decoder_lora):
    out, _ = decoder_lora
    (sample,) = (out / "samples" / "step-00000003").glob("*.png")
    assert Image.open(sample).size == (64, 64)
    assert read_params(sample)["prompt"] == "cute dragon creature"


def test_clip_embeddings_match_the_pipeline_processor(decoder_lora, data):
    """The tensor CLIP preprocessing gives the embeddings the pipeline's own image processor gives."""
    _, family = decoder_lora
    path = sorted(data.glob("*.png"))[1]  # the wider one: resize, then centre crop
    image = Image.open(path).convert("RGB")
    px = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        ours = family.encode_images(px)["image_embeds"]
        ref_px = family.parts["image_processor"](image, return_tensors="pt").pixel_values
        ref = family.parts["image_encoder"](ref_px).image_embeds
    assert torch.nn.functional.cosine_similarity(ours, ref).item() > 0.999


def test_init_lora_continues_from_a_decoder_lora_file(decoder_lora, k22, data, tmp_path):
    """`method.init_lora` reads the unprefixed file it wrote: one step at a negligible lr keeps it."""
    out, _ = decoder_lora
    config, ov = shipped("decoder-lora", k22, data, tmp_path / "out", steps=1,
                         **{"method.alpha": 8, "method.init_lora": str(out), "train.lr": "1e-9",
                            "validation.prompts": "[]", "train.weight_decay": 0})
    again, _ = run(config, ov)
    with safe_open(str(out / LORA_FILE), "pt") as a, safe_open(str(again / LORA_FILE), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-6, rtol=0)


def test_decoder_lora_resumes_bit_exactly(k22, data, tmp_path):
    overrides = lambda out, steps: base_overrides(k22 / "decoder", data, out, steps=steps, **{  # noqa: E731
        "model.options.prior": k22 / "prior", "checkpoint.every": 2})
    whole, _ = run(None, overrides(tmp_path / "whole", 4))
    run(None, overrides(tmp_path / "split", 2))
    split, _ = run(None, overrides(tmp_path / "split", 4))
    with safe_open(str(whole / LORA_FILE), "pt") as a, safe_open(str(split / LORA_FILE), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_cached_image_embeddings_follow_the_prior_image_encoder(k22, data, tmp_path):
    """The decoder's cached features include CLIP embeddings: another image encoder must miss the cache."""
    import shutil

    from transformers import CLIPVisionModelWithProjection

    prior = tmp_path / "prior"
    shutil.copytree(k22 / "prior", prior)
    lines: list[str] = []

    def encoded(out: str) -> str:
        lines.clear()
        run(None, base_overrides(k22 / "decoder", data, tmp_path / out, steps=1, **{
            "model.options.prior": prior, "data.cache_dir": tmp_path / "cache"}), log=lines.append)
        (line,) = [s for s in lines if s.startswith("image features:")]
        return line

    assert encoded("a").startswith("image features: 2 encoded")
    assert encoded("b").startswith("image features: 0 encoded")
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(prior), subfolder="image_encoder")
    with torch.no_grad():
        encoder.visual_projection.weight.mul_(2.0)
    encoder.save_pretrained(str(prior / "image_encoder"))
    assert encoded("c").startswith("image features: 2 encoded")


# ---- prior LoRA --------------------------------------------------------------------------------------------------


def test_prior_lora_trains_only_adapters(prior_lora, k22):
    _, family = prior_lora
    base = load("KandinskyV22PriorPipeline", k22 / "prior").prior.state_dict()
    assert_only_adapters_trained(family.parts["prior"], base, PRIOR_TARGETS)
    for name in ("text_encoder", "image_encoder"):
        assert not any(p.requires_grad for p in family.parts[name].parameters())


def test_prior_lora_loads_with_load_lora_adapter_and_changes_embeddings(prior_lora, k22):
    out, _ = prior_lora
    pipe = load("KandinskyV22PriorPipeline", k22 / "prior")
    base = prior_embeds(pipe)
    pipe.prior.load_lora_adapter(str(out), weight_name=LORA_FILE, prefix=None)
    (config,) = pipe.prior.peft_config.values()
    assert config.r == 4 and config.lora_alpha == 8
    assert (prior_embeds(pipe) - base).abs().max() > 1e-4
    assert (out / "samples" / "step-00000003" / "00-00.png").is_file(), "validation images via model.options.decoder"


# ---- full fine-tunes ---------------------------------------------------------------------------------------------


def test_full_finetunes_are_pipeline_folders_that_change_the_output(decoder_full, prior_full, k22):
    from diffusers import DiffusionPipeline

    tuned_dec = DiffusionPipeline.from_pretrained(str(decoder_full))
    tuned_pri = DiffusionPipeline.from_pretrained(str(prior_full))
    assert type(tuned_dec).__name__ == "KandinskyV22Pipeline"
    assert type(tuned_pri).__name__ == "KandinskyV22PriorPipeline"
    base_dec, base_pri = load("KandinskyV22Pipeline", k22 / "decoder"), load("KandinskyV22PriorPipeline", k22 / "prior")
    for tuned, base, trained, frozen in ((tuned_dec, base_dec, "unet", ["movq"]),
                                         (tuned_pri, base_pri, "prior", ["text_encoder", "image_encoder"])):
        tuned.set_progress_bar_config(disable=True)
        b = getattr(base, trained).state_dict()
        assert any(not torch.equal(v, b[k]) for k, v in getattr(tuned, trained).state_dict().items())
        for name in frozen:
            b = getattr(base, name).state_dict()
            assert all(torch.equal(v, b[k]) for k, v in getattr(tuned, name).state_dict().items()), name
    # the normalisation statistics are the prior's, untouched by training
    assert torch.equal(tuned_pri.prior.clip_mean, base_pri.prior.clip_mean)
    embeds = prior_embeds(base_pri)
    assert np.abs(decoder_images(tuned_dec, embeds) - decoder_images(base_dec, embeds)).max() > 1e-4
    assert (prior_embeds(tuned_pri) - embeds).abs().max() > 1e-4


# ---- learning: the loss on one image falls, measured with diffusers-loaded weights -------------------------------

TIMESTEPS = torch.tensor([50, 200, 400, 600, 800, 950])


def decoder_loss(decoder_pipe, prior_pipe, image: Path) -> float:
    """Epsilon loss of the decoder on `image` at fixed timesteps and noise (diffusers' conventions)."""
    with torch.no_grad():
        x0 = decoder_pipe.movq.encode(pixels_of(image)).latents
        clip = prior_pipe.image_processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
        embeds = prior_pipe.image_encoder(clip).image_embeds.expand(len(TIMESTEPS), -1)
        noise = torch.randn((len(TIMESTEPS),) + x0.shape[1:], generator=torch.Generator().manual_seed(123))
        x_t = decoder_pipe.scheduler.add_noise(x0.expand(len(TIMESTEPS), -1, -1, -1), noise, TIMESTEPS)
        pred = decoder_pipe.unet(x_t, TIMESTEPS, None, added_cond_kwargs={"image_embeds": embeds}).sample
        return float(((pred[:, : x0.shape[1]] - noise) ** 2).mean())


def prior_loss(prior_pipe, image: Path) -> float:
    """Sample-prediction loss of the prior on `image`'s normalised CLIP embedding for PROMPT."""
    from diffusers import DDPMScheduler

    n = len(TIMESTEPS)
    with torch.no_grad():
        clip = prior_pipe.image_processor(Image.open(image).convert("RGB"), return_tensors="pt").pixel_values
        x0 = (prior_pipe.image_encoder(clip).image_embeds - prior_pipe.prior.clip_mean) / prior_pipe.prior.clip_std
        tok = prior_pipe.tokenizer([PROMPT], padding="max_length", max_length=prior_pipe.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt")
        text = prior_pipe.text_encoder(tok.input_ids)
        noise = torch.randn((n,) + x0.shape[1:], generator=torch.Generator().manual_seed(123))
        sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
        x_t = sched.add_noise(x0.expand(n, -1), noise, TIMESTEPS)
        pred = prior_pipe.prior(x_t, timestep=TIMESTEPS, proj_embedding=text.text_embeds.expand(n, -1),
                                encoder_hidden_states=text.last_hidden_state.expand(n, -1, -1),
                                attention_mask=tok.attention_mask.bool().expand(n, -1)).predicted_image_embedding
        return float(((pred - x0) ** 2).mean())


def test_decoder_lora_learns_its_image(k22, tmp_path):
    # the tiny random UNet has attention at one resolution only; LoRA on conv_in/conv_out as well lets
    # it fit in a few dozen steps (peft conv LoRA, saved and loaded like the linear ones)
    data = make_images(tmp_path / "data", n=1, caption=PROMPT)
    out, _ = run(None, base_overrides(k22 / "decoder", data, tmp_path / "out", steps=30, **{
        "model.options.prior": k22 / "prior", "method.rank": 16, "train.lr": "1e-2", "train.batch_size": 1,
        "method.target_modules": "[to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj, conv_in, conv_out]"}))
    image = data / "img-00.png"
    pipe, prior = load("KandinskyV22Pipeline", k22 / "decoder"), load("KandinskyV22PriorPipeline", k22 / "prior")
    before = decoder_loss(pipe, prior, image)
    pipe.unet.load_lora_adapter(str(out), weight_name=LORA_FILE, prefix=None)
    after = decoder_loss(pipe, prior, image)
    assert after <= 0.5 * before, (before, after)
    losses = [r["loss"] for r in read_losses(out)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_prior_lora_learns_its_image_embedding(k22, tmp_path):
    data = make_images(tmp_path / "data", n=1, caption=PROMPT)
    out, _ = run(None, base_overrides(k22 / "prior", data, tmp_path / "out", steps=40, **{
        "method.rank": 8, "train.lr": "3e-3", "train.batch_size": 1}))
    image = data / "img-00.png"
    pipe = load("KandinskyV22PriorPipeline", k22 / "prior")
    before = prior_loss(pipe, image)
    pipe.prior.load_lora_adapter(str(out), weight_name=LORA_FILE, prefix=None)
    after = prior_loss(pipe, image)
    assert after <= 0.5 * before, (before, after)


# ---- generate: text -> prior -> decoder -----------------------------------------------------------------------


def test_generate_with_tuned_parts_differs_and_reproduces(decoder_lora, prior_lora, decoder_full, prior_full, k22,
                                                          tmp_path, capsys):
    """Either part may be a fine-tuned folder or base + LoRA; a seed reproduces its image."""
    from difftune.cli import main

    def cli(out: str, model: Path, prior: Path, *extra: str) -> np.ndarray:
        code = main(["generate", "--model", str(model), "--prior", str(prior), "--prompt", PROMPT, "--steps", "3",
                     "--seed", "7", "--out", str(tmp_path / out), *extra])
        assert code == 0
        (png,) = (tmp_path / out).glob("*.png")
        return np.asarray(Image.open(png), dtype=np.int16)

    decoder, prior = k22 / "decoder", k22 / "prior"
    base = cli("base", decoder, prior)
    assert base.shape == (64, 64, 3), "default size: the decoder's sample size times the MoVQ factor"
    np.testing.assert_array_equal(cli("again", decoder, prior), base)
    assert np.abs(cli("dec", decoder, prior, "--lora", f"{decoder_lora[0]}:1.0") - base).max() > 0
    assert np.abs(cli("pri", decoder, prior, "--prior-lora", str(prior_lora[0])) - base).max() > 0
    params = read_params(next((tmp_path / "pri").glob("*.png")))
    assert params["prior"] == str(prior) and params["prior_loras"] == [[str(prior_lora[0]), 1.0]]
    assert np.abs(cli("full", decoder_full, prior_full) - base).max() > 0

    capsys.readouterr()
    assert main(["generate", "--model", str(decoder), "--prompt", PROMPT, "--out", str(tmp_path / "x")]) == 2
    assert "--prior" in capsys.readouterr().err
    assert main(["generate", "--model", str(prior), "--prompt", PROMPT, "--out", str(tmp_path / "y")]) == 2
    assert "--model DECODER --prior" in capsys.readouterr().err


# ---- errors the user can make -------------------------------------------------------------------------------------


def test_user_errors_are_one_line_difftune_errors(k22, data, tmp_path):
    cases = [
        ("decoder-lora", {"model.options.prior": ""}, "model.options.prior is required"),
        ("decoder-lora", {"model.options.prior": k22 / "decoder"}, "expected a KandinskyV22PriorPipeline"),
        ("prior-lora", {"model.options.decoder": ""}, "validation.prompts"),
        ("prior-full", {"train.gradient_checkpointing": True}, "gradient_checkpointing"),
        ("prior-lora", {"method.train_text_encoder": True}, "train_text_encoder"),
        ("decoder-lora", {"objective.prediction_type": "v_prediction"}, "prediction_type"),
    ]
    for i, (name, extra, message) in enumerate(cases):
        config, ov = shipped(name, k22, data, tmp_path / f"out{i}", steps=1)
        ov += [f"{k}={v}" for k, v in extra.items()]
        with pytest.raises(DifftuneError, match=message) as err:
            run(config, ov)
        assert "\n" not in str(err.value)


# ---- pipelines the project did not make ---------------------------------------------------------------------------


def make_foreign_kandinsky(out: Path) -> tuple[Path, Path]:
    """A Kandinsky 2.2 prior + decoder pair from plain diffusers/transformers calls, other sizes than
    `difftune.tiny`: 24-dim embeddings, 48 px CLIP images, non-trivial clip_mean/std, MoVQ factor 8,
    a DDIM decoder scheduler, a character-level tokenizer."""
    from diffusers import (DDIMScheduler, KandinskyV22Pipeline, KandinskyV22PriorPipeline, PriorTransformer,
                           UnCLIPScheduler, UNet2DConditionModel, VQModel)
    from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from foreign import char_clip_tokenizer

    torch.manual_seed(4321)
    dim = 24
    tokenizer = char_clip_tokenizer(out / "_tok")
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=48,
        patch_size=16, projection_dim=dim))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, num_layers=2, embedding_dim=dim,
                             num_embeddings=77, additional_embeddings=4)
    with torch.no_grad():
        prior.clip_mean.copy_(torch.randn_like(prior.clip_mean) * 0.1)
        prior.clip_std.copy_(0.5 + torch.rand_like(prior.clip_std))
    scheduler = UnCLIPScheduler(variance_type="fixed_small_log", clip_sample=True, clip_sample_range=5.0,
                                prediction_type="sample")
    KandinskyV22PriorPipeline(prior=prior, image_encoder=image_encoder, text_encoder=text_encoder,
                              tokenizer=tokenizer, scheduler=scheduler, image_processor=processor
                              ).save_pretrained(str(out / "prior"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=8, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=8,
        encoder_hid_dim=dim, encoder_hid_dim_type="image_proj", addition_embed_type="image",
        resnet_time_scale_shift="scale_shift", norm_num_groups=8)
    movq = VQModel(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
        vq_embed_dim=4, num_vq_embeddings=32, norm_num_groups=8, norm_type="spatial", sample_size=64)
    decoder_scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    KandinskyV22Pipeline(unet=unet, scheduler=decoder_scheduler, movq=movq).save_pretrained(str(out / "decoder"))
    return out / "prior", out / "decoder"


def test_pipelines_the_project_did_not_make(tmp_path):
    prior, decoder = make_foreign_kandinsky(tmp_path / "foreign")
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    dec_lora, _ = run(None, base_overrides(decoder, data, tmp_path / "dl", steps=2, **{"model.options.prior": prior}))
    pri_lora, _ = run(None, base_overrides(prior, data, tmp_path / "pl", steps=2))
    dec_full, _ = run(None, base_overrides(decoder, data, tmp_path / "df", steps=2, **{
        "model.options.prior": prior, "method.kind": "full", "train.lr": "1e-4"}))

    base_prior, base_dec = load("KandinskyV22PriorPipeline", prior), load("KandinskyV22Pipeline", decoder)
    embeds = prior_embeds(base_prior)
    base_images = decoder_images(base_dec, embeds)
    base_dec.unet.load_lora_adapter(str(dec_lora), weight_name=LORA_FILE, prefix=None)
    assert np.abs(decoder_images(base_dec, embeds) - base_images).max() > 1e-4
    base_prior.prior.load_lora_adapter(str(pri_lora), weight_name=LORA_FILE, prefix=None)
    assert (prior_embeds(base_prior) - embeds).abs().max() > 1e-4

    kw = dict(steps=3, width=64, height=64, seed=1, progress=False)
    base = generate(str(decoder), PROMPT, tmp_path / "g0", extra={"prior": str(prior)}, **kw)
    tuned = generate(str(dec_full), PROMPT, tmp_path / "g1",
                     extra={"prior": str(prior), "prior_loras": [(str(pri_lora), 1.0)]}, **kw)
    px = lambda p: np.asarray(Image.open(p), dtype=np.int16)  # noqa: E731
    assert px(tuned[0]).shape == (64, 64, 3)
    assert np.abs(px(tuned[0]) - px(base[0])).max() > 0
