"""Stable Diffusion family end to end: what is trained loads in the real diffusers pipeline and
changes its images; LoRA touches only adapter weights; the model learns; generation reproduces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, make_images
from difftune.config import load_config
from difftune.families.base import unwrap
from difftune.inference.generate import generate
from difftune.inference.naming import read_params
from difftune.train import read_losses, train

PROMPT = "a photo of sks disc"


def quiet(*_):
    pass


def images_of(pipe, prompt=PROMPT, seed=0, steps=3):
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), height=64, width=64,
               output_type="np")
    return out.images


def load_sd(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, foreign_sd):
    """A 4-step LoRA run on the foreign pipeline, with the live family captured for inspection."""
    from difftune.families.sd import family as sd

    root = tmp_path_factory.mktemp("lora")
    data = make_images(root / "data", caption=PROMPT)
    captured = {}
    original = sd.StableDiffusion.load

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        captured["family"] = self

    sd.StableDiffusion.load = capture
    try:
        out = train(load_config(None, base_overrides(foreign_sd, data, root / "out", steps=4, **{"method.rank": 4})), log=quiet)
    finally:
        sd.StableDiffusion.load = original
    return out, captured["family"]


def test_lora_file_and_resolved_config(lora_run):
    out, _ = lora_run
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any(".lora_A." in k for k in weights) and any(".lora_B." in k for k in weights)
    saved = load_config(out / "config.yaml")
    assert saved.method.rank == 4 and saved.train.steps == 4
    assert [r["step"] for r in read_losses(out)] == [1, 2, 3, 4]


def test_only_adapter_parameters_change(lora_run, foreign_sd):
    _, family = lora_run
    base = load_sd(foreign_sd).unet.state_dict()
    trained = unwrap(family.parts["unet"]).state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base[base_key]), f"base weight {key} changed"
    # B starts at zero; after training it must not be
    assert any(trained[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for name in ("vae", "text_encoder"):
        assert not any(p.requires_grad for p in family.parts[name].parameters())


def test_lora_loads_in_diffusers_changes_output_and_disables_to_base(lora_run, foreign_sd):
    out, _ = lora_run
    pipe = load_sd(foreign_sd)
    base = images_of(pipe)
    pipe.load_lora_weights(str(out))
    tuned = images_of(pipe)
    assert np.abs(tuned - base).max() > 1e-4, "the LoRA did not change the images"
    pipe.disable_lora()
    np.testing.assert_array_equal(images_of(pipe), base)


def test_lora_alpha_is_restored_by_the_loader(tmp_path, tiny_sd):
    """alpha != rank: the loader must rebuild the same scale, or images differ from training's."""
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    overrides = base_overrides(tiny_sd, data, tmp_path / "out", steps=2, **{"method.rank": 4, "method.alpha": 16})
    out = train(load_config(None, overrides), log=quiet)
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 16
    pipe = load_sd(tiny_sd)
    pipe.load_lora_weights(str(out))
    (cfg,) = pipe.unet.peft_config.values()
    assert cfg.r == 4 and cfg.lora_alpha == 16


def fixed_loss(pipe, pixels, prompt=PROMPT):
    """Denoising loss of `pipe` on one image at fixed timesteps and noise (eps objective)."""
    with torch.no_grad():
        x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        ts = torch.tensor([50, 200, 400, 600, 800, 950])
        noise = torch.randn((len(ts),) + x0.shape[1:], generator=torch.Generator().manual_seed(123))
        a = pipe.scheduler.alphas_cumprod[ts].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = pipe.unet(x_t, ts, encoder_hidden_states=hidden.expand(len(ts), -1, -1)).sample
        return float(((pred - noise) ** 2).mean())


def test_learning_lora_halves_the_loss_on_its_image(tmp_path, tiny_sd):
    from PIL import Image

    data = make_images(tmp_path / "data", n=1, caption=PROMPT)
    overrides = base_overrides(tiny_sd, data, tmp_path / "out", steps=300, **{
        "method.rank": 16, "method.target_modules": "all-linear", "train.lr": "3e-3", "train.batch_size": 1})
    out = train(load_config(None, overrides), log=quiet)
    image = np.asarray(Image.open(data / "img-00.png").convert("RGB").resize((64, 64)), dtype=np.float32)
    pixels = torch.from_numpy(image / 127.5 - 1.0).permute(2, 0, 1)[None]
    pipe = load_sd(tiny_sd)
    before = fixed_loss(pipe, pixels)
    pipe.load_lora_weights(str(out))
    after = fixed_loss(pipe, pixels)
    assert after <= 0.5 * before, (before, after)
    losses = [r["loss"] for r in read_losses(out)]
    assert np.mean(losses[-30:]) < np.mean(losses[:30])


def test_full_finetune_loads_with_from_pretrained(tmp_path, foreign_sd):
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    out = train(load_config(None, base_overrides(foreign_sd, data, tmp_path / "out", steps=2,
                                                 **{"method.kind": "full", "train.lr": "1e-4"})), log=quiet)
    from diffusers import DiffusionPipeline

    tuned = DiffusionPipeline.from_pretrained(str(out))
    tuned.set_progress_bar_config(disable=True)
    base = load_sd(foreign_sd)
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed, "full fine-tune did not change the UNet"
    # frozen parts are the base model's files, byte for byte
    for part in ("vae", "text_encoder"):
        for f in (foreign_sd / part).iterdir():
            assert (out / part / f.name).read_bytes() == f.read_bytes()
    assert np.abs(images_of(tuned) - images_of(base)).max() > 1e-4


def test_text_encoder_lora_and_v_prediction(tmp_path):
    from foreign import make_foreign_sd

    model = make_foreign_sd(tmp_path / "v", prediction_type="v_prediction")
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    out = train(load_config(None, base_overrides(model, data, tmp_path / "out", steps=2,
                                                 **{"method.train_text_encoder": True, "train.text_encoder_lr": "5e-4"})), log=quiet)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    pipe = load_sd(model)
    base = images_of(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(images_of(pipe) - base).max() > 1e-4


def test_validation_samples_written(tmp_path, tiny_sd):
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    out = train(load_config(None, base_overrides(tiny_sd, data, tmp_path / "out", steps=2, **{
        "validation.prompts": "[a red disc, a blue disc]", "validation.every": 1, "validation.steps": 2})), log=quiet)
    for step in (1, 2):
        files = sorted((out / "samples" / f"step-{step:08d}").glob("*.png"))
        assert len(files) == 2
        assert read_params(files[1])["prompt"] == "a blue disc"


def test_generate_reproducible_with_metadata_and_two_loras(lora_run, foreign_sd, tmp_path):
    out, _ = lora_run
    kw = dict(steps=3, width=64, height=64, progress=False)
    a = generate(str(foreign_sd), PROMPT, tmp_path / "a", seed=5, num=2, **kw)
    b = generate(str(foreign_sd), PROMPT, tmp_path / "b", seed=5, num=2, **kw)
    from PIL import Image

    px = lambda p: np.asarray(Image.open(p))  # noqa: E731
    assert np.array_equal(px(a[0]), px(b[0])) and np.array_equal(px(a[1]), px(b[1]))
    assert not np.array_equal(px(a[0]), px(a[1])), "image 1 must use seed+1"
    single = generate(str(foreign_sd), PROMPT, tmp_path / "c", seed=6, **kw)
    assert np.array_equal(px(single[0]), px(a[1])), "each image is reproducible on its own"
    with_loras = generate(str(foreign_sd), PROMPT, tmp_path / "d", seed=5, loras=[(str(out), 0.5), (str(out), 1.0)], **kw)
    params = read_params(with_loras[0])
    assert params["seed"] == 5 and params["steps"] == 3 and params["prompt"] == PROMPT
    assert params["loras"] == [{"path": str(out), "scale": 0.5}, {"path": str(out), "scale": 1.0}]
    assert not np.array_equal(px(with_loras[0]), px(a[0]))


CONTRACT = """\
model:
  path: {model}
  family: auto
method:
  kind: {kind}
  rank: 16
  alpha: 16
data:
  resolution: 64
  concepts:
    - dir: {data}
      prompt: "a painting in sksartist style"
      repeats: 1
train:
  steps: 3
  batch_size: 1
  grad_accum: 1
  lr: 1.0e-4
  seed: 0
  precision: bf16
checkpoint:
  every: 2
  keep: 3
output_dir: {out}
"""


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_contract_config_through_the_cli(tmp_path, foreign_sd, kind):
    """The contract's YAML (bf16 on CPU) via `difftune train`, then `difftune generate` with the result."""
    import subprocess
    import sys

    data = make_images(tmp_path / "data", n=2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONTRACT.format(model=foreign_sd, data=data, out=tmp_path / "out", kind=kind))
    run = lambda *a: subprocess.run([sys.executable, "-m", "difftune", *a], capture_output=True, text=True)  # noqa: E731
    trained = run("train", str(cfg))
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    model, loras = (str(foreign_sd), ["--lora", f"{out}:0.7"]) if kind == "lora" else (str(out), [])
    made = run("generate", "--model", model, *loras, "--prompt", "a painting in sksartist style", "--steps", "3",
               "--width", "64", "--height", "64", "--out", str(tmp_path / "gen"))
    assert made.returncode == 0, made.stderr[-3000:]
    base = run("generate", "--model", str(foreign_sd), "--prompt", "a painting in sksartist style", "--steps", "3",
               "--width", "64", "--height", "64", "--out", str(tmp_path / "base"))
    from PIL import Image

    a = np.asarray(Image.open(made.stdout.split()[0]), dtype=np.float32)
    b = np.asarray(Image.open(base.stdout.split()[0]), dtype=np.float32)
    assert base.returncode == 0 and np.abs(a - b).max() > 0, "the trained weights did not change the image"


def test_report_summarises_the_run(lora_run):
    out, _ = lora_run
    text = (out / "report.md").read_text()
    assert "method: lora, rank 4" in text and "4 steps" in text
    assert f"--lora {out}" in text and "trainable parameters" in text


@pytest.mark.parametrize("schedule", ["constant_with_warmup", "cosine", "linear"])
def test_lr_schedules_gradient_checkpointing_and_tensorboard(tmp_path, tiny_sd, schedule):
    data = make_images(tmp_path / "data", n=2, caption=PROMPT)
    out = train(load_config(None, base_overrides(tiny_sd, data, tmp_path / "out", steps=6, **{
        "train.lr_scheduler": schedule, "train.lr_warmup_steps": 2, "train.gradient_checkpointing": True,
        "train.log_every": 1})), log=quiet)
    lrs = [r["lr"] for r in read_losses(out)]
    peak = 1e-3
    # the lr each step used: warm-up from 0 over 2 steps, then the schedule (decaying ones reach 0 after the last)
    assert lrs[:3] == pytest.approx([0.0, peak / 2, peak])
    if schedule == "constant_with_warmup":
        assert lrs[2:] == pytest.approx([peak] * 4)
    else:
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and 0 < lrs[-1] < peak / 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "logs" / "difftune").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
