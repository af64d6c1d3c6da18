"""The FLUX.1 family: packing, the flow-matching objective, LoRA and full fine-tunes that the real
diffusers FluxPipeline loads, learning, generation, continuing from a LoRA, the shipped configs, and
a FLUX.1-dev-shaped pipeline built here with plain diffusers/transformers calls."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_overrides, make_images
from foreign import char_clip_tokenizer, clip_text_encoder

from difftune import DifftuneError
from difftune.config import load_config, validate
from difftune.families.flux import family as flux_module
from difftune.families.flux.family import Flux
from difftune.objectives.flow_matching import FlowMatchingObjective, dynamic_shift, shift_sigma
from difftune.objectives.timesteps import sample_u
from difftune.train import read_losses, train
from difftune.methods import get_method

PROMPT = "a photo of sks disc"
SEQ = 16  # T5 tokens in tests (FLUX.1-dev: 512)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def disc_images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data") / "discs", n=2, caption=PROMPT)


def overrides(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> list[str]:
    return base_overrides(model, data, out, steps, **{"model.options.max_sequence_length": SEQ, **extra})


@pytest.fixture(scope="module")
def lora_run(tiny_flux, disc_images, tmp_path_factory) -> Path:
    """A LoRA trained with the family's default targets (rank 4), with a validation prompt."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    cfg = load_config(None, overrides(tiny_flux, disc_images, out, steps=6, **{
        "method.rank": 4, "method.alpha": 8, "train.lr": "2e-2", "validation.prompts": f"['{PROMPT}']",
        "validation.steps": 2,
    }))
    train(cfg, log=lambda *_: None)
    return out


def load_pipe(path, lora=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def images(pipe, prompt=PROMPT, seed=0) -> np.ndarray:
    return pipe(prompt, height=64, width=64, num_inference_steps=2, max_sequence_length=SEQ, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def family_for(model: Path, tmp_path: Path, **extra) -> Flux:
    cfg = load_config(None, overrides(model, tmp_path, tmp_path / "out", **extra))
    family = Flux(cfg, torch.device("cpu"), torch.float32)
    family.load()
    return family


# ---- packing, positions, the objective --------------------------------------------------------


def test_packing_round_trips_and_matches_the_pipeline_layout():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    tokens = flux_module.pack(latents)
    assert tokens.shape == (2, 3 * 5, 64)
    assert torch.equal(flux_module.unpack(tokens, 6, 10), latents)
    # token (row 1, col 2) holds channel-major 2x2 patches of latent rows 2-3, cols 4-5
    patch = latents[0, :, 2:4, 4:6].reshape(-1)
    assert torch.equal(tokens[0, 1 * 5 + 2], patch)
    ids = flux_module.image_ids(6, 10, "cpu", torch.float32)
    assert ids.shape == (15, 3) and ids[:, 0].eq(0).all()
    assert ids[1 * 5 + 2].tolist() == [0.0, 1.0, 2.0]
    assert flux_module.image_tokens(latents) == 15
    # the pipeline's own sampling path packs exactly like this
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8), latents)


def test_flow_matching_interpolation_and_target_are_exact():
    objective = FlowMatchingObjective({}, flux_module.image_tokens)
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = objective.noisy(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    assert torch.allclose(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(objective.target(x0, noise, t), noise - x0)
    # the velocity moves x_t along the path: x_t + (s' - s) * v is the point at s'
    assert torch.allclose(x_t[1] + 0.5 * (noise[1] - x0[1]), objective.noisy(x0, noise, torch.full((3,), 0.75))[1], atol=1e-6)


def test_timestep_samplers_have_the_documented_statistics_and_match_diffusers():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 200_000
    u = sample_u(n, "logit_normal", 0.5, 0.8, generator=torch.Generator().manual_seed(0))
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    reference = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=0.5, logit_std=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u, reference, atol=1e-6)
    u = sample_u(n, "uniform", generator=torch.Generator().manual_seed(1))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    u = sample_u(n, "mode", mode_scale=1.29, generator=torch.Generator().manual_seed(2))
    reference = compute_density_for_timestep_sampling("mode", n, mode_scale=1.29, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(u, reference, atol=1e-6)
    assert 0.0 <= u.min() and u.max() <= 1.0
    # mode_scale > 0 moves mass to the middle, away from both ends
    assert ((u > 0.25) & (u < 0.75)).float().mean() > 0.55


def test_shift_is_monotone_and_dynamic_shift_follows_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = torch.linspace(0, 1, 101)
    for shift in (0.5, 1.0, 3.0):
        shifted = shift_sigma(s, shift)
        assert shifted[0] == 0 and torch.isclose(shifted[-1], torch.tensor(1.0))
        assert (shifted[1:] > shifted[:-1]).all()
    assert torch.allclose(shift_sigma(s, 1.0), s)
    assert (shift_sigma(s[1:-1], 3.0) > s[1:-1]).all()  # shift > 1: more noise
    config = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    assert dynamic_shift(256, config) == pytest.approx(math.exp(0.5))
    assert dynamic_shift(4096, config) == pytest.approx(math.exp(1.15))
    assert dynamic_shift(1024, config) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))
    # the same sigmas FluxPipeline samples with at 1024 px (4096 tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, **config)
    scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.1], mu=1.15)
    assert torch.allclose(scheduler.sigmas[:3], shift_sigma(torch.tensor([0.9, 0.5, 0.1]), math.exp(1.15)), atol=1e-6)

    # schedulers with a linear time shift shift by mu itself
    linear = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear", **config)
    linear.set_timesteps(sigmas=[0.9, 0.5, 0.1], mu=dynamic_shift(4096, dict(linear.config)))
    assert torch.allclose(linear.sigmas[:3], shift_sigma(torch.tensor([0.9, 0.5, 0.1]), 1.15), atol=1e-6)

    objective = FlowMatchingObjective({"use_dynamic_shifting": True, **config}, flux_module.image_tokens)
    assert objective.shift_for(torch.zeros(1, 16, 128, 128)) == pytest.approx(math.exp(1.15))
    assert FlowMatchingObjective({"shift": 3.0}, flux_module.image_tokens).shift_for(torch.zeros(1, 16, 8, 8)) == 3.0
    fixed = FlowMatchingObjective({"use_dynamic_shifting": True, **config}, flux_module.image_tokens, shift=2.0)
    g = torch.Generator().manual_seed(0)
    sigmas = fixed.sample_timesteps(torch.zeros(4096, 16, 8, 8), g)
    u = sample_u(4096, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sigmas, shift_sigma(u, 2.0).clamp(1e-5, 1.0))


def test_loss_weightings_match_sd3():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.tensor([0.1, 0.5, 0.9])
    for scheme in ("sigma_sqrt", "cosmap"):
        mine = FlowMatchingObjective({}, flux_module.image_tokens, weighting=scheme).weights(sigmas)
        assert torch.allclose(mine, compute_loss_weighting_for_sd3(scheme, sigmas), rtol=1e-6)
    assert torch.equal(FlowMatchingObjective({}, flux_module.image_tokens).weights(sigmas), torch.ones(3))
    with pytest.raises(ValueError):
        FlowMatchingObjective({}, flux_module.image_tokens, weighting="snr")


# ---- the family against the real pipeline ---------------------------------------------------------


def test_predict_is_the_pipelines_own_denoising_step(tiny_flux, tmp_path):
    """One Euler step of FluxPipeline from known latents reveals its velocity; `predict` must agree."""
    family = family_for(tiny_flux, tmp_path, **{"model.options.guidance": 3.5})
    pipe = load_pipe(tiny_flux)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe(PROMPT, height=64, width=64, num_inference_steps=1, sigmas=[0.6], guidance_scale=3.5,
                   max_sequence_length=SEQ, latents=flux_module.pack(latents), output_type="latent").images
        sigma = float(pipe.scheduler.sigmas[0])  # 0.6 after the pipeline's resolution-dependent shift
        velocity = (flux_module.pack(latents) - out) / sigma
        mine = family.predict(latents, torch.tensor([sigma]), family.encode_prompts([PROMPT]))
    assert 0.6 < sigma < 1.0
    assert torch.allclose(flux_module.pack(mine), velocity, atol=1e-4)
    # guidance reaches the transformer: another value, another prediction
    family.options.guidance = 1.0
    with torch.no_grad():
        other = family.predict(latents, torch.tensor([sigma]), family.encode_prompts([PROMPT]))
    assert (other - mine).abs().max() > 1e-4


def test_lora_training_changes_only_adapter_weights(tiny_flux, disc_images, tmp_path):
    from difftune.data.dataset import TrainingData, build_items

    family = family_for(tiny_flux, tmp_path, **{"data.concepts": f"[{{dir: '{disc_images}'}}]"})
    modules = {n: p for n, p in family.parts.items() if isinstance(p, torch.nn.Module)}
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    transformer = family.parts["transformer"]
    method = get_method(family.cfg.method)
    method.attach(transformer, "transformer", family.lora_targets, "transformer")
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_A.")[0] for n in trainable if ".lora_A." in n}
    assert "transformer_blocks.0.attn.add_q_proj" in adapted and "single_transformer_blocks.0.attn.to_v" in adapted
    assert not any("ff" in n or "proj_mlp" in n or "norm" in n for n in adapted)

    data = TrainingData(build_items(family.cfg.data, log=lambda *_: None), family.cfg.data, 8, 2, 0)
    batch = data.batch(0)
    objective = family.make_objective()
    optimizer = torch.optim.AdamW(method.trainable_parameters(transformer), lr=1e-2)
    with torch.no_grad():
        x0 = family.encode_images(batch["pixels"])["x0"]
        prompts = family.encode_prompts(batch["prompts"])
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        t = objective.sample_timesteps(x0, g)
        noise = torch.randn(x0.shape, generator=g)
        pred = family.predict(objective.noisy(x0, noise, t), t, prompts)
        loss = ((pred - objective.target(x0, noise, t)) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in modules.items():
        now = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
        assert now.keys() == before[name].keys(), name
        assert all(torch.equal(now[k], before[name][k]) for k in now), f"{name} base weights changed"
    assert any(p.abs().sum() > 0 for n, p in transformer.named_parameters() if ".lora_B." in n)
    # a disabled adapter is the base model again
    with torch.no_grad():
        t = torch.tensor([0.5, 0.5])
        x_t = objective.noisy(x0, torch.zeros_like(x0), t)
        adapted_pred = family.predict(x_t, t, prompts)
        transformer.disable_adapters()
        base_pred = family.predict(x_t, t, prompts)
        transformer.enable_adapters()
    assert (adapted_pred - base_pred).abs().max() > 1e-5


def test_lora_run_loads_in_flux_pipeline_and_changes_images(tiny_flux, lora_run):
    from safetensors import safe_open

    with safe_open(str(lora_run / "pytorch_lora_weights.safetensors"), "pt") as fh:
        keys = list(fh.keys())
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".single_transformer_blocks.0.attn.to_q." in k for k in keys)
    assert any(".transformer_blocks.0.attn.to_add_out." in k for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    base = images(load_pipe(tiny_flux))
    tuned = images(load_pipe(tiny_flux, lora_run))
    assert np.abs(tuned - base).max() > 1e-3
    # validation samples were made from the cached prompt embeddings after T5 was released
    samples = list((lora_run / "samples").rglob("*.png"))
    assert samples and (lora_run / "logs" / "loss.jsonl").is_file()


def test_train_text_encoder_trains_clip_only(tiny_flux, disc_images, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "te"
    train(load_config(None, overrides(tiny_flux, disc_images, out, steps=3, **{
        "method.train_text_encoder": "true", "train.lr": "2e-2", "validation.prompts": f"['{PROMPT}']",
        "validation.steps": 1,
    })), log=lambda *_: None)
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    assert any(".self_attn.q_proj.lora_A." in k for k in keys if k.startswith("text_encoder."))
    pipe = load_pipe(tiny_flux, out)
    assert sum(".lora_A" in n for n, _ in pipe.text_encoder.named_parameters()) == 8  # 2 layers x q, k, v, out
    assert not any("lora" in n for n, _ in pipe.text_encoder_2.named_parameters())
    # samples came from the text (T5 kept: nothing was cached) at the training sequence length
    assert list((out / "samples").rglob("*.png"))


def test_train_t5_trains_both_text_encoders_in_a_full_fine_tune(tiny_flux, disc_images, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "t5"
    train(load_config(None, overrides(tiny_flux, disc_images, out, steps=2, **{
        "method.kind": "full", "method.train_text_encoder": "true", "model.options.train_t5": "true",
        "train.lr": "1e-3", "checkpoint.every": 1,  # T5's tied embeddings go into a checkpoint too
    })), log=lambda *_: None)
    assert (out / "checkpoints" / "step-00000002").is_dir()
    pipe, base = DiffusionPipeline.from_pretrained(str(out)), load_pipe(tiny_flux)
    for part in ("text_encoder_2", "text_encoder", "transformer"):
        trained, before = getattr(pipe, part).state_dict(), getattr(base, part).state_dict()
        assert any(not torch.equal(v, before[k]) for k, v in trained.items()), part
    with pytest.raises(DifftuneError, match="train_t5 trains T5 in a full fine-tune"):
        train(load_config(None, overrides(tiny_flux, disc_images, tmp_path / "lora", steps=1, **{
            "method.train_text_encoder": "true", "model.options.train_t5": "true"})), log=lambda *_: None)


def test_t5_leaves_memory_and_cached_prompts_sample_like_the_pipeline(tiny_flux, tmp_path):
    family = family_for(tiny_flux, tmp_path, **{"validation.prompts": f"['{PROMPT}', 'a red cat']"})
    family.after_prompt_cache()
    assert family.parts["text_encoder_2"] is None
    pipe = family.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        cached = Flux.sample(pipe, PROMPT, steps=2, guidance=3.5, width=64, height=64,
                             generator=torch.Generator().manual_seed(0), num=2)
    with pytest.raises(DifftuneError, match="released"):
        family.encode_prompts(["never seen"])
    reference = load_pipe(tiny_flux)(PROMPT, height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                                     max_sequence_length=SEQ, num_images_per_prompt=2,
                                     generator=torch.Generator().manual_seed(0)).images
    assert len(cached) == 2
    for a, b in zip(cached, reference):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_full_fine_tune_loads_with_from_pretrained(tiny_flux, disc_images, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "full"
    train(load_config(None, overrides(tiny_flux, disc_images, out, steps=2, **{"method.kind": "full", "train.lr": "1e-4"})),
          log=lambda *_: None)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    base = load_pipe(tiny_flux)
    changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, base.transformer.state_dict()[k])]
    assert len(changed) > 10
    # T5 was dropped during training and written back unchanged; the other frozen parts too
    for part in ("text_encoder_2", "text_encoder", "vae"):
        for k, v in getattr(pipe, part).state_dict().items():
            assert torch.equal(v, getattr(base, part).state_dict()[k]), f"{part}.{k}"
    assert np.abs(images(pipe) - images(base)).max() > 1e-3


def wide_flux(tiny: Path, out: Path) -> Path:
    """The tiny pipeline with a 128-wide transformer. The tiny one's 32-wide stream cannot carry the
    64 channels of a noise token, which caps what any training reaches near half the base loss."""
    import shutil

    from diffusers import FluxTransformer2DModel

    shutil.copytree(tiny, out)
    shutil.rmtree(out / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    ).save_pretrained(str(out / "transformer"))
    return out


def test_lora_lowers_the_loss_measured_through_the_diffusers_pipeline(tiny_flux, tmp_path):
    """A LoRA trained on one image must at least halve the flow-matching loss at fixed sigmas and
    noise, computed with diffusers' FluxPipeline parts only (its VAE, encode_prompt, packing)."""
    from PIL import Image

    model = wide_flux(tiny_flux, tmp_path / "wide")
    data = make_images(tmp_path / "one", n=1, caption=PROMPT)
    out = tmp_path / "learn"
    cfg = load_config(None, overrides(model, data, out, steps=80, **{
        "method.target_modules": "all-linear", "method.rank": 16, "train.batch_size": 1, "train.lr": "3e-3",
    }))
    train(cfg, log=lambda *_: None)
    image = Image.open(next(data.glob("*.png"))).convert("RGB").crop((0, 0, 64, 64))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    before = pipeline_loss(load_pipe(model), pixels)
    tuned = load_pipe(model, out)
    assert len({n.split(".lora_A")[0] for n, _ in tuned.transformer.named_parameters() if ".lora_A" in n}) == 30
    after = pipeline_loss(tuned, pixels)
    losses = [r["loss"] for r in read_losses(out)]
    print(f"flow-matching loss at fixed sigmas: base {before:.4f} -> LoRA {after:.4f}; "
          f"training loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}")
    assert after < 0.5 * before


def pipeline_loss(pipe, pixels, sigmas=(0.2, 0.4, 0.6, 0.8)) -> float:
    vae = pipe.vae
    with torch.no_grad():
        x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=SEQ)
        b, c, h, w = x0.shape
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        g = torch.Generator().manual_seed(123)
        losses = []
        for s in sigmas:
            for _ in range(4):
                noise = torch.randn(x0.shape, generator=g)
                v = pipe.transformer(
                    hidden_states=pipe._pack_latents((1 - s) * x0 + s * noise, b, c, h, w), timestep=torch.tensor([s]),
                    guidance=torch.tensor([1.0]), pooled_projections=pooled, encoder_hidden_states=embeds,
                    txt_ids=text_ids, img_ids=ids, return_dict=False,
                )[0]
                losses.append(((v - pipe._pack_latents(noise - x0, b, c, h, w)) ** 2).mean())
    return float(torch.stack(losses).mean())


# ---- generation ---------------------------------------------------------------------------------


def test_generate_is_reproducible_and_loras_change_it(tiny_flux, lora_run, tmp_path):
    from PIL import Image

    from safetensors.torch import save_file

    from difftune.export import read_file
    from difftune.inference.generate import generate
    from difftune.inference.naming import read_params

    def make(name, loras=(), seed=3):
        (path,) = generate(str(tiny_flux), PROMPT, tmp_path / name, loras=list(loras), steps=2, width=64, height=64,
                           seed=seed, progress=False)
        return path, np.asarray(Image.open(path), dtype=int)

    path, first = make("a")
    _, again = make("b")
    _, other_seed = make("c", seed=4)
    _, tuned = make("d", [(str(lora_run), 1.0)])
    _, off = make("e", [(str(lora_run), 0.0)])
    # a second LoRA, the first with its up weights negated: at equal scales the two cancel out
    tensors, header = read_file(lora_run / "pytorch_lora_weights.safetensors")
    opposite = tmp_path / "opposite.safetensors"
    save_file({k: -v if ".lora_B." in k else v for k, v in tensors.items()}, str(opposite), metadata=header)
    _, half = make("f", [(str(lora_run), 1.0), (str(opposite), 0.5)])
    _, cancelled = make("g", [(str(lora_run), 1.0), (str(opposite), 1.0)])
    assert np.array_equal(first, again) and first.shape == (64, 64, 3)
    assert not np.array_equal(first, other_seed)
    assert np.abs(tuned - first).max() > 2 and np.abs(off - first).max() <= 1
    assert np.abs(half - tuned).max() > 1 and np.abs(half - first).max() > 1
    assert np.abs(cancelled - first).max() <= 1
    params = read_params(path)
    assert params["guidance"] == 3.5 and params["family"] == "flux" and (params["width"], params["height"]) == (64, 64)


def test_sample_without_a_size_uses_the_pipeline_default(tiny_flux):
    pipe = load_pipe(tiny_flux)
    pipe.default_sample_size = 24  # the pipeline's own default (128 latents for FLUX.1), small for speed
    (image,) = Flux.sample(pipe, PROMPT, steps=1, guidance=3.5, width=None, height=None,
                           generator=torch.Generator().manual_seed(0))
    assert image.size == (24 * pipe.vae_scale_factor,) * 2


# ---- continuing from a LoRA ---------------------------------------------------------------------


def test_init_lora_starts_from_the_given_weights(tiny_flux, disc_images, lora_run, tmp_path):
    from safetensors.torch import load_file

    start = load_file(str(lora_run / "pytorch_lora_weights.safetensors"))
    # a learning rate too small to move anything: the output is the starting point
    out = tmp_path / "continued"
    train(load_config(None, overrides(tiny_flux, disc_images, out, steps=1, **{
        "method.rank": 4, "method.alpha": 8, "method.init_lora": str(lora_run), "train.lr": "1e-12",
    })), log=lambda *_: None)
    continued = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert continued.keys() == start.keys()
    assert all(torch.allclose(continued[k], start[k], atol=1e-8) for k in start)
    assert max(start[k].abs().max() for k in start if ".up." in k or "lora_B" in k) > 1e-4  # not a fresh LoRA


@pytest.mark.parametrize("change, message", [
    ({"method.rank": 8}, "method.rank"),
    ({"method.target_modules": "all-linear"}, "target_modules"),
])
def test_init_lora_refuses_a_lora_of_another_shape(tiny_flux, disc_images, lora_run, tmp_path, change, message):
    cfg = load_config(None, overrides(tiny_flux, disc_images, tmp_path / "bad", steps=1, **{
        "method.init_lora": str(lora_run), **change}))
    with pytest.raises(DifftuneError, match=message):
        train(cfg, log=lambda *_: None)


# ---- configs ------------------------------------------------------------------------------------


def test_shipped_flux_configs_validate(tmp_path):
    from difftune.families.registry import resolve_family

    # FLUX.1-dev's VAE has 4 blocks (factor 8); packing doubles it
    model = tmp_path / "FLUX.1-dev"
    (model / "vae").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    family = resolve_family(str(model))
    assert family is Flux and family.resolution_multiple(str(model)) == 16
    style = load_config(ROOT / "configs" / "flux-dev-lora-style.yaml")
    validate(style, resolution_multiple=16, check_paths=False)
    m, t, d = style.method, style.train, style.data
    assert (style.model.path, m.kind, m.rank, m.alpha, m.dropout) == ("black-forest-labs/FLUX.1-dev", "lora", 64, 64, 0)
    assert (t.batch_size, t.grad_accum, t.lr, t.steps, t.precision, t.optimizer) == (2, 4, 1e-4, 1000, "bf16", "adamw8bit")
    assert t.gradient_checkpointing and style.checkpoint.every == 200 and d.resolution == 1024
    assert d.concepts[0].dir == str(ROOT / "data" / "stalenhag") and "sksartist style" in d.concepts[0].prompt
    assert style.validation.steps == 25 and style.validation.guidance == 3.5 and style.validation.prompts
    full = load_config(ROOT / "configs" / "flux-dev-full.yaml")
    validate(full, resolution_multiple=16, check_paths=False)
    assert full.method.kind == "full" and full.train.gradient_checkpointing


def test_max_sequence_length_is_checked_before_loading(tiny_flux, tmp_path):
    cfg = load_config(None, overrides(tiny_flux, tmp_path, tmp_path / "o", **{"model.options.max_sequence_length": 600}))
    with pytest.raises(DifftuneError, match="max_sequence_length"):
        Flux(cfg, torch.device("cpu"), torch.float32)


# ---- a FLUX.1-dev-shaped pipeline difftune did not make ----------------------------------------------


def unigram_t5_tokenizer():
    """A T5 tokenizer from a fixed-vocabulary Unigram model (T5's ids: <pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a photo of sks disc dog cat painting style in the red blue on".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -4.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def make_foreign_flux(out: Path) -> Path:
    """VAE factor 8, 3 heads of 8 dims, 2 double + 1 single blocks, 24-wide T5, 16-wide CLIP,
    guidance embedding, FLUX.1-dev's scheduler settings."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4321)
    tokenizer = char_clip_tokenizer(out / "_tok")
    text_encoder = clip_text_encoder(tokenizer, 16)
    tokenizer_2 = unigram_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=8, layers_per_block=1,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=1, attention_head_dim=8, num_attention_heads=3,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(str(out))
    return out


CONTRACT_CONFIG = """\
model:
  path: {model}
  family: auto
  options:
    max_sequence_length: 16
method:
  kind: {kind}
  rank: 4
  alpha: 4
data:
  resolution: 64
  concepts:
    - dir: {data}
      prompt: "a photo of sks disc"
      repeats: 1
train:
  steps: 3
  batch_size: 2
  grad_accum: 1
  lr: {lr}
  seed: 0
  precision: "no"
checkpoint:
  every: 2
  keep: 3
output_dir: {out}
"""


@pytest.mark.parametrize("kind, lr", [("lora", "1.0e-2"), ("full", "1.0e-4")])
def test_foreign_flux_pipeline_trains_from_a_contract_config(tmp_path_factory, disc_images, tmp_path, kind, lr):
    from diffusers import DiffusionPipeline, FluxPipeline

    model = tmp_path_factory.getbasetemp() / "foreign-flux"
    if not (model / "model_index.json").is_file():
        make_foreign_flux(model)
    out = tmp_path / kind
    config = tmp_path / "config.yaml"
    config.write_text(CONTRACT_CONFIG.format(model=model, kind=kind, data=disc_images, out=out, lr=lr))
    train(load_config(config), log=lambda *_: None)
    base = load_pipe(model)
    tuned = load_pipe(model, out) if kind == "lora" else DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(tuned, FluxPipeline)
    tuned.set_progress_bar_config(disable=True)
    assert np.abs(images(tuned) - images(base)).max() > 1e-3
    assert (out / "checkpoints").is_dir() and (out / "config.yaml").is_file()
